"""``python -m learner.data import``: a preference dataset on disk → the project's offline pair format.

``--format pickapic`` reads Pick-a-Pic v2's parquet shards as published (``caption``, ``jpg_0``/``jpg_1`` encoded
image bytes, ``label_0``/``label_1`` in {0, 0.5, 1}, ids ``ranking_id``, ``image_0_uid``, ``image_1_uid``);
``--format folder`` reads a CSV ``prompt,image_a,image_b,preferred`` (image paths relative to the CSV, preferred
``a`` or ``b``). Each pair is decoded, resized and centre-cropped to the model's resolution, and encoded by the
model's VAE (the posterior mean × scaling factor, Diffusion-DPO's training input) into a ``clean`` pair record
(actors/records.py), so ``--data.offline_dataset <out>`` trains Diffusion-DPO from it.
The pipeline runs on Ray Data: read → ``map_batches`` with the VAE in a pool of actors (``--concurrency``, GPUs
with ``--num-gpus``), so the same command scales out on a cluster. Ties are dropped unless ``--keep-ties``; a
bad row (undecodable image, missing caption, unknown label values) is counted and written with its id and reason
to ``bad_rows.jsonl``, never dropped silently and never fatal. The output appears atomically: it is written
under a temporary name beside ``--out`` and renamed over it at the end (a rerun replaces it whole).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from actors.records import TrajectoryLog, to_record_batch

ROWS_PER_FILE = 1024  # one Parquet partition (round=<n>) per this many pairs
ID_COLUMNS = ("ranking_id", "image_0_uid", "image_1_uid")


class DatasetError(ValueError):
    """The source cannot be imported at all (no files, missing columns); one line."""


# ---- reading -------------------------------------------------------------------------------------------------
def pickapic_paths(source: str) -> list[str]:
    """Parquet shards of a directory (recursively) or a glob."""
    path = Path(source)
    found = sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else sorted(glob.glob(source))
    if not found:
        raise DatasetError(f"no parquet files at {source!r} (a directory of Pick-a-Pic shards or a glob)")
    return found


def folder_rows(csv_path: str) -> list[dict[str, Any]]:
    """Rows of a ``prompt,image_a,image_b,preferred`` CSV in the Pick-a-Pic column layout (bytes read later)."""
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"CSV not found: {csv_path} (columns: prompt,image_a,image_b,preferred)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "image_a", "image_b", "preferred"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)} (need prompt,image_a,image_b,preferred)")
        rows = []
        for i, r in enumerate(reader):
            pref = (r["preferred"] or "").strip().lower()
            labels = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}.get(pref, (math.nan, math.nan))
            rows.append({"caption": r["prompt"], "jpg_0": str(path.parent / r["image_a"]),
                         "jpg_1": str(path.parent / r["image_b"]), "label_0": labels[0], "label_1": labels[1],
                         "ranking_id": i, "image_0_uid": r["image_a"], "image_1_uid": r["image_b"]})
    return rows


# ---- the map stage: decode, resize, encode ---------------------------------------------------------------------
def _image(data: Any, size: int) -> np.ndarray:
    """Encoded image bytes (or a file path) → float32 [3, size, size] in [-1, 1]: shorter side resized to
    ``size``, then centre-cropped (Diffusion-DPO's Resize + CenterCrop)."""
    from PIL import Image

    raw = Path(data).read_bytes() if isinstance(data, str) else bytes(data)
    with Image.open(io.BytesIO(raw)) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def _labels(l0: Any, l1: Any, keep_ties: bool) -> tuple[int, float, float] | str:
    """(index of the preferred image, its label, the other's) or the reason the row is not a pair."""
    try:
        pair = (float(l0), float(l1))
    except (TypeError, ValueError):
        return f"unknown label values ({l0}, {l1})"
    if pair == (1.0, 0.0):
        return 0, 1.0, 0.0
    if pair == (0.0, 1.0):
        return 1, 1.0, 0.0
    if pair == (0.5, 0.5):
        return (0, 0.5, 0.5) if keep_ties else "tie"
    return f"unknown label values ({l0}, {l1})"


class Encoder:
    """A Ray Data actor: holds the model once and turns a batch of source rows into latents, or reasons."""

    def __init__(self, model: str, keep_ties: bool):
        import torch

        from policy.components import load_components

        torch.set_num_threads(1)
        self.c, self.keep_ties = load_components(model, "auto"), keep_ties
        side = self.c.denoiser.sample_size
        self.latent = (self.c.vae.config.latent_channels, side, side)
        self.size = side * self.c.vae_scale_factor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["caption"])
        images, reasons = np.zeros((n, 2, 3, self.size, self.size), np.float32), [""] * n
        winner, r_w, r_l = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, np.float32)
        for i in range(n):
            caption = batch["caption"][i]
            labels = _labels(batch["label_0"][i], batch["label_1"][i], self.keep_ties)
            if not isinstance(caption, str) or not caption.strip():
                reasons[i] = "missing caption"
            elif isinstance(labels, str):
                reasons[i] = labels
            else:
                winner[i], r_w[i], r_l[i] = labels
                for j, column in enumerate(("jpg_0", "jpg_1")):
                    try:
                        images[i, j] = _image(batch[column][i], self.size)
                    except Exception as e:  # any decoding failure is this row's, never the import's
                        reasons[i] = f"undecodable {column}: {type(e).__name__}: {str(e)[:100]}"
                        break
        ok = np.array([not r for r in reasons])
        latents = np.zeros((n, 2, *self.latent), np.float32)
        if ok.any():
            x = torch.from_numpy(images[ok]).flatten(0, 1).to(self.c.vae.device, self.c.vae.dtype)
            with torch.no_grad():
                z = self.c.to_latents(x)  # posterior mean, shifted (SD3, FLUX) and scaled
            latents[ok] = z.float().cpu().numpy().reshape(int(ok.sum()), 2, *z.shape[1:])
        rows = np.arange(n)
        return {"caption": np.array([c if isinstance(c, str) else "" for c in batch["caption"]], dtype=object),
                "reason": np.array(reasons, dtype=object), "reward_w": r_w, "reward_l": r_l,
                "x0_w": latents[rows, winner], "x0_l": latents[rows, 1 - winner],
                **{k: np.array([str(v) for v in batch[k]], dtype=object) for k in ID_COLUMNS if k in batch}}


