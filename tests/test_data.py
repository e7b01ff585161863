"""Tests of the streaming dataset and of batch construction, on shards written here with pyarrow.

The shards follow docs/shard-format.md (the contract with `cptstream shard`), so these tests do
not need the Rust extension. `write_shards` is imported by test_train.py as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptstream.data import DataExhaustedError, PackedDataset, PackedLoader, load_manifest
from cptstream.train.batch import IGNORE_INDEX, collate_rows, count_targets

EOS = 2
PAD = 0
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("seq_lengths", pa.list_(pa.int32()))])
PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"


def write_shards(
    root: Path,
    shards: list[list[tuple[list[int], list[int]]]],
    *,
    seq_len: int,
    rows_per_batch: int = 4,
    pad_id: int = PAD,
    tokenizer: dict | None = None,
    validation: list[list[tuple[list[int], list[int]]]] | None = None,
) -> Path:
    """Write a shard directory in format 1: shards of rows given as (tokens, seq_lengths)."""
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    total_rows = total_tokens = 0
    for split, split_shards in (("train", shards), ("validation", validation or [])):
        (root / split).mkdir(exist_ok=True)
        for index, rows in enumerate(split_shards):
            relative = f"{split}/shard_{index:05d}.arrow"
            with pa.OSFile(str(root / relative), "wb") as sink:
                options = pa.ipc.IpcWriteOptions(compression="zstd")
                with pa.ipc.new_stream(sink, SCHEMA, options=options) as writer:
                    for first in range(0, len(rows), rows_per_batch):
                        chunk = rows[first : first + rows_per_batch]
                        padded = [tokens + [pad_id] * (seq_len - len(tokens)) for tokens, _ in chunk]
                        assert all(len(row) == seq_len for row in padded)
                        batch = pa.record_batch(
                            [pa.array(padded, pa.list_(pa.int32())), pa.array([lens for _, lens in chunk])],
                            schema=SCHEMA,
                        )
                        writer.write_batch(batch)
            offsets = record_batch_offsets(root / relative)
            tokens = sum(len(tokens) for tokens, _ in rows)
            digest = hashlib.sha256((root / relative).read_bytes()).hexdigest()
            splits[split].append(
                {"path": relative, "rows": len(rows), "tokens": tokens, "sha256": digest, "batch_offsets": offsets}
            )
            total_rows += len(rows)
            total_tokens += tokens

    manifest = {
        "format_version": 1,
        "complete": True,
        "tokenizer": tokenizer
        or {
            "path": "none",
            "sha256": "0" * 64,
            "vocab_size": 64,
            "eos_token": "</s>",
            "eos_id": EOS,
            "bos_token": None,
            "bos_id": None,
            "pad_id": pad_id,
        },
        "seq_len": seq_len,
        "packing": "bfd",
        "rows_per_batch": rows_per_batch,
        "counts": {"rows": total_rows, "tokens": total_tokens},
        "splits": splits,
        "config": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    return root


def record_batch_offsets(path: Path) -> list[int]:
    """Return the byte offset of every record-batch message in an Arrow IPC stream file."""
    offsets = []
    with pa.OSFile(str(path)) as source:
        while True:
            position = source.tell()
            try:
                message = pa.ipc.read_message(source)
            except EOFError:
                return offsets
            if message.type == "record batch":
                offsets.append(position)


def id_rows(first: int, count: int, seq_len: int = 8) -> list[tuple[list[int], list[int]]]:
    """Rows whose tokens all equal the row id (one 4-token document each), so a batch names its rows."""
    return [([row_id] * 4, [4]) for row_id in range(first, first + count)]


def row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def drain(dataset: PackedDataset, worker: int = 0) -> list[int]:
    return [row_id for batch in dataset.iter_worker(worker) for row_id in row_ids(batch)]


# ---- batches ----


def test_labels_three_documents():
    lengths = [4, 3, 5]
    tokens = [5, 6, 7, EOS, 8, 9, EOS, 10, 11, 12, 13, EOS]
    batch = collate_rows(np.array([tokens], dtype=np.int32), [np.array(lengths)])
    labels = batch["labels"][0]

    assert torch.nonzero(labels == IGNORE_INDEX).flatten().tolist() == [4, 7]
    for eos_index in (3, 6, 11):
        assert labels[eos_index].item() == EOS
    assert count_targets(batch["labels"]) == 9
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]


def test_labels_pad_equals_eos():
    # Two documents, then 3 pad slots whose id equals EOS: only the recorded lengths tell them apart.
    tokens = [5, 6, EOS, 7, 8, 9, EOS, EOS, EOS, EOS]
    batch = collate_rows(np.array([tokens], dtype=np.int32), [np.array([3, 4])])
    labels = batch["labels"][0]

    assert labels[2].item() == EOS
    assert labels[6].item() == EOS
    assert torch.nonzero(labels[7:] == IGNORE_INDEX).flatten().tolist() == [0, 1, 2]
    assert torch.nonzero(labels == IGNORE_INDEX).flatten().tolist() == [3, 7, 8, 9]
    assert batch["num_tokens"].tolist() == [7]


def test_collate_rejects_overlong_lengths():
    with pytest.raises(ValueError, match=r"seq_lengths \[3, 4\] are invalid for a row of 6 tokens"):
        collate_rows(np.zeros((1, 6), dtype=np.int32), [np.array([3, 4])])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 4))
def test_collate_positions_and_targets(lengths, padding):
    seq_len = sum(lengths) + padding
    tokens = np.arange(seq_len, dtype=np.int32) + 10
    batch = collate_rows(tokens[None], [np.array(lengths)])

    expected_positions = [p for length in lengths for p in range(length)] + list(range(padding))
    assert batch["position_ids"][0].tolist() == expected_positions
    assert count_targets(batch["labels"]) == sum(lengths) - len(lengths)


# ---- division across ranks and workers ----


def test_streams_cover_every_row_once(tmp_path):
    data = write_shards(
        tmp_path / "data", [id_rows(0, 10), id_rows(10, 10), id_rows(20, 10)], seq_len=8, rows_per_batch=3
    )
    streams = []
    for rank in range(2):
        dataset = PackedDataset(
            data, micro_batch_size=2, seed=7, epochs=1, rank=rank, world_size=2, num_workers=2, shuffle_block=4
        )
        for worker in range(2):
            streams.append(drain(dataset, worker))

    union = [row_id for stream in streams for row_id in stream]
    assert sorted(union) == list(range(30))
    for i, stream in enumerate(streams):
        for other in streams[i + 1 :]:
            assert not set(stream) & set(other)


def test_dataloader_workers_match_in_process_order(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 13), id_rows(13, 9)], seq_len=8, rows_per_batch=4)
    in_process = drain(PackedDataset(data, micro_batch_size=3, seed=1, epochs=2, shuffle_block=5))

    dataset = PackedDataset(data, micro_batch_size=3, seed=1, epochs=2, shuffle_block=5, num_workers=2)
    with_workers = [row_id for batch in PackedLoader(dataset) for row_id in row_ids(batch)]

    assert with_workers == in_process
    assert dataset.rows_consumed == 44


def test_worker_batches_equal_in_process(tmp_path):
    # Workers send a compact batch that PackedLoader expands, so check that the loop gets the same
    # keys, dtypes and values as from the main process. The rows cover pieces, padding and a full row.
    rows = [
        ([5, 6, 2, 7, 8, 9, 2], [3, 4]),
        ([3] * 8, [8]),
        ([4, 2, 5, 2, 6, 2], [2, 2, 2]),
        ([7, 7, 2], [3]),
    ] * 5
    data = write_shards(tmp_path / "data", [rows[:11], rows[11:]], seq_len=8, rows_per_batch=3)

    def batches(num_workers: int) -> list[dict[str, torch.Tensor]]:
        dataset = PackedDataset(data, micro_batch_size=3, seed=4, epochs=2, shuffle_block=5, num_workers=num_workers)
        return list(PackedLoader(dataset))

    in_process, with_workers = batches(0), batches(2)
    assert len(in_process) == len(with_workers) == 14
    assert set(in_process[0]) == {"input_ids", "labels", "position_ids", "seq_lengths", "num_tokens"}
    for expected, got in zip(in_process, with_workers, strict=True):
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
    # And both equal collate_rows on the same rows, the reference that the other tests pin down.
    first = in_process[0]
    lengths = [row[row > 0].numpy() for row in first["seq_lengths"]]
    reference = collate_rows(first["input_ids"].numpy().astype(np.int32), lengths)
    for name, tensor in reference.items():
        assert first[name].dtype == tensor.dtype, name
        assert torch.equal(first[name], tensor), name


# ---- order and resume ----


def test_epochs_differ_and_repeat(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 10), id_rows(10, 10), id_rows(20, 10)], seq_len=8)

    def two_epochs() -> tuple[list[int], list[int]]:
        order = drain(PackedDataset(data, micro_batch_size=5, seed=3, epochs=2, shuffle_block=8))
        return order[:30], order[30:]

    first, second = two_epochs()
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second
    assert two_epochs() == (first, second)


def test_seed_changes_order(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 10), id_rows(10, 10)], seq_len=8)
    orders = [drain(PackedDataset(data, micro_batch_size=4, seed=seed, epochs=1)) for seed in (0, 1)]
    assert orders[0] != orders[1]


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from cptstream.data import PackedDataset, PackedLoader
    data, state = sys.argv[1], json.loads(sys.argv[2])
    dataset = PackedDataset(data, micro_batch_size=4, seed=11, epochs=1, shuffle_block=8, num_workers=2)
    loader = PackedLoader(dataset)
    loader.load_state_dict(state)
    print(json.dumps([row for batch in loader for row in batch["input_ids"][:, 0].tolist()]))
    """
)


