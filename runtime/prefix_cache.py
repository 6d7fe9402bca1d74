"""The prefix cache: evaluated prompts kept for reuse, parked in host RAM while no job uses them.

Why park: at every decode step llama.cpp attends over every KV cell up to the highest one in
use (llama_kv_cache::get_n_kv: the highest used cell + 1, rounded up to 256), for every
sequence in the batch, whether a cell belongs to that sequence or not. A cached prompt left
in the unified KV cache keeps its cells, so every later step of every request pays for them:
on TinyLlama-1.1B shapes, two cached 499-token prompts cost about 7% of generation speed
(issue 15). So an entry's cells are in the KV cache only while a job shares them, or while
nothing runs at all: the scheduler parks every idle entry that a starting job does not share
(park_idle), and parks an entry when its last job ends beside other running jobs. An entry
whose last job ends as the server goes idle stays resident, so the next turn of a
conversation (the most common hit) shares its cells without any copy.
Parking copies the cells to host memory with llama_state_seq_get_data (once: an entry's
tokens never change) and removes them from the KV cache. A later hit copies them back with
llama_state_seq_set_data, under the entry's own sequence id, so concurrent jobs with the
same prefix share one set of cells (seq_cp tags cells, it copies nothing).

Cost of a hit on a parked entry: one copy of its K and V, tokens x n_layer x 2 x n_embd_kv
x 2 bytes at F16: 11 MiB for 500 tokens of SmolLM2-135M or TinyLlama-1.1B, 256 MiB for 500
tokens of Llama 2 7B (tens of ms), against re-evaluating the prompt (25 s for 500 tokens of
7B on 2 cores).

Budgets: at most len(seq_ids) entries (each holds a llama.cpp sequence id) and `max_tokens`
tokens in all (the scheduler passes the context size, so the host copies never take more RAM
than the KV cache itself). The least recently used idle entry is evicted first. A short entry
(under min_restore tokens: cheap to evaluate again) is dropped, not parked, when it has to leave
the KV cache, so one is kept only until another request starts.

A hit on the whole of an entry's prompt evaluates nothing: the entry keeps the logits of its last
token (n_vocab float32s: 125 KiB for Llama 2's 32,000 tokens), and the first token is sampled from
them. Evaluating that last token again instead would be done alone, with llama.cpp's matrix-vector
kernels, which sum in another order than the batched kernels that evaluated the prompt, so the
logits, and on close calls the greedy text, would differ from the first time the prompt was asked.

A job that adds only a short tail to an entry it shares (a question after a cached document)
gets no entry of its own; the entry follows it instead (follow): its cells past the shared part
are replaced by the job's, so the next question shares what this one had in common with it, as
llama-server's slot keeps its latest prompt.

Worker thread only, like everything that touches the llama.cpp context.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .model import LlamaModel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CacheEntry:
    seq_id: int                  # llama.cpp sequence id tagging its cells while resident
    tokens: list[int]            # the prompt whose KV these cells hold, position i = tokens[i]
    last_used: float             # monotonic seconds
    pins: int = 0                # running jobs sharing these cells; resident while > 0, never evicted
    resident: bool = True        # its cells are in the KV cache under seq_id (pinned, or idle while nothing runs)
    host: bytearray | None = None  # llama_state_seq_get_data of its cells, once it has been parked
    logits: bytes | None = None  # the logits row of its last token, from the decode that evaluated it


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, model: LlamaModel, seq_ids: list[int], max_tokens: int, min_restore: int):
        self.model = model
        self.max_tokens = max_tokens
        # Shared tokens below which an idle entry is not used (unless a job uses all of it); entries
        # shorter than this are dropped instead of parked.
        self.min_restore = min_restore
        self.entries: list[CacheEntry] = []
        self._free_ids = list(seq_ids)
        # Counters (worker writes, others read one value at a time): hits that restored a parked
        # entry, restores llama.cpp refused (no free cells: the prompt is evaluated instead), parks.
        self.stats = {"prefix_cache_restores": 0, "prefix_cache_restore_failures": 0, "prefix_cache_parks": 0}

    # --- reading ------------------------------------------------------------------

    def best(self, tokens: list[int]) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and how many tokens a job can reuse:
        all of them when an entry holds exactly this prompt and its last logits, else all but the
        last (evaluated to get logits); (None, 0) if none is worth it. Sharing the cells of an
        entry a running job pins is free; using any other entry (parked, or idle and resident)
        keeps all its cells in the KV cache for the job's lifetime, which a few shared tokens
        (BOS, a chat template's opening) do not pay for."""
        best = max(self.entries, key=lambda e: (common_prefix(e.tokens, tokens), self._whole(e, tokens)), default=None)
        if best is None:
            return None, 0
        shared = len(tokens) if self._whole(best, tokens) else min(common_prefix(best.tokens, tokens), len(tokens) - 1)
        # An idle entry that a job would use wholly leaves no cell of it idle: worth it at any length.
        if shared <= 0 or (best.pins == 0 and shared < self.min_restore and not self._whole(best, tokens)):
            return None, 0
        return best, shared

    @staticmethod
    def _whole(entry: CacheEntry, tokens: list[int]) -> bool:
        """The entry is this very prompt, with the logits to sample its first token from."""
        return entry.logits is not None and entry.tokens == tokens

    def resident_cells(self) -> int:
        """KV cells held by entries now (pinned ones, and idle ones while nothing runs)."""
        return sum(len(e.tokens) for e in self.entries if e.resident)

    def pinned_cells(self) -> int:
        """KV cells held by entries that running jobs share: what stays resident once a job starts
        (park_idle moves the others out first)."""
        return sum(len(e.tokens) for e in self.entries if e.pins > 0)

    def host_bytes(self) -> int:
        return sum(len(e.host or b"") + len(e.logits or b"") for e in self.entries)

    def pin_cells(self, entry: CacheEntry) -> int:
        """KV cells a hit on `entry` adds to pinned_cells(): all of its tokens unless a running job
        already shares it (parked, it is copied back; idle and resident, it stays instead of being parked)."""
        return 0 if entry.pins > 0 else len(entry.tokens)

    def has_free_slot(self) -> bool:
        """A sequence id is free: an entry can be added without evicting one."""
        return bool(self._free_ids)

    def holds(self, tokens: list[int]) -> bool:
        return any(e.tokens == tokens for e in self.entries)

    # --- using ----------------------------------------------------------------------

    def share(self, entry: CacheEntry, dst_seq: int, n: int) -> bool:
        """Give sequence dst_seq the entry's first n cells and pin the entry; False (nothing
        changed) if a parked entry could not be put back: llama.cpp found no free cells."""
        if not entry.resident:
            assert entry.host is not None
            if not self.model.set_seq_state(entry.seq_id, entry.host):
                self.model.seq_remove(entry.seq_id)
                self.stats["prefix_cache_restore_failures"] += 1
                log.info("no free KV cells to restore a cached prefix of %d tokens; evaluating it instead", len(entry.tokens))
                return False
            entry.resident = True
            self.stats["prefix_cache_restores"] += 1
        self.model.seq_copy(entry.seq_id, dst_seq, 0, n)
        entry.pins += 1
        entry.last_used = time.monotonic()
        return True

    def add(self, tokens: list[int], src_seq: int, logits_index: int) -> CacheEntry | None:
        """Remember the first len(tokens) cells of src_seq (a finished prompt) as a new entry,
        pinned once (by the job that evaluated it), with its last token's logits (row logits_index
        of the decode that just ended). None if no room can be made."""
        if len(tokens) > self.max_tokens:
            return None
        while not self._free_ids or self._tokens() + len(tokens) > self.max_tokens:
            if not self.evict_lru():
                return None
        entry = CacheEntry(self._free_ids.pop(), list(tokens), time.monotonic(), pins=1,
                           logits=self.model.logits_row(logits_index))
        self.model.seq_copy(src_seq, entry.seq_id, 0, len(tokens))
        self.entries.append(entry)
        return entry

    def follow(self, entry: CacheEntry, tokens: list[int], src_seq: int, shared: int, logits_index: int) -> bool:
        """Make `entry`, whose first `shared` cells a job shares, hold that job's prompt instead: its
        cells past `shared` are dropped and the job's own (from src_seq) take their place, with its
        last token's logits (row logits_index of the decode that just ended). For a job
        that adds a short tail (a question after a cached document): the entry follows the latest
        prompt, as llama-server's slot keeps its last one, with no second copy of the prefix. Not
        while another job shares the entry (its cells are in use), not when the entry would lose
        min_restore tokens or more (a long entry that merely begins like the job: what it would
        lose is worth more than the job's short tail), nor past the token budget."""
        if entry.pins != 1 or not entry.resident or self.holds(tokens):
            return False
        if len(entry.tokens) - shared >= self.min_restore:
            return False
        if self._tokens() - len(entry.tokens) + len(tokens) > self.max_tokens:
            return False
        self.model.seq_remove(entry.seq_id, shared, -1)
        self.model.seq_copy(src_seq, entry.seq_id, shared, len(tokens))
        entry.tokens, entry.host = list(tokens), None  # the old host copy is stale
        entry.logits = self.model.logits_row(logits_index)
        entry.last_used = time.monotonic()
        return True

    def unpin(self, entry: CacheEntry, park: bool) -> None:
        """A job sharing the entry is done with it. The last one out parks it in host memory if
        `park` (other jobs still run, and would attend over its cells); else it stays resident
        until a job that does not share it starts (park_idle)."""
        entry.pins -= 1
        if park and entry.pins == 0 and entry.resident and entry in self.entries:
            self._take_out(entry)

    def park_idle(self, keep: CacheEntry | None = None) -> None:
        """Park every resident entry no job shares, except `keep` (the one a starting job will share).
        An idle entry whose tokens begin another entry's (turn 1 of a chat, once turn 2 is cached)
        is dropped instead: any prompt it matches, the longer one matches at least as far, and a
        host copy of it would cost a copy of its cells (256 MiB per 500 tokens of 7B) for nothing."""
        for e in list(self.entries):
            if e.pins == 0 and e.resident and e is not keep:
                if any(len(o.tokens) > len(e.tokens) and o.tokens[: len(e.tokens)] == e.tokens for o in self.entries):
                    self.evict(e)
                else:
                    self._take_out(e)

    def _take_out(self, entry: CacheEntry) -> None:
        """Out of the KV cache with an idle entry: parked, or dropped if it is short (under
        min_restore tokens): a short prompt is worth keeping while it stays in place, for a
        repeat, not a host copy at every other request's start."""
        if len(entry.tokens) < self.min_restore:
            self.evict(entry)
        else:
            self._park(entry)

    def _park(self, entry: CacheEntry) -> None:
        if entry.host is None:
            entry.host = self.model.seq_state(entry.seq_id)
        self.model.seq_remove(entry.seq_id)
        entry.resident = False
        self.stats["prefix_cache_parks"] += 1

    # --- dropping -------------------------------------------------------------------

    def evict(self, entry: CacheEntry) -> None:
        assert entry.pins == 0, "a pinned entry's cells are shared by a running job"
        if entry.resident:
            self.model.seq_remove(entry.seq_id)
        self.entries.remove(entry)
        self._free_ids.append(entry.seq_id)

    def evict_lru(self) -> bool:
        victims = [e for e in self.entries if e.pins == 0]
        if not victims:
            return False
        self.evict(min(victims, key=lambda e: e.last_used))
        return True

    def clear(self) -> None:
        """Forget every entry, pinned or not (after a failed decode, with the KV cache cleared)."""
        for e in self.entries:
            e.pins = 0
            self._free_ids.append(e.seq_id)
        self.entries.clear()

    def _tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)
