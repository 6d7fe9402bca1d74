"""Meta's Llama 2 chat format.

One user turn:            <s>[INST] {user} [/INST]
With a system prompt:     <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]

BOS is a token id prepended by the tokenizer, never the text "<s>": a user who
types "<s>" or "</s>" gets those characters, not control tokens. This matches
Meta's reference `chat_completion` in llama/generation.py.
"""
from __future__ import annotations

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def format_user_turn(prompt: str, system_prompt: str | None = None) -> str:
    """The text of one [INST] turn, without BOS (the caller adds the BOS token id)."""
    user = prompt.strip()
    if system_prompt is not None and system_prompt.strip():
        user = f"{B_SYS}{system_prompt.strip()}{E_SYS}{user}"
    return f"{B_INST} {user} {E_INST}"


def is_chat_model(name: str) -> bool:
    """Llama 2 chat fine-tunes are named '*-chat*' by Meta and by our store ids."""
    return "chat" in name.lower()