def test_resume_in_new_process(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(i * 10, 10) for i in range(4)], seq_len=8, rows_per_batch=3)

    def make_loader() -> PackedLoader:
        dataset = PackedDataset(data, micro_batch_size=4, seed=11, epochs=1, shuffle_block=8, num_workers=2)
        return PackedLoader(dataset)

    uninterrupted = [row for batch in make_loader() for row in row_ids(batch)]
    assert sorted(uninterrupted) == list(range(40))

    # Stop after step 3, mid-way through a shuffle block and a record batch.
    loader = make_loader()
    consumed = []
    for step, batch in enumerate(loader, start=1):
        consumed += row_ids(batch)
        if step == 3:
            break
    state = json.dumps(loader.state_dict())

    result = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(data), state],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    resumed = json.loads(result.stdout)

    assert resumed[0] == uninterrupted[12]
    assert consumed + resumed == uninterrupted


def test_resume_across_epochs_in_constant_position(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 7), id_rows(7, 6)], seq_len=8, rows_per_batch=2)
    full = drain(PackedDataset(data, micro_batch_size=3, seed=5, epochs=3, shuffle_block=4))

    for rows_consumed in (0, 1, 12, 13, 14, 38):
        dataset = PackedDataset(data, micro_batch_size=3, seed=5, epochs=3, shuffle_block=4)
        dataset.load_state_dict(dict(dataset.state_dict(), rows_consumed=rows_consumed))
        assert drain(dataset) == full[rows_consumed:]


