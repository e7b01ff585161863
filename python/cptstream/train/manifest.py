"""Reader of `manifest.json`, the index that `cptstream shard` writes last (format 1).

Only the fields that training uses are typed; the whole parsed file stays in `Manifest.raw`.
The format is described in docs/shard-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptstream.shards import shard_path

__all__ = ["FORMAT_VERSION", "Manifest", "ShardInfo", "load_manifest"]

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard file as the manifest lists it."""

    path: Path
    """Absolute path of the Arrow IPC stream file."""
    rows: int
    """Number of rows in the shard."""
    batch_offsets: tuple[int, ...]
    """Byte offset of each record-batch message in the file."""
    sha256: str
    """sha256 of the file bytes, used to fingerprint the data in checkpoints."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """The parts of `manifest.json` that training reads."""

    path: Path
    """Path of the `manifest.json` file."""
    seq_len: int
    """Tokens per row, padding included."""
    rows_per_batch: int
    """Rows per record batch; the last batch of a shard may hold fewer."""
    tokenizer: dict[str, Any]
    """The manifest's tokenizer record: path, sha256, vocab_size, eos_id, pad_id and more."""
    splits: dict[str, tuple[ShardInfo, ...]]
    """Shards per split name (`train`, `validation`)."""
    raw: dict[str, Any]
    """The whole parsed manifest, for fields this class does not name."""

    def rows(self, split: str) -> int:
        """Return the number of rows in `split` (0 if the split is absent)."""
        return sum(shard.rows for shard in self.splits.get(split, ()))


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and validate `DATA_DIR/manifest.json`.

    Raises:
        FileNotFoundError: the manifest is missing.
        ValueError: the manifest is incomplete, of another format version, malformed, or lists a
            shard path outside `data_dir`.
    """
    root = Path(data_dir)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point --data at a directory written by `cptstream shard`")
    raw = json.loads(path.read_text(encoding="utf-8"))

    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version is {raw.get('format_version')!r}, this cptstream reads {FORMAT_VERSION}; "
            f"reshard the corpus with a matching cptstream"
        )
    if raw.get("complete") is not True:
        raise ValueError(f"{path}: complete is {raw.get('complete')!r}; the shard run did not finish, resume it first")

    try:
        splits = {
            name: tuple(
                ShardInfo(
                    path=shard_path(root, entry["path"]),
                    rows=int(entry["rows"]),
                    batch_offsets=tuple(int(offset) for offset in entry["batch_offsets"]),
                    sha256=str(entry.get("sha256", "")),
                )
                for entry in entries
            )
            for name, entries in raw["splits"].items()
        }
        manifest = Manifest(
            path=path,
            seq_len=int(raw["seq_len"]),
            rows_per_batch=int(raw["rows_per_batch"]),
            tokenizer=dict(raw["tokenizer"]),
            splits=splits,
            raw=raw,
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing or malformed field {err}; the file does not follow format 1") from err

    for shard in (shard for shards in splits.values() for shard in shards):
        expected_batches = -(-shard.rows // manifest.rows_per_batch)
        if len(shard.batch_offsets) != expected_batches:
            raise ValueError(
                f"{path}: {shard.path.name} has {shard.rows} rows in {len(shard.batch_offsets)} batch offsets, "
                f"expected {expected_batches} at rows_per_batch={manifest.rows_per_batch}"
            )
    return manifest
