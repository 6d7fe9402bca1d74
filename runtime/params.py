"""The request that travels from the HTTP edge (or the CLI) to the runtime.

Validation happens at the boundary (server/validation.py, the CLI); the runtime
trusts a GenerationParams it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "eos", "stop", "cancelled"]


@dataclass(frozen=True)
class GenerationParams:
    max_length: int = 100            # new tokens to generate at most (the seed's default: 100)
    temperature: float = 1.0         # 0.0 = greedy; otherwise logits are divided by it
    top_p: float = 1.0               # nucleus mass kept; 1.0 (and 0.0, the seed's odd default) = disabled
    top_k: int = 50                  # keep the k most likely tokens; 0 = disabled
    num_return_sequences: int = 1    # independent completions sampled from one prompt evaluation
    repetition_penalty: float = 1.0  # HF/CTRL penalty on tokens already in prompt + output; 1.0 = none
    presence_penalty: float = 0.0    # OpenAI: subtracted once from the logit of every token already
                                     # generated (prompt not counted); 0.0 = none, < 0 encourages reuse
    frequency_penalty: float = 0.0   # OpenAI: subtracted from a token's logit once per time it was
                                     # already generated (prompt not counted); 0.0 = none
    seed: int | None = None          # None = a fresh random seed per request; same seed -> same list
    stop: tuple[str, ...] = ()       # generation of a sequence ends before the first of these strings
    system_prompt: str | None = None  # chat models only: the system turn of the model's chat template
    grammar: str | None = None       # GBNF (llama.cpp grammar) text, start rule "root": every sampled
                                     # token must keep the output a prefix of the language (EOS only once
                                     # it is complete); None = unconstrained. runtime/grammar.py makes it
                                     # from a JSON schema; runtime.model.check_grammar() parses it


@dataclass
class Completion:
    text: str                  # the completion alone (no prompt), decoded as UTF-8
    prompt_tokens: int         # tokens the prompt occupied, BOS and chat markup included
    generated_tokens: int      # new tokens sampled (the stop string's tokens included, EOS excluded)
    finish_reason: FinishReason


@dataclass
class Result:
    completions: list[Completion] = field(default_factory=list)
    seed: int = 0              # the seed actually used (drawn at random when the request gave none)
