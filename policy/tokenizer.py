"""Offline tokenizers over a small word list (no hub download, no 49k-entry vocabulary).

``write_word_tokenizer``: a real ``transformers.CLIPTokenizer`` read from ``vocab.json`` + ``merges.txt``: the
merges spell each listed word out letter by letter, so a word is one token (or a few, when another word's merge
cuts in first), and unknown words fall back to characters. ``write_t5_tokenizer``: a real ``T5TokenizerFast``
(``tokenizer.json``, as SD3's and FLUX's T5 tokenizers are saved) whose Unigram vocabulary holds each word as one
"▁word" piece and single characters as the fallback, with T5's </s> appended. The embedded model and the tiny test
models use them; SD-scale models load their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5TokenizerFast

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


T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


def write_t5_tokenizer(words: Iterable[str], out_dir: str | Path, max_length: int = 16) -> T5TokenizerFast:
    """Write a T5TokenizerFast for ``words`` into ``out_dir`` (tokenizer.json + config) and return it loaded."""
    pieces = [(tok, 0.0) for tok in T5_SPECIAL] + [("\u2581", -2.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in sorted({w.lower() for w in words if w})]
    pieces += [(ch, -5.0) for ch in LETTERS]  # a character costs more than any whole word
    tok = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL.index("<unk>")))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", T5_SPECIAL.index("</s>"))])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)
    fast.save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)
