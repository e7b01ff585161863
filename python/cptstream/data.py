"""Streaming, resumable dataset over the packed Arrow shards that `cptstream shard` writes.

Order. The row order of epoch `e` is a pure function of `(seed, e)`: the shards are permuted,
their rows concatenated, and the concatenation is cut into blocks of `shuffle_block` rows, each
permuted by its own generator seeded with `(seed, e, block)`. Position `g` of an epoch maps to a
`(shard, row)` pair with one binary search and one block permutation, so resuming at row 10^9
costs the same as at row 10, and the state is just the number of rows consumed.

Division. Rank `r` of `W` takes the positions `r, r + W, ...` of every epoch. A rank's rows form
one stream across epochs, cut into micro-batches of `micro_batch_size`; DataLoader worker `k` of
`K` builds micro-batches `k, k + K, ...`, which is the order in which the DataLoader's
round-robin returns them. Every row is read once per epoch, and a rank sees the same batches for
any `K`.

Reads. Shards are memory-mapped with pyarrow and decompressed one record batch at a time through
the manifest's `batch_offsets`; each worker keeps an LRU of about one shuffle block of decoded
record batches (`shuffle_block * seq_len * 4` bytes). The cost of this layout is that every
(rank, worker) stream decodes each record batch of a block it reads from, so decode work grows
with `W * K`. zstd decodes well above 1 GB/s per core, far more than one GPU consumes. The
worker path uses pyarrow and numpy only, never the Rust extension, because rayon's thread pool
does not survive the DataLoader's fork.

Hand-over. A worker yields the compact `pack_rows` form (int32 input ids and piece lengths) and
`PackedLoader` builds labels, position ids and the int64 ids in the training process: a DataLoader
moves every tensor a worker yields into its own shared-memory segment, which cost about ten times
as much as building the batch when a worker sent the full batch of six tensors.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import signal
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cptstream.train.batch import expand_rows, pack_rows
from cptstream.train.manifest import Manifest, ShardInfo, load_manifest

__all__ = [
    "DataExhaustedError",
    "Manifest",
    "PackedDataset",
    "PackedLoader",
    "ShardInfo",
    "load_manifest",
]

STATE_VERSION = 1


class DataExhaustedError(Exception):
    """Raised when a stream has no rows left: an empty split, a rank without rows, or the last epoch done."""


class ShardReader:
    """Random access to record batches of the shards of one split, through memory maps.

    Files are mapped on first use, so a reader built in the main process maps nothing until a
    DataLoader worker uses it.
    """

    def __init__(self, shards: tuple[ShardInfo, ...], seq_len: int, rows_per_batch: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        self.rows_per_batch = rows_per_batch
        self._maps: dict[int, tuple[pa.Buffer, pa.Schema]] = {}

    def read_batch(self, shard: int, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode one record batch.

        Returns:
            `(input_ids, length_offsets, lengths)`: input ids as int32 `[rows, seq_len]`, and the
            `seq_lengths` column as Arrow-style offsets `[rows + 1]` into the flat `lengths`.

        Raises:
            ValueError: the batch does not match the manifest or the format.
        """
        info = self.shards[shard]
        if shard not in self._maps:
            # NOTE: a MemoryMappedFile has no slice(); read_buffer() returns a zero-copy view of the map.
            mapped = pa.memory_map(str(info.path), "r").read_buffer()
            self._maps[shard] = (mapped, pa.ipc.open_stream(mapped).schema)
        mapped, schema = self._maps[shard]

        message = pa.ipc.read_message(mapped.slice(info.batch_offsets[batch]))
        record_batch = pa.ipc.read_record_batch(message, schema)
        expected_rows = min(self.rows_per_batch, info.rows - batch * self.rows_per_batch)
        where = f"{info.path} record batch {batch}"
        if record_batch.num_rows != expected_rows:
            raise ValueError(f"{where}: {record_batch.num_rows} rows, the manifest implies {expected_rows}")

        ids_column = record_batch.column("input_ids")
        id_offsets = ids_column.offsets.to_numpy()
        if np.any(np.diff(id_offsets) != self.seq_len):
            raise ValueError(f"{where}: a row of input_ids is not seq_len={self.seq_len} long")
        input_ids = ids_column.values.to_numpy()[id_offsets[0] : id_offsets[-1]].reshape(-1, self.seq_len)

        lengths_column = record_batch.column("seq_lengths")
        length_offsets = lengths_column.offsets.to_numpy()
        lengths = lengths_column.values.to_numpy()
        return input_ids, length_offsets - length_offsets[0], lengths[length_offsets[0] : length_offsets[-1]]


