"""Make ``image-reward==1.5`` importable and offline on transformers 4.57 (docs/dependencies.md §3).

What it patches, and why (all idempotent; applied once by ``import_imagereward()``):
1. ``transformers.modeling_utils.apply_chunking_to_forward`` and ``.prune_linear_layer``: ImageReward's BLIP
   ``med.py`` imports them from there; transformers moved them to ``transformers.pytorch_utils``. Re-exposed.
2. ``transformers.modeling_utils.find_pruneable_heads_and_indices``: removed from transformers; ``med.py`` imports
   it but only calls it when pruning attention heads, which scoring never does. A stub that raises if called.
3. ``init_tokenizer`` in ``ImageReward.models.BLIP.blip`` (where it is defined) and ``...blip_pretrain`` (which
   imported it by name): the original calls ``BertTokenizer.from_pretrained('bert-base-uncased')``, a hub download.
   The replacement reads a local directory (or a ``vocab.txt``) chosen with ``local_bert_tokenizer(path)`` around
   the model's construction, and adds the special tokens BLIP expects: ``[DEC]`` as bos and ``[ENC]`` as an
   additional special token, whose id is read with ``convert_tokens_to_ids`` (a plain vocabulary lookup, rather
   than BLIP's ``additional_special_tokens_ids[0]``, whose behaviour has shifted across transformers versions).
Importing ``ImageReward`` also imports its ReFL trainer (diffusers, accelerate, datasets): ~3 s, nothing downloaded.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType

import transformers
import transformers.modeling_utils as modeling_utils
import transformers.pytorch_utils as pytorch_utils
from transformers import BertTokenizer

_tokenizer_source: ContextVar[Path | None] = ContextVar("imagereward_tokenizer_source", default=None)


def _find_pruneable_heads_and_indices(*args, **kwargs):
    raise NotImplementedError("ImageReward compat: pruning attention heads is not supported (scoring never prunes)")


def local_blip_tokenizer(source: str | Path) -> BertTokenizer:
    """BLIP's BERT tokenizer from a local directory or ``vocab.txt``, with BLIP's ``[DEC]``/``[ENC]`` tokens."""
    source = Path(source)
    if source.is_dir():
        tokenizer = BertTokenizer.from_pretrained(str(source), local_files_only=True)
    else:
        tokenizer = BertTokenizer(vocab_file=str(source))  # lower-cases, as bert-base-uncased does
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _init_tokenizer() -> BertTokenizer:
    source = _tokenizer_source.get()
    if source is None:
        raise RuntimeError(
            "ImageReward's tokenizer is local-only here: build the model inside "
            "rewards.imagereward_compat.local_bert_tokenizer(<dir with vocab.txt>)"
        )
    return local_blip_tokenizer(source)


@contextmanager
def local_bert_tokenizer(source: str | Path) -> Iterator[None]:
    """Within this block, ImageReward/BLIP models build their tokenizer from ``source``."""
    token = _tokenizer_source.set(Path(source))
    try:
        yield
    finally:
        _tokenizer_source.reset(token)


def import_imagereward() -> ModuleType:
    """Apply the patches (once) and return the ``ImageReward.ImageReward`` module."""
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices
    verbosity = transformers.logging.get_verbosity()
    # `clip` warns that pkg_resources is deprecated; blip.py silences all warnings and blip_pretrain.py sets
    # transformers' verbosity to error, process-wide, at import: both are undone when the import is over.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # import_module, not `import ImageReward.ImageReward as ...`: the package re-exports the class under the
        # submodule's name, so attribute lookup would return the class
        image_reward = importlib.import_module("ImageReward.ImageReward")
        blip = importlib.import_module("ImageReward.models.BLIP.blip")
        blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    transformers.logging.set_verbosity(verbosity)
    blip.init_tokenizer = _init_tokenizer
    blip_pretrain.init_tokenizer = _init_tokenizer
    return image_reward
