"""The Arrow record format and the Parquet trajectory log: bitwise round trips, one-line errors.

The expected columns are written out here from the format's description, independently of
actors/records.py.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from helpers import concat_pairs, select_rows

from actors import records
from actors.records import (
    PAIR_KINDS,
    PairBatch,
    TrajectoryLog,
    from_table,
    iterate_batches,
    schema,
    to_record_batch,
)

LATENT = (2, 3, 4)  # C, h, w: all different, so a transposed or mis-reshaped tensor cannot pass
STEPS = 3  # N

# name -> (torch dtype, row shape); None is the string column "prompt".
STEP_SPEC = {
    "prompt": None,
    "prompt_id": (torch.int64, ()),
    "seed": (torch.int64, ()),
    "step_index": (torch.int16, ()),
    "timestep": (torch.float32, ()),
    "x_t": (torch.float32, LATENT),
    "x_w": (torch.float32, LATENT),
    "x_l": (torch.float32, LATENT),
    "x0_w": (torch.float32, LATENT),
    "x0_l": (torch.float32, LATENT),
    "reward_w": (torch.float32, ()),
    "reward_l": (torch.float32, ()),
    "logp_w": (torch.float32, ()),
    "logp_l": (torch.float32, ()),
    "guided": (torch.bool, ()),
    "policy_version": (torch.int64, ()),
    "actor_id": (torch.int32, ()),
    "round": (torch.int64, ()),
}
TRAJ_SPEC = {
    "prompt": None,
    "prompt_id": (torch.int64, ()),
    "seed_w": (torch.int64, ()),
    "seed_l": (torch.int64, ()),
    "latents_w": (torch.float32, (STEPS + 1, *LATENT)),
    "latents_l": (torch.float32, (STEPS + 1, *LATENT)),
    "logps_w": (torch.float32, (STEPS,)),
    "logps_l": (torch.float32, (STEPS,)),
    "timesteps": (torch.float32, (STEPS,)),
    "reward_w": (torch.float32, ()),
    "reward_l": (torch.float32, ()),
    "policy_version": (torch.int64, ()),
    "actor_id": (torch.int32, ()),
    "round": (torch.int64, ()),
}
CLEAN_SPEC = {
    "prompt": None,
    "prompt_id": (torch.int64, ()),
    "x0_w": (torch.float32, LATENT),
    "x0_l": (torch.float32, LATENT),
    "reward_w": (torch.float32, ()),
    "reward_l": (torch.float32, ()),
    "actor_id": (torch.int32, ()),
    "round": (torch.int64, ()),
}
SPECS = {"step": STEP_SPEC, "trajectory": TRAJ_SPEC, "clean": CLEAN_SPEC}
ARROW = {
    torch.int16: pa.int16(),
    torch.int32: pa.int32(),
    torch.int64: pa.int64(),
    torch.float32: pa.float32(),
}
SPECIAL = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])  # 1e-45: float32 subnormal


def make_columns(kind: str, rows: int, seed: int, first_id: int = 0, rnd: int = 0, actor: int = 0) -> dict:
    """Random columns of ``kind``; prompt_id = first_id + row names rows; NaN/inf/-0/subnormal included."""
    gen = torch.Generator().manual_seed(seed)
    columns: dict = {"prompt": [f"prompt {first_id + i} ✓" for i in range(rows)]}
    for name, spec in SPECS[kind].items():
        if spec is None:
            continue
        dtype, shape = spec
        if dtype == torch.float32:
            value = torch.randn((rows, *shape), generator=gen, dtype=torch.float64).float()
            if shape and rows:
                n = min(len(SPECIAL), value.numel())
                value.view(-1)[:n] = SPECIAL[:n]
        elif dtype == torch.bool:
            value = torch.rand(rows, generator=gen) < 0.5
        else:
            info = torch.iinfo(dtype)
            value = torch.randint(info.min, info.max, (rows, *shape), generator=gen, dtype=torch.int64).to(
                dtype
            )
        columns[name] = value
    columns["prompt_id"] = torch.arange(first_id, first_id + rows, dtype=torch.int64)
    columns["round"] = torch.full((rows,), rnd, dtype=torch.int64)
    columns["actor_id"] = torch.full((rows,), actor, dtype=torch.int32)
    return columns


def assert_rows_equal(batch: PairBatch, columns: dict, rows: list[int] | None = None) -> None:
    """``batch`` holds exactly ``columns`` (restricted to ``rows``): same dtypes, shapes and bits."""
    rows = list(range(len(columns["prompt"]))) if rows is None else rows
    assert batch.prompts == [columns["prompt"][i] for i in rows]
    assert set(batch.tensors) == set(columns) - {"prompt"}
    for name, got in batch.tensors.items():
        want = torch.as_tensor(columns[name])[rows]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == torch.float32:  # bitwise: NaN payloads and -0.0 included
            got, want = got.view(torch.int32), want.view(torch.int32)
        assert torch.equal(got, want), name


def ipc_round_trip(batch: pa.RecordBatch) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_schema_follows_the_format(kind):
    got = schema(kind, LATENT, STEPS)
    assert got.metadata == {b"kind": kind.encode(), b"format_version": b"1"}
    want = []
    for name, spec in SPECS[kind].items():
        if spec is None:
            want.append((name, pa.string()))
        elif spec[0] == torch.bool:
            want.append((name, pa.bool_()))
        elif spec[1]:
            want.append((name, pa.fixed_shape_tensor(ARROW[spec[0]], spec[1])))
        else:
            want.append((name, ARROW[spec[0]]))
    assert [(f.name, f.type) for f in got] == want


def test_schema_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown pair kind 'chain'; allowed: step, trajectory"):
        schema("chain", LATENT, STEPS)
    with pytest.raises(ValueError, match="num_steps"):
        schema("trajectory", LATENT, None)
    with pytest.raises(ValueError, match="latent_shape"):
        schema("step", (4, 0, 8), None)


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_record_batch_and_ipc_round_trips_are_bitwise(kind):
    columns = make_columns(kind, rows=5, seed=1)
    batch = to_record_batch(kind, columns)
    assert batch.schema.equals(schema(kind, LATENT, STEPS), check_metadata=True)
    assert_rows_equal(from_table(batch), columns)
    received = ipc_round_trip(batch)  # what Ray's serialisation of Arrow amounts to
    assert received.schema.equals(batch.schema, check_metadata=True)
    assert_rows_equal(from_table(received), columns)


def test_inputs_are_cast_and_copied():
    columns = make_columns("step", rows=4, seed=2)
    given = dict(columns)
    given["x_t"] = columns["x_t"].double()  # float64 -> float32 exactly, since the values came from float32
    given["x_w"] = columns["x_w"].to(torch.bfloat16)  # NumPy has no bf16
    given["reward_w"] = columns["reward_w"].numpy()
    given["seed"] = columns["seed"].tolist()
    given["guided"] = columns["guided"].tolist()
    given["step_index"] = columns["step_index"].to(torch.int64)
    given["x_l"] = columns["x_l"].clone()
    batch = to_record_batch("step", given)
    expected = dict(columns, x_w=columns["x_w"].to(torch.bfloat16).float())
    assert_rows_equal(from_table(batch), expected)
    given["x_l"].add_(1.0)  # an actor reusing its buffers must not change a record already made
    assert_rows_equal(from_table(batch), expected)


def test_from_table_gives_writable_tensors_that_do_not_alias_the_table():
    columns = make_columns("trajectory", rows=3, seed=3)
    table = pa.Table.from_batches([to_record_batch("trajectory", columns)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps read-only memory
        pairs = from_table(table)
        on_meta = from_table(table, device="meta")  # the non-CPU branch: the transfer is the one copy
    for tensor in pairs.tensors.values():
        tensor.zero_()
    assert_rows_equal(from_table(table), columns)
    for name, tensor in on_meta.tensors.items():
        assert tensor.is_meta and tensor.dtype == pairs.tensors[name].dtype, name
        assert tensor.shape == pairs.tensors[name].shape, name


def test_arrow_columns_are_read_without_a_copy():
    batch = to_record_batch("trajectory", make_columns("trajectory", rows=3, seed=3))
    for name in ("latents_w", "timesteps"):
        column = batch.column(name)
        view = records._column_to_numpy(column)
        assert not view.flags.writeable
        assert view.ctypes.data == column.storage.values.buffers()[1].address, name
    rewards = batch.column("reward_w")
    assert records._column_to_numpy(rewards).ctypes.data == rewards.buffers()[1].address


def _without(columns: dict, name: str) -> dict:
    return {k: v for k, v in columns.items() if k != name}


STEP_ERRORS = [
    (lambda c: _without(c, "x_w"), r"missing columns \['x_w'\]"),
    (lambda c: dict(c, extra=c["seed"]), r"unexpected columns \['extra'\]"),
    (lambda c: dict(c, x_w=torch.zeros(4, 2, 3, 5)), r"column 'x_w' has rows of shape \[2, 3, 5\]"),
    (lambda c: dict(c, x_t=torch.zeros(4)), r"column 'x_t'"),
    (lambda c: dict(c, reward_w=c["reward_w"][:3]), r"column 'reward_w' has 3 rows"),
    (lambda c: dict(c, reward_l=c["reward_l"][:, None]), r"column 'reward_l' has rows of shape \[1\]"),
    (lambda c: dict(c, step_index=torch.full((4,), 70000)), r"column 'step_index'"),
    (lambda c: dict(c, timestep=torch.full((4,), 2**24 + 1)), r"column 'timestep'"),  # not exact in float32
    (lambda c: dict(c, seed=["a", "b", "c", "d"]), r"column 'seed'"),
    (lambda c: dict(c, seed=[1, None, 3, 4]), r"column 'seed'"),
    (lambda c: dict(c, prompt=["a", None, "c", "d"]), r"column 'prompt'"),
]
TRAJ_ERRORS = [
    (lambda c: dict(c, logps_w=torch.zeros(4, STEPS + 1)), r"column 'logps_w' has rows of shape \[4\]"),
    (lambda c: dict(c, latents_l=torch.zeros(4, STEPS, *LATENT)), r"column 'latents_l'"),
    (lambda c: dict(c, latents_w=torch.zeros(4, 1, *LATENT)), r"column 'latents_w'.*num_steps"),
    (lambda c: dict(c, timesteps=torch.full((4, STEPS), 2**40)), r"column 'timesteps'"),
]


@pytest.mark.parametrize(
    ("kind", "mutate", "match"),
    [("step", m, r) for m, r in STEP_ERRORS] + [("trajectory", m, r) for m, r in TRAJ_ERRORS],
)
def test_bad_columns_raise_one_line_naming_the_column(kind, mutate, match):
    with pytest.raises(ValueError, match=match) as err:
        to_record_batch(kind, mutate(make_columns(kind, rows=4, seed=4)))
    assert "\n" not in str(err.value)


def test_from_table_rejects_foreign_tables():
    batch = to_record_batch("step", make_columns("step", rows=2, seed=5))
    with pytest.raises(ValueError, match="no 'kind' metadata"):
        from_table(batch.replace_schema_metadata(None))
    with pytest.raises(ValueError, match="format_version '2'"):
        from_table(batch.replace_schema_metadata({"kind": "step", "format_version": "2"}))
    with pytest.raises(ValueError, match=r"missing columns \['logp_l'\]"):
        from_table(batch.drop_columns(["logp_l"]))
    with pytest.raises(ValueError, match="column 'timestep' has type int32"):  # a log from before float32 timesteps
        from_table(batch.set_column(4, pa.field("timestep", pa.int32()), batch.column(4).cast(pa.int32(), safe=False)))


def test_select_and_concat():
    columns = make_columns("step", rows=5, seed=6)
    pairs = from_table(to_record_batch("step", columns))
    assert len(pairs) == 5
    assert_rows_equal(select_rows(pairs, [3, 0]), columns, [3, 0])
    assert_rows_equal(select_rows(pairs, torch.tensor([4])), columns, [4])
    joined = concat_pairs([select_rows(pairs, [1, 2]), select_rows(pairs, [4])])
    assert_rows_equal(joined, columns, [1, 2, 4])
    other = from_table(to_record_batch("trajectory", make_columns("trajectory", rows=1, seed=6)))
    with pytest.raises(ValueError, match="different kinds"):
        concat_pairs([pairs, other])
    with pytest.raises(ValueError, match="at least one"):
        concat_pairs([])


def test_iterate_batches_covers_every_row_once_and_is_deterministic(tmp_path):
    log = TrajectoryLog(tmp_path)
    parts = [make_columns("step", rows=rows, seed=7 + i, first_id=10 * i) for i, rows in enumerate((4, 3))]
    for part in parts:
        log.write(to_record_batch("step", part), round=0, actor_id=0)
    table = log.read()  # several files, so chunked columns
    full = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "prompt"}
    full["prompt"] = [prompt for p in parts for prompt in p["prompt"]]
    row_of = {int(pid): i for i, pid in enumerate(full["prompt_id"])}

    def epoch(seed):
        batches = list(iterate_batches(table, batch_size=3, seed=seed))
        for batch in batches:
            assert_rows_equal(batch, full, [row_of[int(p)] for p in batch.tensors["prompt_id"]])
        return [int(p) for b in batches for p in b.tensors["prompt_id"]], [len(b) for b in batches]

    order, sizes = epoch(seed=0)
    assert sizes == [3, 3, 1] and sorted(order) == sorted(row_of)
    assert epoch(seed=0)[0] == order
    assert epoch(seed=1)[0] != order
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(table, batch_size=0, seed=0))


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_parquet_log_round_trip_is_bitwise(tmp_path, kind):
    log = TrajectoryLog(tmp_path / "log")
    written = [  # (round, actor, columns)
        (0, 0, make_columns(kind, rows=3, seed=8, first_id=0, rnd=0, actor=0)),
        (0, 1, make_columns(kind, rows=2, seed=9, first_id=10, rnd=0, actor=1)),
        (1, 0, make_columns(kind, rows=2, seed=10, first_id=20, rnd=1, actor=0)),
    ]
    for rnd, actor, columns in written:
        path = log.write(to_record_batch(kind, columns), round=rnd, actor_id=actor)
        assert path.parent == tmp_path / "log" / f"kind={kind}" / f"round={rnd:06d}"
        assert path.name.startswith(f"part-{actor}-") and len(path.name) == len(f"part-{actor}-") + 8 + 8
    for rounds in (None, [1], [0, 7]):
        table = log.read(rounds)
        assert table.schema.equals(schema(kind, LATENT, STEPS), check_metadata=True)
        pairs = from_table(table)
        wanted = [c for rnd, _, c in written if rounds is None or rnd in rounds]
        assert len(pairs) == sum(len(c["prompt"]) for c in wanted)
        by_id = {int(pid): i for i, pid in enumerate(pairs.tensors["prompt_id"])}
        for columns in wanted:
            assert_rows_equal(select_rows(pairs, [by_id[int(p)] for p in columns["prompt_id"]]), columns)


def test_writes_are_atomic_and_stray_files_are_ignored(tmp_path, monkeypatch):
    log = TrajectoryLog(tmp_path)
    columns = make_columns("step", rows=3, seed=11)
    log.write(to_record_batch("step", columns), round=0, actor_id=0)
    assert all(Path(f).name.startswith("part-") and f.endswith(".parquet") for f in visible_files(tmp_path))
    partition = tmp_path / "kind=step" / "round=000000"
    (partition / ".part-3-deadbeef.parquet.tmp").write_bytes(
        b"PAR1 half a file"
    )  # a crashed writer's leftover
    (partition / "notes.txt").write_text("not a record")
    (tmp_path / "kind=step" / "round=000004").mkdir()
    (tmp_path / "kind=step" / "round=000004" / ".part-1-0badf00d.parquet.tmp").write_bytes(b"PAR1")
    before = visible_files(tmp_path)

    def crash(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(records.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        log.write(to_record_batch("step", make_columns("step", rows=1, seed=12, rnd=1)), round=1, actor_id=0)
    monkeypatch.undo()
    assert visible_files(tmp_path) == before
    assert log.rounds() == [0]
    assert_rows_equal(from_table(log.read()), columns)


def test_rounds_position_truncate_and_kinds(tmp_path):
    log = TrajectoryLog(tmp_path)
    assert log.rounds() == [] and log.position() == 0
    for rnd, kind in ((0, "step"), (1, "step"), (2, "step"), (3, "trajectory")):
        columns = make_columns(kind, rows=2 if kind == "step" else 1, seed=rnd, rnd=rnd)
        log.write(to_record_batch(kind, columns), round=rnd, actor_id=0)
    assert log.rounds() == [0, 1, 2, 3] and log.position() == 4
    with pytest.raises(ValueError, match=r"holds kinds \['step', 'trajectory'\]: pass kind="):
        log.read()
    assert log.read(kind="trajectory").num_rows == 1
    assert log.truncate_after(1) == [2, 3]
    assert log.rounds() == [0, 1] and log.position() == 2
    table = log.read()
    assert sorted(table.column("round").to_pylist()) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"no trajectory records in rounds \[\] under .* \(it has \[\]\)"):
        log.read(kind="trajectory")
    with pytest.raises(ValueError, match=r"rounds \[5\]"):
        log.read(rounds=[5])
    with pytest.raises(ValueError, match="unknown pair kind"):
        log.read(kind="chain")
    log.write(to_record_batch("step", make_columns("step", rows=1, seed=4, rnd=7)), round=7, actor_id=0)
    assert log.rounds() == [0, 1, 7] and log.position() == 3  # rounds written, not the last round + 1
    assert log.truncate_after(-1) == [0, 1, 7] and log.position() == 0


def test_reading_nothing_says_where(tmp_path):
    with pytest.raises(ValueError, match=f"no trajectory records under {tmp_path / 'missing'}"):
        TrajectoryLog(tmp_path / "missing").read()
    (tmp_path / "kind=step" / "round=000000").mkdir(parents=True)
    (tmp_path / "kind=step" / "round=000000" / "garbage.bin").write_bytes(os.urandom(16))
    with pytest.raises(ValueError, match=f"no trajectory records under {tmp_path}"):
        TrajectoryLog(tmp_path).read()


def test_write_checks_its_arguments_against_the_batch(tmp_path):
    log = TrajectoryLog(tmp_path)
    batch = to_record_batch("step", make_columns("step", rows=2, seed=13, rnd=0, actor=2))
    with pytest.raises(ValueError, match="column 'round' holds values other than round=1"):
        log.write(batch, round=1, actor_id=2)
    with pytest.raises(ValueError, match="column 'actor_id'"):
        log.write(batch, round=0, actor_id=0)
    with pytest.raises(ValueError, match="round must be a non-negative int"):
        log.write(batch, round=-1, actor_id=2)
    with pytest.raises(ValueError, match="no 'kind' metadata"):
        log.write(batch.replace_schema_metadata(None), round=0, actor_id=2)
    assert visible_files(tmp_path) == []


def test_read_refuses_mixed_record_schemas_but_reads_each_round(tmp_path):
    log = TrajectoryLog(tmp_path)
    first = make_columns("step", rows=1, seed=14)
    log.write(to_record_batch("step", first), round=0, actor_id=0)
    other = make_columns("step", rows=1, seed=15, rnd=1)
    other.update({k: torch.rand(1, 4, 4, 4) for k in ("x_t", "x_w", "x_l", "x0_w", "x0_l")})
    log.write(to_record_batch("step", other), round=1, actor_id=0)
    with pytest.raises(ValueError, match="another record schema"):
        log.read()
    assert_rows_equal(from_table(log.read([0])), first)
    assert_rows_equal(from_table(log.read([1])), other)
