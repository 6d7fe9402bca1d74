"""convert.hub against a loopback fake of the Hugging Face Hub (tests/fakehub.py); no network."""
from __future__ import annotations

import hashlib
import os
import socket

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import close_session

from convert.hub import MODEL_REPOS, PARTIAL_DIR, download_checkpoint, download_gguf, select_files
from runtime.errors import (
    DownloadError,
    GatedRepoError,
    IntegrityError,
    InvalidParameter,
    UnsupportedArchitecture,
)

try:  # tests/ as a plain folder on sys.path (pytest's default rootdir insertion) ...
    from fakehub import FakeHub, isolate_hf
except ImportError:  # ... or as a package, from the repo root
    from tests.fakehub import FakeHub, isolate_hf

# A Llama-2 "-hf" repo as listed on the Hub (meta-llama/Llama-2-7b-hf), plus the kind of extra
# files other Llama repos carry (GGUF quantizations, Meta's original checkpoint in a folder).
LLAMA2_SAFETENSORS_LISTING = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "Responsible-Use-Guide.pdf",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "llama-2-7b.Q4_K_M.gguf",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
    "onnx/model.safetensors",
]

LLAMA2_BIN_ONLY_LISTING = [
    ".gitattributes",
    "README.md",
    "config.json",
    "consolidated.00.pth",
    "params.json",
    "ggml-model-q4_0.gguf",
    "pytorch_model-00001-of-00003.bin",
    "pytorch_model-00002-of-00003.bin",
    "pytorch_model-00003-of-00003.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
]

REPO = "meta-llama/Llama-2-7b-hf"


