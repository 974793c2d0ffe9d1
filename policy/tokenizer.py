"""An offline CLIP tokenizer over a small word list (no hub download, no 49k-entry vocabulary).

It is a real ``transformers.CLIPTokenizer`` read from ``vocab.json`` + ``merges.txt``: the merges spell each
listed word out letter by letter, so a word is one token (or a few, when another word's merge cuts in
first), and unknown words fall back to characters. The embedded model and the tiny test models use it;
SD-scale models load their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def write_word_tokenizer(words: Iterable[str], out_dir: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for ``words`` into ``out_dir`` and return the loaded tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in LETTERS:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if w}):
        symbols = [*word[:-1], word[-1] + "</w>"]
        for ch in symbols:
            add(ch)
        while len(symbols) > 1:  # merge left to right: ((a b) c)... ; each merge yields a new token
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            add(symbols[0])
    for tok in SPECIAL:
        add(tok)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(out)
    return tok