class RowOrder:
    """The per-epoch row order: permuted shards, then a permutation within each block of rows."""

    def __init__(self, shard_rows: list[int], seed: int, shuffle: bool, shuffle_block: int) -> None:
        self.shard_rows = shard_rows
        self.num_rows = sum(shard_rows)
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_block = shuffle_block
        self._epoch: int | None = None
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """Return `(shard, row)` for `position` (0-based) of `epoch`'s order."""
        if epoch != self._epoch:
            self._set_epoch(epoch)
        if self.shuffle:
            block, offset = divmod(position, self.shuffle_block)
            position = block * self.shuffle_block + int(self._block_permutation(block)[offset])
        slot = bisect.bisect_right(self._starts, position) - 1
        return self._shard_order[slot], position - self._starts[slot]

    def _set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            self._shard_order = [int(shard) for shard in rng.permutation(len(self.shard_rows))]
        else:
            self._shard_order = list(range(len(self.shard_rows)))
        self._starts = [0]
        for shard in self._shard_order:
            self._starts.append(self._starts[-1] + self.shard_rows[shard])
        self._epoch = epoch
        self._blocks.clear()

    def _block_permutation(self, block: int) -> np.ndarray:
        if block not in self._blocks:
            size = min(self.shuffle_block, self.num_rows - block * self.shuffle_block)
            self._blocks[block] = np.random.default_rng([self.seed, self._epoch, block, 1]).permutation(size)
            if len(self._blocks) > 2:
                self._blocks.popitem(last=False)
        return self._blocks[block]


