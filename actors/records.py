"""The Arrow record format of preference pairs, and the Parquet trajectory log.

Rollout actors turn pairs into Arrow record batches (what travels to the learner through Ray's object
store) and may append them to a hive-partitioned Parquet dataset (replay, off-policy epochs, audit).
Two pair kinds:

- ``step``: TailorPO pairs, two children x_{t-1} of one x_t, one row per pair;
- ``trajectory``: two whole chains x_T..x_0 per prompt, ranked by the final reward (Diffusion-DPO,
  dense-reward DPO);
- ``clean``: two clean latents x_0 per prompt, encoded by the VAE from a preference dataset's images
  (``python -m learner.data import``); reward_w/reward_l hold the dataset's labels. Diffusion-DPO's own data.

Step and trajectory records may also carry the reference's log-probs (``reference.compute_on: actors``): all of
``reference_columns(kind)`` or none, so records and logs written without them still read, and train with the
reference computed by the learner.

Tensor columns use Arrow's canonical fixed-shape tensor extension type, which round-trips through
Parquet and the IPC stream format (checked with pyarrow 26.0.1): the shape lives in the type, so a
table describes itself.

Memory: ``to_record_batch`` copies its inputs once, so a record never aliases a tensor the actor goes
on writing. ``from_table`` reads Arrow buffers zero-copy into NumPy views; those are read-only (Arrow
buffers are immutable and may sit in Ray's read-only shared memory), so it copies exactly once: the
host-to-device transfer when ``device`` is not the CPU, else a CPU copy so that the tensors are
writable and own their memory. ``iterate_batches`` gathers each mini-batch straight from the zero-copy
views, which is its one copy.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

PAIR_KINDS = ("step", "trajectory", "clean")
FORMAT_VERSION = "1"
_TENSOR = pa.FixedShapeTensorType

# (name, Arrow value type, role). Roles give a tensor column's row shape from the latent shape
# L = (C, h, w) and the sampler's step count N: "latent" -> L, "chain" -> (N + 1, *L) (x_T..x_0),
# "steps" -> (N,). Timesteps are float32, whatever the noise process's t is (policy/process.py): DDIM's integer
# index (exact below 2**24; Arrow refuses larger integers) or a flow's continuous t.
_STRING, _F32, _I16, _I32, _I64 = pa.string(), pa.float32(), pa.int16(), pa.int32(), pa.int64()
_COLUMNS: dict[str, tuple[tuple[str, pa.DataType, str], ...]] = {
    "step": (
        ("prompt", _STRING, "scalar"),
        ("prompt_id", _I64, "scalar"),
        ("seed", _I64, "scalar"),
        ("step_index", _I16, "scalar"),
        ("timestep", _F32, "scalar"),
        ("x_t", _F32, "latent"),
        ("x_w", _F32, "latent"),
        ("x_l", _F32, "latent"),
        ("x0_w", _F32, "latent"),
        ("x0_l", _F32, "latent"),
        ("reward_w", _F32, "scalar"),
        ("reward_l", _F32, "scalar"),
        ("logp_w", _F32, "scalar"),
        ("logp_l", _F32, "scalar"),
        ("guided", pa.bool_(), "scalar"),
        ("policy_version", _I64, "scalar"),
        ("actor_id", _I32, "scalar"),
        ("round", _I64, "scalar"),
    ),
    "trajectory": (
        ("prompt", _STRING, "scalar"),
        ("prompt_id", _I64, "scalar"),
        ("seed_w", _I64, "scalar"),
        ("seed_l", _I64, "scalar"),
        ("latents_w", _F32, "chain"),
        ("latents_l", _F32, "chain"),
        ("logps_w", _F32, "steps"),
        ("logps_l", _F32, "steps"),
        ("timesteps", _F32, "steps"),
        ("reward_w", _F32, "scalar"),
        ("reward_l", _F32, "scalar"),
        ("policy_version", _I64, "scalar"),
        ("actor_id", _I32, "scalar"),
        ("round", _I64, "scalar"),
    ),
    "clean": (
        ("prompt", _STRING, "scalar"),
        ("prompt_id", _I64, "scalar"),
        ("x0_w", _F32, "latent"),
        ("x0_l", _F32, "latent"),
        ("reward_w", _F32, "scalar"),
        ("reward_l", _F32, "scalar"),
        ("actor_id", _I32, "scalar"),
        ("round", _I64, "scalar"),
    ),
}


# Reference log-probs computed by the rollout actors (``reference.compute_on: actors``): log π_ref of each stored
# transition in float64 (the learner subtracts its own log π_θ from it, and in float32 that difference of two
# large sums would lose the log-ratio; docs/math.md) and the reference version that computed them. A record holds
# all of them or none (records from ``compute_on: learner`` runs, and logs written before they existed).
_F64 = pa.float64()
_REFERENCE: dict[str, tuple[tuple[str, pa.DataType, str], ...]] = {
    "step": (("ref_logp_w", _F64, "scalar"), ("ref_logp_l", _F64, "scalar"), ("ref_version", _I64, "scalar")),
    "trajectory": (("ref_logps_w", _F64, "steps"), ("ref_logps_l", _F64, "steps"), ("ref_version", _I64, "scalar")),
}


def reference_columns(kind: str) -> tuple[str, ...]:
    """Names of the optional reference columns of ``kind`` (none for clean pairs)."""
    return tuple(name for name, _, _ in _REFERENCE.get(kind, ()))


def _columns(kind: str, names: Iterable[str] = ()) -> tuple[tuple[str, pa.DataType, str], ...]:
    """The columns of ``kind``, with the reference columns when ``names`` holds any of them."""
    if kind not in _COLUMNS:
        raise ValueError(f"unknown pair kind {kind!r}; allowed: {', '.join(PAIR_KINDS)}")
    with_ref = bool(set(names) & set(reference_columns(kind)))
    return _COLUMNS[kind] + (_REFERENCE[kind] if with_ref else ())


def _field_type(
    dtype: pa.DataType, role: str, latent_shape: tuple[int, ...], num_steps: int | None
) -> pa.DataType:
    if role == "scalar":
        return dtype
    if role == "latent":
        return pa.fixed_shape_tensor(dtype, latent_shape)
    return pa.fixed_shape_tensor(dtype, (num_steps + 1, *latent_shape) if role == "chain" else (num_steps,))


def _check_names(kind: str, names: Iterable[str]) -> None:
    names = list(names)
    expected = [name for name, _, _ in _columns(kind, names)]
    missing, extra = [n for n in expected if n not in names], [n for n in names if n not in expected]
    if missing or extra:
        raise ValueError(f"{kind} records: missing columns {missing}, unexpected columns {extra}")


def schema(kind: str, latent_shape: tuple[int, ...], num_steps: int | None = None, reference: bool = False
           ) -> pa.Schema:
    """The record schema of one kind; ``num_steps`` (N) sizes trajectory columns, step records ignore it;
    ``reference``: with the reference log-prob columns."""
    columns = _columns(kind, reference_columns(kind) if reference else ())
    latent_shape = tuple(latent_shape)
    if not latent_shape or not all(isinstance(d, int) and d > 0 for d in latent_shape):
        raise ValueError(f"latent_shape must be positive ints like (C, h, w), got {latent_shape}")
    if kind == "trajectory" and not (isinstance(num_steps, int) and num_steps > 0):
        raise ValueError(f"trajectory records need num_steps as a positive int, got {num_steps!r}")
    fields = [
        pa.field(name, _field_type(dtype, role, latent_shape, num_steps), nullable=False)
        for name, dtype, role in columns
    ]
    return pa.schema(fields, metadata={"kind": kind, "format_version": FORMAT_VERSION})


def _infer_schema(kind: str, row_shapes: dict[str, tuple[int, ...]]) -> tuple[pa.Schema, str]:
    """The schema implied by the first tensor column (x_t, or latents_w with its N + 1 chain length)."""
    name, _, role = next(c for c in _columns(kind) if c[2] != "scalar")
    shape = row_shapes[name]
    reference = bool(set(row_shapes) & set(reference_columns(kind)))
    if role == "latent":
        latent_shape, num_steps = shape, None
    else:
        latent_shape, num_steps = shape[1:], shape[0] - 1 if shape else None
    try:
        return schema(kind, latent_shape, num_steps, reference), name
    except ValueError as err:
        raise ValueError(f"column {name!r} has rows of shape {list(shape)}: {err}") from None


def _as_numpy(name: str, value: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """A fresh host copy of a numeric column (bf16 widened to float32, which NumPy lacks)."""
    if isinstance(value, torch.Tensor):
        dtype = torch.float32 if value.dtype == torch.bfloat16 else value.dtype
        return value.detach().to("cpu", dtype, copy=True).numpy()
    array = np.array(value, copy=True)
    if array.dtype == object or array.dtype.kind in "USV":
        raise ValueError(f"column {name!r} is not numeric (got NumPy dtype {array.dtype})")
    return array


def _column_to_arrow(name: str, values: np.ndarray | list, field: pa.Field) -> pa.Array:
    """Torch/NumPy -> Arrow for every column, by Arrow's safe casts (no int overflow, no float truncation)."""
    try:
        if not isinstance(field.type, _TENSOR):
            return pa.array(values, type=field.type)
        flat = pa.array(values.reshape(-1), type=field.type.value_type)
        storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(field.type.shape)))
        return pa.ExtensionArray.from_storage(field.type, storage)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"column {name!r} cannot be stored as {field.type}: {err}") from None


