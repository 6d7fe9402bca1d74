"""Issue 15: the prefix cache parks idle prompts in host memory, and --kv-type picks the KV
cache's element type. Real llama.cpp on the tiny model throughout; no timing here (speed is
bench/peers.py's job)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from holds import hold_first_decode
from prompts import GREEDY, long_text
from runtime import GenerationParams, load
from runtime.errors import InvalidParameter

@pytest.fixture()
def fresh(runtimes):
    """A runtime of its own (closed after the test)."""
    return lambda **kw: runtimes("f16", **{"n_parallel": 2, "n_cache": 3, "queue_size": 8, "chat": False, **kw})


def idle(rt) -> None:
    """Wait until the worker has released every job (futures resolve just before that)."""
    deadline = time.monotonic() + 10
    while rt.scheduler._jobs and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not rt.scheduler._jobs


def the_entry_of(rt, prompt: str):
    """Serve `prompt` (greedy) on a runtime with nothing cached; the one cache entry it leaves."""
    rt.generate(prompt, GREEDY)
    idle(rt)
    [entry] = rt.scheduler.cache.entries
    return entry


def kv_is_empty(rt) -> bool:
    """No sequence holds a cell: llama.cpp's highest used cell, which sets how many cells every
    decode step attends over, is then 0."""
    return all(rt.model.seq_pos_max(s) == -1 for s in range(rt.model.config.n_seq_max))


def test_a_cached_prompt_stays_resident_while_nothing_runs_and_a_follow_up_shares_it_without_a_copy(fresh):
    rt = fresh()
    cache = rt.scheduler.cache
    prompt = long_text(60)
    n = len(rt.prompt_tokens(prompt, GREEDY))
    cold = rt.generate(prompt, GREEDY).completions[0].text
    idle(rt)
    [entry] = cache.entries
    assert len(entry.tokens) == n and entry.resident and entry.host is None and entry.pins == 0
    assert rt.model.seq_pos_max(entry.seq_id) == n - 1

    before = dict(rt.scheduler.stats)
    assert rt.generate(prompt, GREEDY).completions[0].text == cold
    assert rt.scheduler.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"] == n
    assert rt.scheduler.stats["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == 0
    assert cache.stats["prefix_cache_restores"] == 0 and cache.stats["prefix_cache_parks"] == 0


def test_another_prompt_parks_the_idle_entry_and_a_later_hit_brings_it_back_with_the_same_output(fresh):
    rt = fresh()
    cache = rt.scheduler.cache
    a, b = long_text(60), "Other words entirely: " + long_text(50)
    n = len(rt.prompt_tokens(a, GREEDY))
    cold = rt.generate(a, GREEDY).completions[0].text
    idle(rt)
    [ea] = cache.entries
    rt.generate(b, GREEDY)  # does not share a: a is parked before b's first decode
    idle(rt)
    eb = next(e for e in cache.entries if e is not ea)
    assert not ea.resident and ea.host and rt.model.seq_pos_max(ea.seq_id) == -1
    assert eb.resident

    before = dict(rt.scheduler.stats)
    assert rt.generate(a, GREEDY).completions[0].text == cold  # copied back from host memory
    assert rt.scheduler.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"] == n
    assert cache.stats["prefix_cache_restores"] == 1
    idle(rt)
    assert ea.resident and not eb.resident and rt.model.seq_pos_max(eb.seq_id) == -1


def test_a_longer_prompt_reuses_a_parked_prefix_and_matches_a_runtime_without_a_cache(fresh):
    rt, plain = fresh(), fresh(n_cache=0)
    prefix = long_text(50)
    rt.generate(prefix, GREEDY)
    idle(rt)
    asked = prefix + " and then some more words"
    got = rt.generate(asked, GREEDY).completions[0].text
    assert rt.scheduler.stats["prefix_cache_hits"] == 1
    assert got == plain.generate(asked, GREEDY).completions[0].text


def test_a_parked_prompt_stays_out_of_the_kv_cache_while_others_generate(fresh):
    rt = fresh()
    rt.generate(long_text(60), GREEDY)
    idle(rt)
    [entry] = rt.scheduler.cache.entries
    seen = []
    rt.generate("Once", GenerationParams(max_length=20, temperature=0.0),
                on_text=lambda _i, _t: seen.append(rt.model.seq_pos_max(entry.seq_id)))
    assert seen and all(p == -1 for p in seen)


def test_a_refused_restore_evaluates_the_prompt_instead(fresh, monkeypatch):
    rt = fresh()
    prompt = long_text(60)
    expected = rt.generate(prompt, GREEDY).completions[0].text
    rt.generate("Other words entirely: " + long_text(50), GREEDY)  # parks the first prompt
    idle(rt)
    monkeypatch.setattr(rt.model, "set_seq_state", lambda seq, state: False)  # llama.cpp: no free cells
    before = rt.scheduler.stats["prompt_tokens_evaluated"]
    assert rt.generate(prompt, GREEDY).completions[0].text == expected
    assert rt.scheduler.stats["prompt_tokens_evaluated"] - before == len(rt.prompt_tokens(prompt, GREEDY))
    assert rt.scheduler.cache.stats["prefix_cache_restore_failures"] == 1
    idle(rt)
    assert kv_is_empty(rt)


def test_host_copies_stay_within_the_context_size_and_the_entry_count(fresh):
    rt = fresh(n_cache=3)
    cache = rt.scheduler.cache
    for i in range(6):  # 6 prompts of ~130 tokens: more than 3 entries and more than 512 tokens
        rt.generate(f"{i} " + long_text(100), GenerationParams(max_length=2, temperature=0.0))
    idle(rt)
    assert 1 <= len(cache.entries) <= 3
    assert sum(len(e.tokens) for e in cache.entries) <= rt.model.n_ctx
    assert sum(e.resident for e in cache.entries) <= 1  # only the last prompt, while nothing runs


def test_a_short_prompt_asked_again_is_answered_from_the_cache_with_the_same_text(fresh):
    rt = fresh()
    cold = rt.generate("Once upon a time", GREEDY).completions[0].text
    idle(rt)
    [entry] = rt.scheduler.cache.entries
    assert len(entry.tokens) < rt.scheduler.min_cached_prompt
    before = dict(rt.scheduler.stats)
    assert rt.generate("Once upon a time", GREEDY).completions[0].text == cold
    assert rt.scheduler.stats["prompt_tokens_evaluated"] == before["prompt_tokens_evaluated"]
    # A shorter prompt that the entry begins with is not a whole hit: evaluated, not pinned to the entry.
    rt.generate("Once upon", GREEDY)
    assert rt.scheduler.stats["prompt_tokens_evaluated"] > before["prompt_tokens_evaluated"]


def test_a_short_prompt_takes_only_a_free_cache_slot(fresh):
    rt = fresh(n_cache=2)
    cache = rt.scheduler.cache
    for i in range(2):
        rt.generate(f"{i} " + long_text(50), GREEDY)
    idle(rt)
    longs = list(cache.entries)
    rt.generate("Once upon a time", GREEDY)
    idle(rt)
    assert cache.entries == longs


def test_a_short_entry_is_dropped_not_parked_when_another_prompt_starts(fresh):
    rt = fresh()
    cache = rt.scheduler.cache
    old = the_entry_of(rt, long_text(50))
    rt.generate("Once upon a time", GREEDY)  # parks the long entry, and is kept in a free slot
    idle(rt)
    [short] = [e for e in cache.entries if e is not old]
    parks = cache.stats["prefix_cache_parks"]
    rt.generate("Something else: " + long_text(50), GREEDY)
    idle(rt)
    assert short not in cache.entries and short.host is None and cache.stats["prefix_cache_parks"] == parks
    assert old in cache.entries and not old.resident


def test_a_short_question_after_a_cached_document_takes_over_its_entry(fresh):
    """The entry follows the latest prompt (as llama-server's slot does): one entry, no second copy
    of the document, and that question asked again is answered from it whole."""
    rt = fresh()
    cache = rt.scheduler.cache
    doc = long_text(60)
    entry = the_entry_of(rt, doc + " First question")
    second = doc + " Second one"
    text = rt.generate(second, GREEDY).completions[0].text
    idle(rt)
    assert cache.entries == [entry] and entry.tokens == rt.prompt_tokens(second, GREEDY)
    assert rt.model.seq_pos_max(entry.seq_id) == len(entry.tokens) - 1
    before = dict(rt.scheduler.stats)
    assert rt.generate(second, GREEDY).completions[0].text == text
    assert rt.scheduler.stats["prompt_tokens_evaluated"] == before["prompt_tokens_evaluated"]


def test_a_long_entry_that_a_short_prompt_merely_begins_like_is_not_taken_over(fresh):
    """Following would cut the entry down to the shared part plus the job's short tail: refused
    when the entry would lose min_restore (32) tokens or more."""
    rt = fresh()
    cache = rt.scheduler.cache
    entry = the_entry_of(rt, long_text(100))
    kept = list(entry.tokens)
    rt.generate(long_text(45) + " Question", GREEDY)  # shares about 45 tokens, adds a few
    idle(rt)
    assert rt.scheduler.stats["prefix_cache_hits"] == 1  # it did use the entry
    assert cache.entries == [entry] and entry.tokens == kept


def test_short_prompts_beside_other_requests_are_not_kept(fresh, monkeypatch):
    rt = fresh()
    _batches, inside, gate = hold_first_decode(rt, monkeypatch)  # until the second job is queued
    a = rt.submit("Once upon a time", GenerationParams(max_length=60, temperature=0.0))
    assert inside.wait(10)
    b = rt.submit("Hello there", GenerationParams(max_length=2, temperature=0.0))
    gate.set()
    a.future.result(60)
    b.future.result(60)
    idle(rt)
    # "Once upon a time" ended its prompt alone: kept. "Hello there" ended its prompt beside it: not.
    assert [e.tokens for e in rt.scheduler.cache.entries] == [rt.prompt_tokens("Once upon a time", GREEDY)]


def test_an_entry_that_another_running_job_shares_does_not_follow_either(fresh, monkeypatch):
    rt = fresh()
    cache = rt.scheduler.cache
    doc = long_text(60)
    entry = the_entry_of(rt, doc + " First question")
    _batches, inside, gate = hold_first_decode(rt, monkeypatch)  # until the second job is queued
    a = rt.submit(doc + " Question A", GenerationParams(max_length=60, temperature=0.0))
    assert inside.wait(10)
    b = rt.submit(doc + " Question B", GREEDY)
    gate.set()
    b.future.result(60)
    a.future.result(60)
    idle(rt)
    # A's prompt ended first, with the entry to itself: the entry follows A. B started while A ran.
    assert cache.entries == [entry] and entry.tokens == rt.prompt_tokens(doc + " Question A", GREEDY)


# --- --kv-type -----------------------------------------------------------------------

def test_a_q8_0_kv_cache_loads_generates_and_takes_about_half_the_memory(fresh):
    f16, q8 = fresh(), fresh(kv_type="q8_0")
    assert q8.info.kv_type == "q8_0"
    prompt = long_text(60)
    for rt in (f16, q8):
        r = rt.generate(prompt, GREEDY)
        assert r.completions[0].generated_tokens > 0
        idle(rt)
    # The same prompt's KV cells (its cache entry, resident while idle), copied out: q8_0 stores
    # 34 bytes per 32 values, f16 64.
    size = {rt.info.kv_type: len(rt.model.seq_state(rt.scheduler.cache.entries[0].seq_id)) for rt in (f16, q8)}
    assert 0.45 < size["q8_0"] / size["f16"] < 0.62, size


def test_an_unknown_kv_type_is_refused_naming_the_flag(gguf_files):
    with pytest.raises(InvalidParameter) as e:
        load(gguf_files["f16"], n_ctx=256, n_threads=2, kv_type="q9_0")
    assert e.value.field == "kv_type" and "q8_0" in e.value.message
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", str(gguf_files["f16"]), "--kv-type", "int3",
                           "hi"], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 2, proc.stderr
    assert "--kv-type" in proc.stderr and "int3" in proc.stderr


def test_an_idle_prefix_of_a_longer_cached_prompt_is_dropped_not_copied_to_host(fresh):
    """Turn 1 of a chat is a prefix of turn 2: once turn 2 is cached, turn 1's entry can only ever
    match less, so when another prompt starts it is dropped, and only turn 2 goes to host memory."""
    rt = fresh()
    cache = rt.scheduler.cache
    turn1 = long_text(60)
    e1 = the_entry_of(rt, turn1)
    rt.generate(turn1 + " " + long_text(40), GREEDY)  # shares turn 1's cells, adds 40+ of its own
    idle(rt)
    [e2] = [e for e in cache.entries if e is not e1]
    assert e2.tokens[: len(e1.tokens)] == e1.tokens and e1.resident and e2.resident
    parks = cache.stats["prefix_cache_parks"]
    rt.generate("Other words entirely: " + long_text(50), GREEDY)
    idle(rt)
    assert e1 not in cache.entries and e1.host is None
    assert not e2.resident and e2.host and cache.stats["prefix_cache_parks"] == parks + 1


def test_a_prompt_asked_again_evaluates_nothing_and_samples_what_it_sampled_the_first_time(fresh):
    """The entry keeps its last token's logits: the repeat's first token comes from the very logits
    the first evaluation produced, so seeded sampling (two sequences) gives the same texts again."""
    rt = fresh()
    prompt = long_text(60)
    p = GenerationParams(max_length=20, temperature=1.2, seed=5, num_return_sequences=2)
    first = [c.text for c in rt.generate(prompt, p).completions]
    idle(rt)
    [entry] = rt.scheduler.cache.entries
    assert entry.logits is not None and len(entry.logits) == 4 * rt.model.n_vocab
    before = dict(rt.scheduler.stats)
    assert [c.text for c in rt.generate(prompt, p).completions] == first
    assert rt.scheduler.stats["prompt_tokens_evaluated"] == before["prompt_tokens_evaluated"]
    assert rt.scheduler.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"] == len(entry.tokens)


def test_a_prompt_that_ends_inside_a_cached_one_still_evaluates_its_last_token(fresh):
    """The stored logits belong to the entry's last token only: a shorter prompt that the entry
    begins with gets its own logits from a decode of its last token."""
    rt, plain = fresh(), fresh(n_cache=0)
    longer = long_text(60)
    rt.generate(longer, GREEDY)
    idle(rt)
    shorter = long_text(45)
    n = len(rt.prompt_tokens(shorter, GREEDY))
    before = dict(rt.scheduler.stats)
    got = rt.generate(shorter, GREEDY).completions[0].text
    assert rt.scheduler.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"] == n - 1
    assert rt.scheduler.stats["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == 1
    assert got == plain.generate(shorter, GREEDY).completions[0].text