# ---- the import ------------------------------------------------------------------------------------------------
def import_pairs(fmt: str, source: str, out: str | Path, model: str = "world/model", keep_ties: bool = False,
                 batch_size: int = 64, concurrency: int = 1, num_gpus: float = 0.0, progress: bool = True
                 ) -> dict[str, Any]:
    """Import ``source`` into ``out`` (replaced atomically); returns the summary also written to import.json."""
    import ray
    from tqdm import tqdm

    from policy.components import check_model_dir

    check_model_dir(model)
    out = Path(out).resolve()
    if fmt == "pickapic":
        paths = pickapic_paths(source)
    elif fmt == "folder":
        items = folder_rows(source)
    else:
        raise DatasetError(f"--format must be pickapic or folder, got {fmt!r}")
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar, ours, with rows/s
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    counts = {"pairs": 0, "bad_rows": 0, "ties_dropped": 0}
    t0 = time.perf_counter()
    try:
        if fmt == "pickapic":
            ds = ray.data.read_parquet(paths)
            missing = {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} - set(ds.schema().names)
            if missing:
                raise DatasetError(f"{source}: missing Pick-a-Pic columns {sorted(missing)}")
            ds = ds.select_columns([c for c in ds.schema().names if c in {"caption", "jpg_0", "jpg_1", "label_0",
                                                                            "label_1", *ID_COLUMNS}])
        else:
            ds = ray.data.from_items(items)
        total = ds.count()
        encoded = ds.map_batches(Encoder, fn_constructor_kwargs={"model": str(model), "keep_ties": keep_ties},
                                 batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                                 num_gpus=num_gpus,
                                 batch_format="numpy")
        log, pending, part = TrajectoryLog(tmp), [], 0
        tmp.mkdir(parents=True)
        with (tmp / "bad_rows.jsonl").open("w") as bad, tqdm(total=total, unit="rows", disable=not progress,
                                                              desc="import") as bar:
            for batch in encoded.iter_batches(batch_format="numpy", batch_size=None):
                n = len(batch["reason"])
                for i in np.flatnonzero(batch["reason"] != ""):
                    if batch["reason"][i] == "tie":
                        counts["ties_dropped"] += 1
                        continue
                    counts["bad_rows"] += 1
                    ids = {k: batch[k][i] for k in ID_COLUMNS if k in batch}
                    bad.write(json.dumps({**ids, "reason": batch["reason"][i]}) + "\n")
                good = np.flatnonzero(batch["reason"] == "")
                pending.append({k: batch[k][good] for k in ("caption", "x0_w", "x0_l", "reward_w", "reward_l",
                                                             "ranking_id") if k in batch})
                while sum(len(p["caption"]) for p in pending) >= ROWS_PER_FILE:
                    pending, part = _flush(log, pending, part, ROWS_PER_FILE, counts)
                bar.update(n)
                bar.set_postfix(pairs=counts["pairs"], bad=counts["bad_rows"])
            _flush(log, pending, part, None, counts)
        seconds = time.perf_counter() - t0
        summary = {"source": source, "format": fmt, "model": str(model), "rows": total, **counts,
                   "seconds": round(seconds, 2), "rows_per_s": round(total / seconds, 1)}
        (tmp / "import.json").write_text(json.dumps(summary, indent=2))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owns_ray:
            ray.shutdown()
    return summary