def to_record_batch(kind: str, columns: dict[str, torch.Tensor | list | np.ndarray]) -> pa.RecordBatch:
    """One Arrow record batch of ``kind`` pairs, each column holding B rows (tensor columns stacked [B, ...]).

    The latent shape (and N for trajectories) is read off the first tensor column; all others must agree.
    """
    _check_names(kind, columns)
    values: dict[str, np.ndarray | list] = {}
    for name, _, _ in _columns(kind, columns):
        value = columns[name]
        if name == "prompt":
            if isinstance(value, torch.Tensor) or not all(isinstance(p, str) for p in value):
                raise ValueError("column 'prompt' must be a list of str")
            values[name] = list(value)
        else:
            values[name] = _as_numpy(name, value)
    rows = len(values["prompt"])
    for name, value in values.items():
        if len(value) != rows:
            raise ValueError(f"column {name!r} has {len(value)} rows, 'prompt' has {rows}")
    row_shapes = {n: tuple(v.shape[1:]) if isinstance(v, np.ndarray) else () for n, v in values.items()}
    record_schema, source = _infer_schema(kind, row_shapes)
    for field in record_schema:
        got, want = row_shapes[field.name], tuple(getattr(field.type, "shape", ()))
        if got != want:
            raise ValueError(
                f"column {field.name!r} has rows of shape {list(got)}, expected {list(want)} "
                f"(shapes follow column {source!r})"
            )
    arrays = [_column_to_arrow(f.name, values[f.name], f) for f in record_schema]
    return pa.RecordBatch.from_arrays(arrays, schema=record_schema)