def _bytes(name: str, size: int = 3000) -> bytes:
    """Deterministic, file-specific content."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _llama_repo_files() -> dict[str, bytes]:
    files = {name: _bytes(name) for name in LLAMA2_SAFETENSORS_LISTING}
    files["config.json"] = b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}'
    files["model-00001-of-00002.safetensors"] = _bytes("shard1", 70_001)
    files["model-00002-of-00002.safetensors"] = _bytes("shard2", 50_003)
    return files


def _visible_files(folder) -> dict[str, bytes]:
    """Files in `folder`, relative, without hidden bookkeeping (.cache/, the manifest)."""
    result = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            result[rel.as_posix()] = path.read_bytes()
    return result


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    with FakeHub() as server:
        isolate_hf(monkeypatch, server.url, tmp_path / "hf-home")
        try:
            yield server
        finally:
            close_session()  # drop keep-alive connections to this server


# -- select_files -------------------------------------------------------------------------------


def test_select_files_takes_safetensors_weights_and_tokenizer_from_a_llama2_repo():
    assert select_files(LLAMA2_SAFETENSORS_LISTING) == [
        "README.md",  # the model card: licence, base model, tags go into the GGUF as the reference writes them
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def test_select_files_takes_a_fine_tunes_added_tokens_and_chat_template():
    listing = [*LLAMA2_SAFETENSORS_LISTING, "added_tokens.json", "chat_template.jinja", "sub/added_tokens.json"]
    chosen = select_files(listing)
    assert {"added_tokens.json", "chat_template.jinja"} <= set(chosen) and "sub/added_tokens.json" not in chosen


def test_select_files_falls_back_to_pytorch_bins_when_there_is_no_safetensors():
    assert select_files(LLAMA2_BIN_ONLY_LISTING) == [
        "README.md",
        "config.json",
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
        "pytorch_model.bin.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def test_model_repos_names_the_two_llama2_checkpoints():
    assert MODEL_REPOS == {
        "llamav2-7b": "meta-llama/Llama-2-7b-hf",
        "llamav2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    }


# -- download_checkpoint ------------------------------------------------------------------------


def test_download_checkpoint_fetches_exactly_the_selected_files(fake_hub, tmp_path):
    files = _llama_repo_files()
    repo = fake_hub.add_repo(REPO, files)
    dest = tmp_path / "ckpt"

    folder, commit = download_checkpoint(REPO, dest)

    assert folder == dest.resolve()
    assert commit == repo.commit
    selected = select_files(list(files))
    assert _visible_files(folder) == {name: files[name] for name in selected}
    # Nothing else was even requested from the Hub or the CDN.
    requested = {r.path.rsplit("/", 1)[-1] for r in fake_hub.requests if "/resolve/" in r.path}
    assert requested == set(selected)


@pytest.mark.parametrize("token", [None, "hf_not_accepted"])  # 401 anonymous, 403 with a token
def test_gated_repo_raises_gated_repo_error_telling_to_accept_licence_and_log_in(fake_hub, tmp_path, token):
    fake_hub.add_repo(REPO, _llama_repo_files(), gated=True, allowed_token="hf_accepted")

    with pytest.raises(GatedRepoError) as info:
        download_checkpoint(REPO, tmp_path / "ckpt", token=token)

    message = str(info.value)
    assert f"https://huggingface.co/{REPO}" in message
    assert "licence" in message.lower()
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert not (tmp_path / "ckpt").exists() or _visible_files(tmp_path / "ckpt") == {}


@pytest.mark.parametrize("how", ["argument", "HF_TOKEN"])
def test_gated_repo_downloads_with_a_token_that_has_access(fake_hub, tmp_path, monkeypatch, how):
    repo = fake_hub.add_repo(REPO, _llama_repo_files(), gated=True, allowed_token="hf_accepted")
    if how == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "hf_accepted")
        token = None
    else:
        token = "hf_accepted"

    _, commit = download_checkpoint(REPO, tmp_path / "ckpt", token=token)

    assert commit == repo.commit
    hub_requests = [r for r in fake_hub.requests if r.server == "hub"]
    assert hub_requests and all(r.headers.get("authorization") == "Bearer hf_accepted" for r in hub_requests)
    # The signed-CDN leg never gets the token.
    assert all("authorization" not in r.headers for r in fake_hub.requests if r.server == "cdn")


def test_download_checkpoint_pins_the_requested_revision(fake_hub, tmp_path):
    repo = fake_hub.add_repo(REPO, _llama_repo_files())

    _, commit = download_checkpoint(REPO, tmp_path / "ckpt", revision=repo.commit)

    assert commit == repo.commit
    assert fake_hub.requests[0].path == f"/api/models/{REPO}/revision/{repo.commit}"
    resolves = [r.path for r in fake_hub.requests if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{repo.commit}/" in p for p in resolves)


def test_unknown_revision_raises_download_error(fake_hub, tmp_path):
    fake_hub.add_repo(REPO, _llama_repo_files())
    with pytest.raises(DownloadError) as info:
        download_checkpoint(REPO, tmp_path / "ckpt", revision="no-such-branch")
    assert "no-such-branch" in str(info.value)


def test_repo_without_a_sentencepiece_tokenizer_is_refused_before_downloading(fake_hub, tmp_path):
    files = _llama_repo_files()
    del files["tokenizer.model"]
    fake_hub.add_repo(REPO, files)

    with pytest.raises(UnsupportedArchitecture) as info:
        download_checkpoint(REPO, tmp_path / "ckpt")
    assert "tokenizer.model" in str(info.value)
    assert [r.path for r in fake_hub.requests] == [f"/api/models/{REPO}"]


def test_a_bpe_only_repo_is_refused_before_downloading_pointing_to_pull_gguf(fake_hub, tmp_path):
    files = _llama_repo_files()  # as Llama 3 and SmolLM ship: tokenizer.json, no tokenizer.model
    del files["tokenizer.model"]
    files["tokenizer.json"] = b'{"model": {"type": "BPE"}}'
    fake_hub.add_repo(REPO, files)

    with pytest.raises(UnsupportedArchitecture) as info:
        download_checkpoint(REPO, tmp_path / "ckpt")
    assert "tokenizer.json without a SentencePiece tokenizer.model" in str(info.value)
    assert "--gguf" in str(info.value)
    assert [r.path for r in fake_hub.requests] == [f"/api/models/{REPO}"]


def test_unknown_repo_raises_download_error_naming_the_repo(fake_hub, tmp_path):
    with pytest.raises(DownloadError) as info:
        download_checkpoint("nobody/no-such-model", tmp_path / "ckpt")
    assert not isinstance(info.value, GatedRepoError)
    assert "nobody/no-such-model" in str(info.value)


def test_unreachable_hub_raises_a_readable_download_error(fake_hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d" % s.getsockname()[1]
    isolate_hf(monkeypatch, dead, tmp_path / "hf-home2")

    with pytest.raises(DownloadError) as info:
        download_checkpoint(REPO, tmp_path / "ckpt")
    assert dead in str(info.value) and "network" in str(info.value).lower()


def test_interrupted_transfer_is_resumed_with_a_range_request(fake_hub, tmp_path):
    files = _llama_repo_files()
    # huggingface_hub only writes whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks to disk, so the
    # resume point is a chunk boundary: the file must be more than one chunk, cut after one.
    big = "model-00001-of-00002.safetensors"
    files[big] = os.urandom(2 * constants.DOWNLOAD_CHUNK_SIZE + 4096)
    fake_hub.add_repo(REPO, files)
    fake_hub.break_once(REPO, big)

    folder, _ = download_checkpoint(REPO, tmp_path / "ckpt")

    gets = fake_hub.content_gets(big)
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=") and gets[1].range.endswith("-")
    resumed_at = int(gets[1].range[len("bytes=") : -1])
    assert 0 < resumed_at < len(files[big])
    assert (folder / big).read_bytes() == files[big]


def test_second_download_reuses_finished_files(fake_hub, tmp_path):
    fake_hub.add_repo(REPO, _llama_repo_files())
    download_checkpoint(REPO, tmp_path / "ckpt")
    fake_hub.clear_requests()

    download_checkpoint(REPO, tmp_path / "ckpt")

    # Only the listing; every file is recognised as already downloaded from that commit.
    assert [(r.method, r.path) for r in fake_hub.requests] == [("GET", f"/api/models/{REPO}")]


def _go_offline(monkeypatch, how: str) -> None:
    if how == "env":  # set after huggingface_hub was imported: convert.hub must still see it
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # set before import: huggingface_hub's own constant
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("how", ["env", "constant"])
def test_offline_with_nothing_downloaded_raises_download_error(fake_hub, tmp_path, monkeypatch, how):
    fake_hub.add_repo(REPO, _llama_repo_files())
    _go_offline(monkeypatch, how)

    with pytest.raises(DownloadError) as info:
        download_checkpoint(REPO, tmp_path / "ckpt")
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert fake_hub.requests == []


@pytest.mark.parametrize("how", ["env", "constant"])
def test_offline_returns_the_earlier_download_without_any_request(fake_hub, tmp_path, monkeypatch, how):
    files = _llama_repo_files()
    repo = fake_hub.add_repo(REPO, files)
    folder, _ = download_checkpoint(REPO, tmp_path / "ckpt")
    fake_hub.clear_requests()
    _go_offline(monkeypatch, how)

    again, commit = download_checkpoint(REPO, tmp_path / "ckpt")

    assert (again, commit) == (folder, repo.commit)
    assert _visible_files(again) == {name: files[name] for name in select_files(list(files))}
    assert fake_hub.requests == []


def test_offline_does_not_accept_an_incomplete_download(fake_hub, tmp_path, monkeypatch):
    files = _llama_repo_files()
    fake_hub.add_repo(REPO, files)
    folder, _ = download_checkpoint(REPO, tmp_path / "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(DownloadError):
        download_checkpoint(REPO, folder)


# -- download_gguf ------------------------------------------------------------------------------

GGUF_REPO = "TheBloke/Llama-2-7B-Chat-GGUF"
GGUF_NAME = "llama-2-7b-chat.Q4_K_M.gguf"


def test_download_gguf_returns_the_file_and_its_verified_sha256(fake_hub, tmp_path):
    data = b"GGUF" + _bytes("gguf", 50_000)
    fake_hub.add_repo(GGUF_REPO, {GGUF_NAME: data, "README.md": b"# q"})

    path, sha = download_gguf(f"{GGUF_REPO}:{GGUF_NAME}", tmp_path / "models")

    assert path == (tmp_path / "models" / GGUF_NAME).resolve()
    assert path.read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted([GGUF_NAME, PARTIAL_DIR])  # + our records


def test_download_gguf_with_wrong_bytes_raises_integrity_error_and_leaves_nothing(fake_hub, tmp_path):
    data = b"GGUF" + _bytes("gguf", 50_000)
    corrupt = bytearray(data)
    corrupt[1234] ^= 0xFF  # same size, different content: only the sha256 can tell
    fake_hub.add_repo(GGUF_REPO, {GGUF_NAME: data}, served={GGUF_NAME: bytes(corrupt)})
    dest = tmp_path / "models"

    with pytest.raises(IntegrityError):
        download_gguf(f"{GGUF_REPO}:{GGUF_NAME}", dest)

    assert not dest.exists() or list(dest.iterdir()) == []
    assert fake_hub.content_gets(GGUF_NAME), "the corrupt bytes were actually downloaded"


@pytest.mark.parametrize("spec", ["../x:y.gguf", "a/b:../c.gguf", "a/b:c.bin", "a/b:/etc/c.gguf", "a/b", "a:b.gguf"])
def test_bad_gguf_spec_raises_invalid_parameter_for_field_gguf(fake_hub, tmp_path, spec):
    with pytest.raises(InvalidParameter) as info:
        download_gguf(spec, tmp_path / "models")
    assert info.value.field == "gguf"
    assert fake_hub.requests == []
    assert not (tmp_path / "models").exists()