def _flush(log: TrajectoryLog, pending: list[dict], part: int, size: int | None, counts: dict) -> tuple[list, int]:
    """Write the first ``size`` pending rows (all when None) as partition ``round=part``."""
    rows = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]} if pending else {}
    if not rows or not len(rows["caption"]):
        return [], part
    size = len(rows["caption"]) if size is None else size
    head = {k: v[:size] for k, v in rows.items()}
    ids = head.get("ranking_id")
    prompt_id = np.array([int(v) if str(v).lstrip("-").isdigit() else -1 for v in ids]) if ids is not None \
        else np.full(size, -1)
    log.write(to_record_batch("clean", {
        "prompt": [str(c) for c in head["caption"]], "prompt_id": prompt_id, "x0_w": head["x0_w"],
        "x0_l": head["x0_l"], "reward_w": head["reward_w"], "reward_l": head["reward_l"],
        "actor_id": np.zeros(size, np.int32), "round": np.full(size, part)}), round=part, actor_id=0)
    counts["pairs"] += size
    rest = {k: v[size:] for k, v in rows.items()}
    return ([rest] if len(rest["caption"]) else []), part + 1


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` over ``out``: a reader sees the old import or the new one, never a mix."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="a preference dataset -> clean pair records (--data.offline_dataset)")
    p.add_argument("source", help="pickapic: a directory of parquet shards or a glob; folder: the CSV file")
    p.add_argument("--format", required=True, choices=["pickapic", "folder"])
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--model", default="world/model", help="the model whose VAE encodes the images")
    p.add_argument("--keep-ties", action="store_true", help="keep label 0.5/0.5 rows (dropped by default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="VAE actors in the Ray Data pool")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per VAE actor")
    args = parser.parse_args(argv)
    from policy.components import ModelPathError

    try:
        s = import_pairs(args.format, args.source, args.out, args.model, args.keep_ties, args.batch_size,
                         args.concurrency, args.num_gpus)
    except (DatasetError, ModelPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {s['pairs']} pairs from {s['rows']} rows in {s['seconds']:.1f} s ({s['rows_per_s']} rows/s); "
          f"ties dropped: {s['ties_dropped']}, bad rows: {s['bad_rows']}"
          + (f" (see {Path(args.out) / 'bad_rows.jsonl'})" if s["bad_rows"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
