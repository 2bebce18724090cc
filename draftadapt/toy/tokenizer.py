"""The toy workload's word-level tokenizer, built offline and saved as an HF tokenizer.

Every word of the toy task and its chat domain is one token: specials, symbols, the numbers
0..99 and 1000 pronounceable pseudo-words. Knows nothing of the task's grammar.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = SPECIALS
SYMBOLS = [
    "Q:", "A:", "+", "-", "*", "=", ".", ",", ";", ":", "?", "(", ")",
    "User:", "Assistant:", "step", "so", "then", "is", "the", "answer", "we", "get", "first",
    "next", "finally", "value", "result", "Therefore", "Let", "us", "compute", "and", "now",
    "take", "add", "subtract", "multiply", "by", "from", "to", "gives", "of",
]
NUMBERS = [str(i) for i in range(100)]
N_WORDS = 1000


def pseudo_words(n: int = N_WORDS, seed: int = 0) -> list[str]:
    """`n` distinct pronounceable words (consonant-vowel syllables), the same for a given seed."""
    onsets = "b d f g k l m n p r s t v z".split()
    vowels = "a e i o u".split()
    syllables = [c + v for c, v in itertools.product(onsets, vowels)]
    rng = random.Random(seed)
    words: list[str] = []
    seen = set(SYMBOLS)
    while len(words) < n:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def vocabulary() -> list[str]:
    """The full token list in id order: specials, symbols, numbers, pseudo-words."""
    return SPECIALS + SYMBOLS + NUMBERS + pseudo_words()


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over `vocabulary()` (whitespace split, one word = one id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )


def save_tokenizer(out_dir: str | Path):
    """Write tokenizer.json + tokenizer_config.json to `out_dir` and return the tokenizer."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