class PackedDataset(IterableDataset):
    """Micro-batches of packed rows of one split, in a resumable, seeded, rank- and worker-divided order.

    Iterating yields dicts from `pack_rows` (int32 `input_ids` and `seq_lengths`) plus
    `rows_consumed`, the stream position after the batch, as an int. Read it through
    `PackedLoader`, which turns them into `collate_rows` batches and keeps `rows_consumed` of this
    object in step with what the training loop has received, for `state_dict`.

    Args:
        data_dir: directory that contains `manifest.json`.
        micro_batch_size: rows per yielded batch; the last batch of a finite stream may be shorter.
        split: manifest split to read. Default: ``"train"``.
        seed: seed of the shuffle. Default: ``0``.
        shuffle: permute shards and rows each epoch; off reads rows in manifest order. Default: ``True``.
        shuffle_block: rows per block permuted as a unit, the shuffle buffer. Default: ``2048``.
        epochs: epochs to stream before the iterator ends, or None for an endless stream. Default: ``None``.
        rank: this process's rank. Default: torch.distributed's rank if initialized, else ``0``.
        world_size: number of ranks. Default: torch.distributed's world size if initialized, else ``1``.
        num_workers: DataLoader workers that will read this dataset (0 reads in the main process).
            Default: ``0``.
        manifest: an already loaded manifest of `data_dir`. Default: load it.

    Raises:
        DataExhaustedError: the split has no rows, or fewer rows than ranks.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        micro_batch_size: int,
        split: str = "train",
        seed: int = 0,
        shuffle: bool = True,
        shuffle_block: int = 2048,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        manifest: Manifest | None = None,
    ) -> None:
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if shuffle_block < 1:
            raise ValueError(f"shuffle_block must be >= 1, got {shuffle_block}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        self.rank = rank
        self.world_size = world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

        self.manifest = manifest if manifest is not None else load_manifest(data_dir)
        self.split = split
        shards = self.manifest.splits.get(split, ())
        self.num_rows = sum(shard.rows for shard in shards)
        if self.num_rows == 0:
            raise DataExhaustedError(f"split {split!r} of {self.manifest.path} has no rows")
        self.rows_per_epoch = len(range(self.rank, self.num_rows, self.world_size))
        if self.rows_per_epoch == 0:
            raise DataExhaustedError(
                f"split {split!r} of {self.manifest.path} has {self.num_rows} rows, fewer than "
                f"world_size={self.world_size}, so rank {self.rank} has none"
            )

        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_block = shuffle_block
        self.epochs = epochs
        self.num_workers = num_workers
        self.rows_consumed = 0
        self.fingerprint = hashlib.sha256(
            json.dumps([[shard.path.name, shard.rows, shard.sha256] for shard in shards]).encode()
        ).hexdigest()[:16]
        self._order = RowOrder([shard.rows for shard in shards], seed, shuffle, shuffle_block)
        self._reader = ShardReader(shards, self.manifest.seq_len, self.manifest.rows_per_batch)

    @property
    def epoch(self) -> int:
        """The epoch that the next row belongs to."""
        return self.rows_consumed // self.rows_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.iter_worker(0, workers=1)
        if info.num_workers != self.num_workers:
            raise ValueError(
                f"the DataLoader runs {info.num_workers} workers but the dataset was built for "
                f"num_workers={self.num_workers}; pass the same number to both"
            )
        return self.iter_worker(info.id)

    def iter_worker(self, worker: int, workers: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield the micro-batches of DataLoader worker `worker`: batches `worker, worker + K, ...` from the position.

        Batches are in the compact form that the class docstring describes.

        Args:
            worker: worker id, `0 <= worker < K`.
            workers: K. Default: ``max(1, num_workers)``.
        """
        workers = workers if workers is not None else max(1, self.num_workers)
        start = self.rows_consumed
        end = None if self.epochs is None else self.epochs * self.rows_per_epoch
        cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        capacity = (self.shuffle_block // self.manifest.rows_per_batch + 4) if self.shuffle else 2

        batch_index = worker
        while True:
            first = start + batch_index * self.micro_batch_size
            last = first + self.micro_batch_size if end is None else min(first + self.micro_batch_size, end)
            if first >= last:
                return
            rows = [self._read_row(position, cache, capacity) for position in range(first, last)]
            batch: dict[str, Any] = pack_rows(np.stack([ids for ids, _ in rows]), [lengths for _, lengths in rows])
            # An int is pickled with the batch; a tensor would cost one more shared-memory segment.
            batch["rows_consumed"] = last
            yield batch
            batch_index += workers

    def _read_row(
        self, position: int, cache: OrderedDict[tuple[int, int], Any], capacity: int
    ) -> tuple[np.ndarray, np.ndarray]:
        epoch, index = divmod(position, self.rows_per_epoch)
        shard, row = self._order.locate(epoch, index * self.world_size + self.rank)
        record_batch, offset = divmod(row, self.manifest.rows_per_batch)
        key = (shard, record_batch)
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = self._reader.read_batch(shard, record_batch)
            if len(cache) > capacity:
                cache.popitem(last=False)
        input_ids, length_offsets, lengths = cache[key]
        return input_ids[offset], lengths[length_offsets[offset] : length_offsets[offset + 1]]

    def state_dict(self) -> dict[str, Any]:
        """Return the position and the settings it depends on, as JSON-serializable values."""
        return {
            "version": STATE_VERSION,
            "rows_consumed": self.rows_consumed,
            "epoch": self.epoch,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_block": self.shuffle_block,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_rows": self.num_rows,
            "data_fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next row is the one after the last consumed.

        Raises:
            ValueError: the state has another version, or was taken with other settings or data;
                the message names the field and both values.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"dataset state version is {state.get('version')!r}, expected {STATE_VERSION}")
        for name, current in self.state_dict().items():
            if name in ("rows_consumed", "epoch", "version"):
                continue
            if state.get(name) != current:
                raise ValueError(
                    f"dataset state has {name}={state.get(name)!r} but this run has {name}={current!r}; "
                    f"resume with the settings and data of the run that saved it"
                )
        rows_consumed = state["rows_consumed"]
        if not isinstance(rows_consumed, int) or rows_consumed < 0:
            raise ValueError(f"dataset state has rows_consumed={rows_consumed!r}, expected an integer >= 0")
        self.rows_consumed = rows_consumed


class PackedLoader:
    """A DataLoader over a `PackedDataset` that advances the dataset's position as batches arrive.

    Yields the batches of `collate_rows`. The workers send the compact form of `pack_rows`, and the
    rest of each batch is built here, in the training process, for any number of workers.

    Worker seeds come from a private generator, so creating an iterator leaves torch's global RNG
    untouched and a resumed run draws the same dropout masks as an uninterrupted one.

    Args:
        dataset: the dataset; its `num_workers` sets the DataLoader's.
        pin_memory: pin batches for faster host-to-GPU copies; ignored without CUDA, as the
            DataLoader does. Default: ``False``.
    """

    def __init__(self, dataset: PackedDataset, *, pin_memory: bool = False) -> None:
        self.dataset = dataset
        # The DataLoader's pin thread would pin only the compact tensors, and the tensors built
        # after it would be pageable, so the full batch is pinned here instead.
        self._pin_memory = pin_memory and torch.cuda.is_available()
        generator = torch.Generator()
        generator.manual_seed(dataset.seed)
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=dataset.num_workers,
            generator=generator,
            worker_init_fn=_ignore_sigint,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for packed in self._loader:
            self.dataset.rows_consumed = int(packed.pop("rows_consumed"))
            batch = expand_rows(packed)
            if self._pin_memory:
                batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Return the dataset's `state_dict()`."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the dataset's position; takes effect at the next `iter()`."""
        self.dataset.load_state_dict(state)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group. The training process finishes its step and stops the
    # workers itself, so a worker killed by KeyboardInterrupt mid-batch would only add an error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
