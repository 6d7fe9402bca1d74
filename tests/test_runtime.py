"""Runtime: sampling semantics, determinism, batching, chat format, context and backend errors."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runtime import GenerationParams, load
from runtime.errors import BackendError, ContextOverflow, ModelLoadError
from runtime.model import LlamaModel, LoadConfig, backend_name
from builds import batch_invariant
from tinyllama import TinyConfig

GREEDY = GenerationParams(max_length=24, temperature=0.0)


def texts(result):
    return [c.text for c in result.completions]


def test_num_return_sequences_gives_that_many_differing_completions(runtime):
    r = runtime.generate("Hello, world!", GenerationParams(max_length=16, temperature=1.0, top_k=0, num_return_sequences=3, seed=7))
    assert len(r.completions) == 3
    assert len(set(texts(r))) == 3  # independent draws: 3 x 16 tokens over a 384-token vocab never all collide
    for c in r.completions:
        assert c.prompt_tokens > 0 and 1 <= c.generated_tokens <= 16
        assert c.finish_reason in ("length", "eos")


def test_same_seed_reproduces_the_whole_list(runtime):
    p = GenerationParams(max_length=16, temperature=0.9, top_k=10, num_return_sequences=3, seed=1234)
    assert texts(runtime.generate("Rivers flow", p)) == texts(runtime.generate("Rivers flow", p))
    other = GenerationParams(max_length=16, temperature=0.9, top_k=10, num_return_sequences=3, seed=1235)
    assert texts(runtime.generate("Rivers flow", other)) != texts(runtime.generate("Rivers flow", p))


def test_temperature_zero_is_identical_every_call(runtime):
    first = texts(runtime.generate("The quick brown fox", GREEDY))
    for _ in range(3):
        assert texts(runtime.generate("The quick brown fox", GREEDY)) == first


@batch_invariant
def test_batched_sequences_equal_one_at_a_time(runtime):
    """Greedy through the batch (n=4, and 6 concurrent jobs) equals the lone path."""
    alone = texts(runtime.generate("Numbers like 1234", GREEDY))[0]
    many = runtime.generate("Numbers like 1234", GenerationParams(max_length=24, temperature=0.0, num_return_sequences=4))
    assert texts(many) == [alone] * 4
    out = [None] * 6
    prompts = ["Numbers like 1234", "Hello there", "Numbers like 1234", "Tokens are", "Numbers like 1234", "A"]

    def run(i):
        out[i] = texts(runtime.generate(prompts[i], GREEDY))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out[0] == out[2] == out[4] == alone


def test_seeded_output_is_reproducible_after_other_traffic(runtime):
    """The guarantee we give (README, "Determinism"): a seeded request run on its own reproduces
    bit for bit, whatever ran before it. Sharing a batch with other requests changes llama.cpp's
    kernel path (logits move by ~1e-3), so seeded sampling beside neighbours may diverge."""
    p = GenerationParams(max_length=20, temperature=0.8, seed=99)
    alone = texts(runtime.generate("Llamas live", p))

    def busy(prompt, params):
        runtime.generate(prompt, params)

    ts = [threading.Thread(target=busy, args=("Something else entirely", GenerationParams(max_length=30, seed=5))),
          threading.Thread(target=busy, args=("Llamas live", GenerationParams(max_length=10, temperature=0.0, num_return_sequences=3)))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert texts(runtime.generate("Llamas live", p)) == alone


def test_top_p_zero_means_disabled(runtime):
    """The seed document's default top_p=0.0 is read as 'no nucleus filter', same as 1.0."""
    a = GenerationParams(max_length=16, temperature=1.0, top_k=0, top_p=0.0, seed=3)
    b = GenerationParams(max_length=16, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    c = GenerationParams(max_length=16, temperature=1.0, top_k=0, top_p=0.05, seed=3)
    assert texts(runtime.generate("Hi", a)) == texts(runtime.generate("Hi", b))
    assert texts(runtime.generate("Hi", c)) != texts(runtime.generate("Hi", a))


def test_repetition_penalty_changes_greedy_output(runtime):
    plain = texts(runtime.generate("The sea", GenerationParams(max_length=40, temperature=0.0)))[0]
    penal = texts(runtime.generate("The sea", GenerationParams(max_length=40, temperature=0.0, repetition_penalty=3.0)))[0]
    assert plain != penal


def test_stop_string_ends_and_is_excluded(runtime):
    full = texts(runtime.generate("Hello", GenerationParams(max_length=40, temperature=0.0)))[0]
    assert len(full) > 6
    stop = full[3:6]
    r = runtime.generate("Hello", GenerationParams(max_length=40, temperature=0.0, stop=(stop,)))
    c = r.completions[0]
    assert c.finish_reason == "stop"
    assert c.text == full[: full.find(stop)]


def test_max_length_counts_new_tokens(runtime):
    r = runtime.generate("Hello", GenerationParams(max_length=5, temperature=0.0))
    c = r.completions[0]
    assert c.generated_tokens <= 5 and (c.finish_reason == "eos" or c.generated_tokens == 5)


def test_streaming_callback_reassembles_the_text(runtime):
    parts = []
    r = runtime.generate("Hello", GenerationParams(max_length=20, temperature=0.0), on_text=lambda i, t: parts.append(t))
    assert "".join(parts) == r.completions[0].text


def test_chat_prompt_is_llama2_inst_format_with_bos_token(chat_runtime):
    m = chat_runtime.model
    toks = chat_runtime.prompt_tokens("  Hey! How are you?  ", GenerationParams())
    assert toks == [m.bos] + m.tokenize("[INST] Hey! How are you? [/INST]", add_bos=False)
    sys_toks = chat_runtime.prompt_tokens("Hi", GenerationParams(system_prompt="Be brief."))
    assert sys_toks == [m.bos] + m.tokenize("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", add_bos=False)
    # A user typing "<s>" gets text, never a second BOS token.
    assert toks.count(m.bos) == 1
    assert chat_runtime.prompt_tokens("<s></s>", GenerationParams()).count(m.bos) == 1


def test_prompt_longer_than_context_is_refused(runtime):
    with pytest.raises(ContextOverflow) as e:
        runtime.generate("word " * 2000, GenerationParams(max_length=10))
    assert e.value.field == "prompt"
    with pytest.raises(ContextOverflow) as e:
        runtime.generate("Hello", GenerationParams(max_length=500, num_return_sequences=2))
    assert e.value.field == "max_length"


@batch_invariant
def test_prefix_cache_reuses_a_shared_prompt(runtime):
    system = "Grouped query attention lets several query heads share one key and value head. " * 3
    first = runtime.prompt_tokens(system + "First question", GREEDY)
    second = runtime.prompt_tokens(system + "Second question", GREEDY)
    shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    a = texts(runtime.generate(system + "Second question", GREEDY))  # nothing cached for it yet... (or an older entry)
    runtime.generate(system + "First question", GREEDY)
    before = dict(runtime.scheduler.stats)
    b = texts(runtime.generate(system + "Second question", GREEDY))
    reused = runtime.scheduler.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"]
    evaluated = runtime.scheduler.stats["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    assert reused >= shared and reused + evaluated == len(second)
    assert a == b  # the same answer whether or not the prefix came from the cache


def test_by_default_every_layer_is_offloaded_where_the_build_can(gguf_files):
    rt = load(gguf_files["q8_0"], n_ctx=256, n_threads=2)
    try:
        n = rt.info.n_layers
        assert n == TinyConfig().n_layer + 1  # the blocks and the output layer (conftest makes TinyConfig())
        if backend_name() == "CPU":
            assert rt.info.n_gpu_layers == 0 and rt.info.placement() == "CPU"
        else:
            assert rt.info.n_gpu_layers == n and rt.info.placement() == f"{backend_name()} ({n}/{n} layers)"
    finally:
        rt.close()


def test_gpu_layers_on_a_cpu_build_is_a_plain_error(gguf_files):
    if backend_name() != "CPU":
        pytest.skip("this llama.cpp build can offload")
    with pytest.raises(BackendError, match="CPU-only"):
        load(gguf_files["q8_0"], n_gpu_layers=10)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("use_mmap", [False, True])
def test_model_file_is_read_unless_mmap_is_asked(gguf_files, use_mmap):
    # Read by default: a mapping would keep the file's pages resident beside llama.cpp's repacked copy.
    path = Path(gguf_files["q8_0"]).resolve()
    rt = load(path, n_ctx=64, use_mmap=use_mmap)
    try:
        mapped = str(path) in Path("/proc/self/maps").read_text()
        assert mapped == use_mmap
        assert rt.generate("Hello", GREEDY).completions[0].generated_tokens > 0
    finally:
        rt.close()


@pytest.mark.parametrize("content", [b"", b"not a gguf at all", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_malformed_gguf_is_a_load_error_not_a_crash(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError):
        LlamaModel(p, LoadConfig(n_ctx=64))


def test_truncated_gguf_is_a_load_error(tmp_path, gguf_files):
    data = gguf_files["q8_0"].read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        LlamaModel(p, LoadConfig(n_ctx=64))


def test_cancel_frees_the_sequences_at_once(runtime):
    sched = runtime.scheduler
    before = sched.stats["jobs_cancelled"]
    job = runtime.submit("Hello", GenerationParams(max_length=100, temperature=0.0, num_return_sequences=4))
    job.cancel()
    with pytest.raises(Exception) as e:
        job.future.result(timeout=30)
    assert type(e.value).__name__ == "CancelledError"
    assert sched.stats["jobs_cancelled"] == before + 1
    # Everything is back: all sequence ids free, nothing reserved, the next request runs normally.
    assert sorted(sched._free_ids) == list(range(sched.n_parallel)) and sched._reserved == 0
    assert runtime.generate("Hello", GREEDY).completions[0].generated_tokens > 0


def test_prefix_cache_works_for_a_prompt_over_half_the_context(runtime):
    """A 300-token prompt in a 512-token context is still cached and reused (its cells are counted once)."""
    words = "Tokens are pieces of words and a tokenizer splits text into tokens and back again".split()
    long_prompt = " ".join(words[i % len(words)] for i in range(120))
    first = runtime.prompt_tokens(long_prompt + " one", GREEDY)
    assert 250 < len(first) < 400
    runtime.generate(long_prompt + " one", GenerationParams(max_length=40, temperature=0.0))
    before = runtime.scheduler.stats["prompt_tokens_reused"]
    runtime.generate(long_prompt + " two", GenerationParams(max_length=40, temperature=0.0))
    assert runtime.scheduler.stats["prompt_tokens_reused"] - before >= len(first) - 4
    sched = runtime.scheduler
    deadline = time.monotonic() + 5
    while sched._jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched._reserved == 0 and all(e.pins == 0 for e in sched.cache.entries)


def test_a_failing_text_callback_fails_only_its_own_request(runtime):
    def broken(i, text):
        raise BrokenPipeError("stdout went away")

    other = {}
    t = threading.Thread(target=lambda: other.setdefault("r", runtime.generate("Rivers", GenerationParams(max_length=60, temperature=0.0))))
    t.start()
    with pytest.raises(BrokenPipeError):
        runtime.generate("Hello", GenerationParams(max_length=60, temperature=0.0), on_text=broken)
    t.join()
    assert other["r"].completions[0].generated_tokens > 0


def test_cancelled_jobs_do_not_hold_queue_slots(gguf_files):
    from runtime.errors import QueueFull

    def wait_for(cond):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert cond()

    # One running sequence and two waiting: capacity 1 + 2 = 3 requests.
    rt = load(gguf_files["q8_0"], n_ctx=512, n_threads=2, n_parallel=1, n_cache=0, queue_size=2)
    sched = rt.scheduler
    try:
        a = rt.submit("A", GenerationParams(max_length=450, temperature=0.0))
        wait_for(lambda: sched._active)
        b = rt.submit("B", GenerationParams(max_length=10, temperature=0.0))
        wait_for(lambda: b in sched._waiting)  # B waits for A's sequence
        c = rt.submit("C", GenerationParams(max_length=10, temperature=0.0))
        with pytest.raises(QueueFull):
            rt.submit("D", GenerationParams(max_length=10, temperature=0.0))
        c.cancel()  # C's client gave up while queued: its slot is free again
        d = rt.submit("D", GenerationParams(max_length=10, temperature=0.0))
        assert d.future.result(60).completions[0].generated_tokens > 0
        assert c.future.cancelled() and a.future.result(60) and b.future.result(60)
    finally:
        rt.close()


def test_close_fails_waiting_jobs_and_refuses_new_ones(gguf_files):
    from runtime.errors import ShuttingDown

    rt = load(gguf_files["q8_0"], n_ctx=512, n_threads=2, n_parallel=1, n_cache=0, queue_size=4)
    jobs = [rt.submit("Hello", GenerationParams(max_length=400, temperature=0.0)) for _ in range(3)]
    rt.close()
    for j in jobs:
        assert j.future.done()  # finished, or failed with ShuttingDown: nobody waits forever
        if j.future.exception() is not None:
            assert isinstance(j.future.exception(), ShuttingDown)
    assert any(isinstance(j.future.exception(), ShuttingDown) for j in jobs[1:])
    with pytest.raises(ShuttingDown):
        rt.submit("Hello", GREEDY)


def test_seeded_sampling_reproduces_with_a_cached_prompt(runtime):
    """A ~100-token prompt: first evaluated in full, then wholly from the prefix cache, its first
    token sampled from the logits the first evaluation stored (so on GPU kernels too)."""
    prompt = "Rivers flow to the sea, and the sea returns water to the sky as rain. " * 5
    p = GenerationParams(max_length=30, temperature=0.8, seed=11)
    first = texts(runtime.generate(prompt, p))
    reused = runtime.scheduler.stats["prompt_tokens_reused"]
    second = texts(runtime.generate(prompt, p))
    assert runtime.scheduler.stats["prompt_tokens_reused"] > reused  # the second came from the cache
    assert first == second


def test_sampling_a_saved_logits_row_picks_what_sampling_the_decode_picks(gguf_files):
    """LlamaModel.sample_saved builds llama_sampler_sample's candidates itself: with the same seed
    it must draw the same token, at a temperature where the seeds draw different ones."""
    m = LlamaModel(gguf_files["q8_0"], LoadConfig(n_ctx=64, n_threads=2, n_seq_max=1))
    try:
        toks = m.tokenize("Once upon a time", add_bos=True)
        m.decode([(t, i, 0, i == len(toks) - 1) for i, t in enumerate(toks)])
        row = m.logits_row(len(toks) - 1)
        drawn = []
        for seed in range(8):
            p = GenerationParams(max_length=4, temperature=1.5, top_k=0, seed=seed)
            a, b = m.new_sampler(p, seed, toks), m.new_sampler(p, seed, toks)
            try:
                drawn.append(m.sample(a, len(toks) - 1))
                assert m.sample_saved(b, row) == drawn[-1]
            finally:
                a.free()
                b.free()
        assert len(set(drawn)) > 1
        bad = m.new_sampler(GREEDY, 0, toks)
        try:
            with pytest.raises(ValueError, match="logits row"):
                m.sample_saved(bad, row[:-4])
        finally:
            bad.free()
    finally:
        m.close()
