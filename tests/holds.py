"""Holding a runtime's worker inside its first decode, so that a test can queue requests behind it."""
from __future__ import annotations

import threading


def hold_first_decode(rt, monkeypatch):
    """Wrap rt.model.decode (the real decode still runs): the first call waits until the test sets
    `gate`, and sets `inside` once the worker is in it. Returns (batches, inside, gate); batches
    collects every decode's entries, (token, position, seq_id, want_logits) each."""
    real, batches = rt.model.decode, []
    inside, gate = threading.Event(), threading.Event()

    def decode(entries):
        batches.append(entries)
        if len(batches) == 1:
            inside.set()
            assert gate.wait(10)
        return real(entries)

    monkeypatch.setattr(rt.model, "decode", decode)
    return batches, inside, gate