def _record_kind(record_schema: pa.Schema) -> str:
    """Check a schema against the format and return its kind; raises one line naming what is wrong."""
    meta = record_schema.metadata or {}
    if b"kind" not in meta:
        raise ValueError("not a pair record: its schema has no 'kind' metadata (use to_record_batch)")
    kind = meta[b"kind"].decode()
    version = meta.get(b"format_version", b"").decode()
    if version != FORMAT_VERSION:
        raise ValueError(f"record format_version {version!r} unsupported, this code reads {FORMAT_VERSION}")
    _check_names(kind, record_schema.names)
    shapes = {f.name: tuple(f.type.shape) for f in record_schema if isinstance(f.type, _TENSOR)}
    tensor_names = [name for name, _, role in _columns(kind, record_schema.names) if role != "scalar"]
    if not all(n in shapes for n in tensor_names):
        raise ValueError(f"{kind} records: columns {tensor_names} must be fixed-shape tensors")
    expected, source = _infer_schema(kind, shapes)
    for field in expected:
        got = record_schema.field(field.name).type
        if got != field.type:
            raise ValueError(
                f"column {field.name!r} has type {got}, expected {field.type} (shapes follow {source!r})"
            )
    return kind


def _column_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow -> NumPy for every numeric column: a zero-copy, read-only view of a single chunk; several
    chunks (one per Parquet file) are concatenated, and bools unpacked, into a new writable array."""
    if isinstance(column, pa.ChunkedArray):
        chunks = [_column_to_numpy(chunk) for chunk in column.chunks]
        if len(chunks) != 1:
            return np.concatenate(chunks) if chunks else _column_to_numpy(column.combine_chunks())
        return chunks[0]
    if isinstance(column.type, _TENSOR):
        return column.to_numpy_ndarray()
    return column.to_numpy(zero_copy_only=False)


def _numpy_columns(table: pa.Table | pa.RecordBatch) -> tuple[str, dict[str, np.ndarray], list[str]]:
    kind = _record_kind(table.schema)
    arrays = {name: _column_to_numpy(table.column(name)) for name, _, _ in _columns(kind, table.schema.names)
              if name != "prompt"}
    return kind, arrays, table.column("prompt").to_pylist()


def _to_torch(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One copy at most: the device transfer, or on the CPU a copy of a read-only (Arrow-owned) view."""
    if device.type == "cpu":
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


