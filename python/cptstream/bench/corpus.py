"""Benchmark inputs: the real corpus and tokenizer, a pure-Python reader of the corpus, and copies.

The reader mirrors what `cptstream shard` accepts (JSONL, optionally gzip- or zstd-compressed,
Parquet, and one document per .txt/.md file), so that the tokenization floor and the Python
baseline see the same documents as the Rust pipeline. Larger corpora for the memory test are
symlinked copies of the real files under new names, so `--no-dedup` keeps every copy.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CACHE",
    "default_inputs",
    "default_tokenizer",
    "format_of",
    "list_files",
    "read_texts",
    "replicate",
]

CACHE = Path(os.environ.get("CPTSTREAM_CACHE", Path.home() / ".cache" / "cptstream"))

_SUFFIXES = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".jsonl.zst": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}


def default_inputs() -> list[Path]:
    """Return the real corpus directory that `scripts/fetch_assets.py` builds.

    Raises:
        FileNotFoundError: the corpus has not been built yet.
    """
    corpus = CACHE / "corpus"
    if not corpus.is_dir():
        raise FileNotFoundError(
            f"real corpus not found at {corpus}; build it with `python scripts/fetch_assets.py` "
            f"(or set CPTSTREAM_CACHE), or pass --inputs"
        )
    return [corpus]


def default_tokenizer() -> Path:
    """Return the real Qwen2 tokenizer directory that `scripts/fetch_assets.py` builds.

    Raises:
        FileNotFoundError: the tokenizer has not been built yet.
    """
    directory = CACHE / "qwen2"
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"real Qwen2 tokenizer not found at {directory}; build it with `python scripts/fetch_assets.py` "
            f"(or set CPTSTREAM_CACHE), or pass --tokenizer"
        )
    return directory


def format_of(path: Path) -> str | None:
    """Return the `datasets` builder name for a corpus file (`json`, `parquet`, `text`), or None."""
    name = path.name
    for suffix, builder in _SUFFIXES.items():
        if name.endswith(suffix):
            return builder
    return None


def list_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories into the supported files, in the order `cptstream shard` reads them.

    Hidden entries are skipped and directories are walked in sorted order, as the Rust reader does.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input file has an unsupported extension, or no supported file was found.
    """
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files.extend(_walk(path))
        elif path.is_file():
            if format_of(path) is None:
                raise ValueError(f"{path}: unsupported input type; expected {', '.join(_SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} not found")
    if not files:
        raise ValueError(f"no supported input file found in {[str(p) for p in inputs]}")
    return files


def _walk(directory: Path) -> list[Path]:
    found: list[Path] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            found.extend(_walk(path))
        elif format_of(path) is not None:
            found.append(path)
    return found


def read_texts(files: Iterable[Path], text_field: str = "text") -> list[str]:
    """Read every document of the files into memory, in order.

    JSONL records without a string `text_field` and blank lines are skipped, as `cptstream shard`
    skips and counts them.
    """
    texts: list[str] = []
    for path in files:
        kind = format_of(path)
        if kind == "text":
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            column = pq.read_table(path, columns=[text_field]).column(text_field)
            texts.extend(text for text in column.to_pylist() if isinstance(text, str))
        elif kind == "json":
            for line in io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace"):
                if not line.strip():
                    continue
                value = json.loads(line).get(text_field)
                if isinstance(value, str):
                    texts.append(value)
    return texts


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def replicate(inputs: Iterable[str | Path], copies: int, destination: Path) -> list[Path]:
    """Make `copies` symlinked copies of the inputs under `destination`, one directory per copy.

    Returns:
        The copy directories, to pass as inputs. Each contains one symlink per input, named after it.

    Raises:
        ValueError: `copies` is below 1, or two inputs share a name.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    sources = [Path(p).resolve() for p in inputs]
    names = [p.name for p in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"inputs must have distinct names to be copied, got {names}")
    directories = []
    for copy in range(copies):
        directory = destination / f"copy_{copy:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for source in sources:
            link = directory / source.name
            if not link.is_symlink():
                link.symlink_to(source, target_is_directory=source.is_dir())
        directories.append(directory)
    return directories
