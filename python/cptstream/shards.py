"""Read, inspect and verify shard directories (`cptstream inspect`, `cptstream verify`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = ["read_manifest", "shard_path", "iter_rows", "inspect_dir", "verify_dir"]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load `manifest.json` from a shard directory.

    Raises:
        FileNotFoundError: the directory has no manifest (not a finished `cptstream shard` output).
    """
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {directory} the --output of a finished cptstream shard run?")
    return json.loads(path.read_text(encoding="utf-8"))


def shard_path(directory: str | Path, relative: object) -> Path:
    """Return the file a manifest entry names, which must lie inside the shard directory.

    A manifest is input like any other file, so its paths are checked: an absolute path, `..` or
    a symlink that leads out of the directory would let a crafted manifest read any file.

    Raises:
        ValueError: the path is not a non-empty relative string or resolves outside `directory`.
    """
    root = Path(directory)
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise ValueError(f"{root / 'manifest.json'}: shard path {relative!r} is not a relative path")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{root / 'manifest.json'}: shard path {relative!r} points outside {root}")
    return path


def iter_rows(directory: str | Path, split: str = "train"):
    """Yield `(input_ids, seq_lengths)` for every row of a split, shard by shard.

    Raises:
        ValueError: a shard path in the manifest points outside `directory`.
    """
    manifest = read_manifest(directory)
    for entry in manifest["splits"][split]:
        with pa.memory_map(str(shard_path(directory, entry["path"]))) as source:
            for batch in pa.ipc.open_stream(source):
                ids = batch.column("input_ids").to_pylist()
                lengths = batch.column("seq_lengths").to_pylist()
                yield from zip(ids, lengths)


def _histogram(values: list[int], top: int, bins: int = 10, width: int = 40) -> list[str]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, v * bins // (top + 1))] += 1
    peak = max(counts) or 1
    lines = []
    for i, n in enumerate(counts):
        lo, hi = i * (top + 1) // bins, (i + 1) * (top + 1) // bins - 1
        lines.append(f"  {lo:>6}-{hi:<6} {'#' * round(n / peak * width):<{width}} {n:,}")
    return lines


def inspect_dir(directory: str | Path, *, samples: int = 3, tokenizer: str | None = None, split: str = "train") -> str:
    """Render a manifest summary, a histogram of real tokens per row and decoded sample rows.

    Each sample row is shown piece by piece, so document boundaries are visible: a piece ends
    with the EOS token when a document ends there, and a piece without it continues in another row.
    """
    from tokenizers import Tokenizer

    from cptstream.shard import format_summary

    manifest = read_manifest(directory)
    seq_len = manifest["seq_len"]
    lines = [f"{directory}: format {manifest['format_version']}, seq_len {seq_len}, packing {manifest['packing']}"]
    lines.append(format_summary(manifest))

    real = [sum(lengths) for _, lengths in iter_rows(directory, split)]
    lines.append(f"real tokens per row ({split}, {len(real):,} rows):")
    lines.extend(_histogram(real, seq_len))

    tok_path = Path(tokenizer or manifest["tokenizer"]["path"])
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    if not tok_path.is_file():
        lines.append(f"(no decoded samples: tokenizer {tok_path} not found; pass --tokenizer)")
        return "\n".join(lines)
    tok = Tokenizer.from_file(str(tok_path))

    for index, (ids, lengths) in enumerate(iter_rows(directory, split)):
        if index >= samples:
            break
        lines.append(f"--- row {index}: {len(lengths)} pieces, {sum(lengths)} real tokens, {seq_len - sum(lengths)} padding")
        start = 0
        for piece, length in enumerate(lengths):
            text = tok.decode(ids[start : start + length], skip_special_tokens=False)
            shown = text if len(text) <= 400 else text[:200] + " [...] " + text[-200:]
            lines.append(f"[piece {piece}: tokens {start}..{start + length - 1}] {shown!r}")
            start += length
    return "\n".join(lines)


def verify_dir(directory: str | Path) -> dict[str, Any]:
    """Check every shard against the manifest (rows, tokens, sha256, row shape, token ids)."""
    from cptstream import _core

    return json.loads(_core.verify(str(directory)))
