"""Prompts and parameters that several runtime tests share."""
from runtime import GenerationParams

GREEDY = GenerationParams(max_length=24, temperature=0.0)
WORDS = "Tokens are pieces of words and a tokenizer splits text into tokens and back again".split()


def long_text(n_words: int) -> str:
    """n_words words of plain text: a prompt of a chosen length (about one token per word)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