@pytest.mark.parametrize(
    ("field", "value"),
    [("world_size", 2), ("num_workers", 1), ("seed", 99), ("version", 2), ("data_fingerprint", "0" * 16)],
)
def test_state_rejects_mismatch(tmp_path, field, value):
    data = write_shards(tmp_path / "data", [id_rows(0, 8)], seq_len=8)
    dataset = PackedDataset(data, micro_batch_size=2)
    state = dict(dataset.state_dict(), **{field: value})
    with pytest.raises(ValueError, match=field if field != "version" else "state version"):
        dataset.load_state_dict(state)


# ---- errors ----


def test_empty_split_raises_exhausted(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 4)], seq_len=8)
    with pytest.raises(DataExhaustedError, match="'validation'"):
        PackedDataset(data, micro_batch_size=2, split="validation")
    with pytest.raises(DataExhaustedError, match="fewer than world_size=8"):
        PackedDataset(data, micro_batch_size=2, rank=5, world_size=8)


def test_incomplete_manifest_rejected(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 4)], seq_len=8)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["complete"] = False
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="complete is False"):
        load_manifest(data)


def test_row_count_mismatch_names_batch(tmp_path):
    data = write_shards(tmp_path / "data", [id_rows(0, 6)], seq_len=8, rows_per_batch=4)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"][0]["rows"] = 7
    (data / "manifest.json").write_text(json.dumps(manifest))
    dataset = PackedDataset(data, micro_batch_size=7, shuffle=False, epochs=1)
    with pytest.raises(ValueError, match="record batch 1: 2 rows, the manifest implies 3"):
        drain(dataset)
