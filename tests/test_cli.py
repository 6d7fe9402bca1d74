"""The llamabox command: one readable line and a non-zero exit on bad input; real work otherwise."""
from __future__ import annotations

import os
import subprocess
import sys



def llamabox(*args, home=None, timeout=120):
    env = {**os.environ, "LLAMABOX_HOME": str(home)} if home else dict(os.environ)
    env.pop("LLAMABOX_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(proc, code):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    return lines[0]


def test_bad_flag(tmp_path):
    line = one_line_error(llamabox("serve", "--bogus", home=tmp_path), 2)
    assert "--bogus" in line


def test_gpu_layers_takes_auto_or_a_count(tmp_path):
    line = one_line_error(llamabox("serve", "--gpu-layers", "most", home=tmp_path), 2)
    assert "--gpu-layers" in line and "auto" in line and "'most'" in line
    line = one_line_error(llamabox("serve", "--gpu-layers", "-2", home=tmp_path), 2)
    assert "--gpu-layers" in line and "-2" in line


def test_missing_model_path(tmp_path):
    line = one_line_error(llamabox("generate", "--model", tmp_path / "nope.gguf", "hi", home=tmp_path), 1)
    assert "nope.gguf" in line


def test_unknown_store_id(tmp_path):
    line = one_line_error(llamabox("generate", "--model", "llamav2-7b-chat", "hi", home=tmp_path), 1)
    assert "llamabox pull llamav2-7b-chat" in line


def test_model_id_cannot_escape_the_store(tmp_path):
    line = one_line_error(llamabox("rm", "../../etc", home=tmp_path), 2)
    assert "not a valid model id" in line


def test_non_loopback_without_key_is_refused(tmp_path):
    line = one_line_error(llamabox("serve", "--host", "0.0.0.0", "--model", tmp_path / "x.gguf", home=tmp_path), 2)
    assert "--insecure-no-auth" in line


def test_bad_generation_value_names_the_flag(tmp_path, gguf_files):
    line = one_line_error(llamabox("generate", "--model", gguf_files["q8_0"], "--temperature", "hot", "hi", home=tmp_path), 2)
    assert "--temperature" in line


def test_generate_streams_the_completion(tmp_path, gguf_files):
    from runtime import GenerationParams, load

    rt = load(gguf_files["q8_0"], n_ctx=256, n_threads=2)
    try:
        expected = rt.generate("Hello", GenerationParams(max_length=12, temperature=0.0)).completions[0].text
    finally:
        rt.close()
    proc = llamabox("generate", "--model", gguf_files["q8_0"], "--max-length", 12, "--temperature", 0, "--ctx", 256,
                    "Hello", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello" + expected + "\n"
    assert "tok/s" in proc.stderr


def test_convert_list_verify_rm(tmp_path, tiny_hf):
    folder, _ = tiny_hf
    proc = llamabox("convert", folder, "--quant", "q8_0,q4_k_m", "--id", "tiny", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "q4_k_m" in proc.stdout and "bits/weight" in proc.stdout
    listing = llamabox("list", home=tmp_path).stdout
    assert "tiny" in listing and "q8_0" in listing and "q4_k_m" in listing
    assert llamabox("verify", "tiny", home=tmp_path).returncode == 0
    gguf = tmp_path / "models" / "tiny" / "tiny.q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF
    gguf.write_bytes(bytes(data))
    bad = llamabox("verify", "tiny", home=tmp_path)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout
    assert llamabox("rm", "tiny", home=tmp_path).returncode == 0
    assert not [ln for ln in llamabox("list", home=tmp_path).stdout.splitlines() if ln.startswith("tiny ")]


def test_convert_refuses_unknown_quant(tmp_path, tiny_hf):
    folder, _ = tiny_hf
    line = one_line_error(llamabox("convert", folder, "--quant", "q9_9", home=tmp_path), 2)
    assert "q9_9" in line


def test_chat_talks_in_turns_and_takes_commands(tmp_path, gguf_files):
    """Two turns, a reset, and an exit, through a pipe; the tiny model's GGUF carries Llama 2's template."""
    proc = subprocess.run([sys.executable, "-m", "server.cli", "chat", "--model", str(gguf_files["f16"]), "--temperature", "0",
                           "--max-tokens", "8", "--system", "Be brief."],
                          input="Hello\nAnd then?\n/reset\nHi\n/exit\nnever read\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLAMABOX_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 3 and all(a.strip() for a in answers)
    assert "(new conversation)" in proc.stderr


def test_chat_needs_a_chat_model(tmp_path, gguf_files):
    line = one_line_error(subprocess.run([sys.executable, "-m", "server.cli", "chat", "--model", str(gguf_files["f16"]), "--no-chat"],
                                         input="", capture_output=True, text=True, timeout=120,
                                         env={**os.environ, "LLAMABOX_HOME": str(tmp_path)}), 1)
    assert "base model" in line