@dataclass
class PairBatch:
    """Pairs as torch tensors: tensor columns stacked [B, ...], scalar columns 1-D [B]; prompts as str."""

    kind: str
    tensors: dict[str, torch.Tensor]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, parts: int) -> list[PairBatch]:
        """At most ``parts`` contiguous, non-empty chunks of nearly equal size (views; gradient accumulation)."""
        bounds = np.linspace(0, len(self), min(parts, len(self)) + 1).round().astype(int).tolist()
        return [PairBatch(self.kind, {k: t[a:b] for k, t in self.tensors.items()}, self.prompts[a:b])
                for a, b in itertools.pairwise(bounds)]


def from_table(table: pa.Table | pa.RecordBatch, device: str | torch.device = "cpu") -> PairBatch:
    """A record table/batch as torch tensors on ``device`` (the module docstring says which copy is made)."""
    device = torch.device(device)
    kind, arrays, prompts = _numpy_columns(table)
    return PairBatch(kind, {name: _to_torch(a, device) for name, a in arrays.items()}, prompts)


def iterate_batches(
    table: pa.Table | pa.RecordBatch, batch_size: int, seed: int, device: str | torch.device = "cpu"
) -> Iterator[PairBatch]:
    """One epoch of shuffled mini-batches: every row exactly once, the last batch possibly short.

    The order depends only on ``seed`` (NumPy's PCG64); pass e.g. ``seed + epoch`` for a new order each epoch.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    kind, arrays, prompts = _numpy_columns(table)
    order = np.random.default_rng(seed).permutation(len(prompts))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tensors = {name: _to_torch(a[rows], device) for name, a in arrays.items()}
        yield PairBatch(kind, tensors, [prompts[i] for i in rows])


_ROUND_DIR = re.compile(r"round=(\d+)")
_PARTITIONING = ds.partitioning(pa.schema([("kind", pa.string()), ("round", pa.int64())]), flavor="hive")


class TrajectoryLog:
    """An append-only Parquet log: ``root/kind=<kind>/round=<round:06d>/part-<actor>-<uuid8>.parquet``.

    Each file appears atomically (written under a dot-prefixed temp name in its directory, fsynced,
    then ``os.replace``d), so readers never see a half file; only ``part-*.parquet`` files are ever
    read, which skips temp files a crash left behind and any other stray file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _files(self) -> list[tuple[str, int, Path]]:
        """(kind, round, path) of every record file, sorted by kind, round, then name."""
        found = []
        for kind in PAIR_KINDS:
            for round_dir in (self.root / f"kind={kind}").glob("round=*"):
                rnd = _ROUND_DIR.fullmatch(round_dir.name)
                if rnd:
                    found += [(kind, int(rnd[1]), path) for path in round_dir.glob("part-*.parquet")]
        return sorted(found)

    def write(self, batch: pa.RecordBatch | pa.Table, round: int, actor_id: int) -> Path:
        """Append one batch as a new Parquet file; its round/actor_id columns must equal the arguments."""
        kind = _record_kind(batch.schema)
        for arg, value in (("round", round), ("actor_id", actor_id)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrajectoryLog.write: {arg} must be a non-negative int, got {value!r}")
            if batch.num_rows and not pc.all(pc.equal(batch.column(arg), value)).as_py():
                raise ValueError(f"TrajectoryLog.write: column {arg!r} holds values other than {arg}={value}")
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        directory = self.root / f"kind={kind}" / f"round={round:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{actor_id}-{uuid.uuid4().hex[:8]}.parquet"
        final, temp = directory / name, directory / f".{name}.tmp"
        try:
            with open(temp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        return final

    def rounds(self) -> list[int]:
        """Rounds holding at least one record file, of any kind, ascending."""
        return sorted({rnd for _, rnd, _ in self._files()})

    def position(self) -> int:
        """How many rounds the log holds: what a checkpoint stores, to resume with ``truncate_after``."""
        return len(self.rounds())

    def truncate_after(self, round: int) -> list[int]:
        """Delete every round partition past ``round`` (all kinds, temp files too); returns those rounds."""
        removed = set()
        for kind in PAIR_KINDS:
            for round_dir in (self.root / f"kind={kind}").glob("round=*"):
                rnd = _ROUND_DIR.fullmatch(round_dir.name)
                if rnd and int(rnd[1]) > round:
                    shutil.rmtree(round_dir)
                    removed.add(int(rnd[1]))
        return sorted(removed)

    def describe(self) -> tuple[str, int]:
        """(record kind, rows) from the Parquet footers alone; ValueError naming the first unreadable file, a
        schema that differs between files, or a log without records."""
        files = [path for _, _, path in self._files()]
        if not files:
            raise ValueError(f"no trajectory records under {self.root} (expected kind=<kind>/round=<n>/part-*.parquet)")
        rows, schema = 0, None
        for path in files:
            try:
                this, rows = pq.read_schema(path), rows + pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
            if schema is not None and not this.equals(schema):
                raise ValueError(f"{path} has another record schema than {files[0]}")
            schema = this
        try:
            return _record_kind(schema), rows
        except ValueError as e:
            raise ValueError(f"{files[0]}: {e}") from None

    def read(self, rounds: Iterable[int] | None = None, kind: str | None = None) -> pa.Table:
        """The records of ``kind`` (needed if the log holds several kinds) in ``rounds`` (default: all)."""
        files = self._files()
        if not files:
            raise ValueError(f"no trajectory records under {self.root}")
        kinds = sorted({k for k, _, _ in files})
        if kind is None and len(kinds) > 1:
            raise ValueError(f"the log under {self.root} holds kinds {kinds}: pass kind=")
        kind = kinds[0] if kind is None else kind
        _columns(kind)
        files = [(r, path) for k, r, path in files if k == kind]
        present = sorted({r for r, _ in files})
        wanted = present if rounds is None else sorted(set(rounds))
        chosen = [path for r, path in files if r in wanted]
        if not chosen:
            raise ValueError(f"no {kind} records in rounds {wanted} under {self.root} (it has {present})")
        record_schema = pq.read_schema(chosen[0])
        _record_kind(record_schema)
        for path in chosen[1:]:
            if not pq.read_schema(path).equals(record_schema):
                raise ValueError(f"{path} has another record schema than {chosen[0]} (latent shape or N?)")
        dataset = ds.dataset(  # all files of the kind: the partition filter prunes the other rounds unread
            [str(p) for _, p in files],
            schema=record_schema,
            format="parquet",
            partitioning=_PARTITIONING,
            partition_base_dir=str(self.root),
        )
        return dataset.to_table(columns=record_schema.names, filter=ds.field("round").isin(wanted))
