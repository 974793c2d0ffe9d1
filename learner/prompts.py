"""Prompt sources: the embedded world's splits by name, or a UTF-8 text file with one prompt per line."""

from __future__ import annotations

from pathlib import Path

from learner.config import ConfigError

WORLD_SPLIT_SEED = 0


def load_prompts(spec: str) -> list[str]:
    """``world:train`` / ``world:heldout``, or a file path (blank lines and ``#`` comments are skipped)."""
    if spec.startswith("world:"):
        from world.scenes import split_prompts

        train, heldout = split_prompts(WORLD_SPLIT_SEED)
        splits = {"world:train": train, "world:heldout": heldout}
        if spec not in splits:
            raise ConfigError(f"unknown prompt set {spec!r}; use world:train, world:heldout or a file path")
        return list(splits[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt file not found: {path} (one prompt per line, UTF-8)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts (one per line; '#' starts a comment)")
    bad = [i + 1 for i, ln in enumerate(lines) if "\x00" in ln]
    if bad:
        raise ConfigError(f"prompt file {path} has NUL bytes on line {bad[0]}; is it a binary file?")
    return prompts
