"""Checks that run before the model loads: the shards must fit the model and the config.

The tokenizer comparison reads only small files (tokenizer.json, tokenizer_config.json and
config.json). The largest token id comes from the manifest when it records `max_token_id`,
otherwise from one threaded scan of every shard (pyarrow decodes and reduces without the GIL),
cached in `OUTPUT/.cptstream/data_scan.json` under a fingerprint of the shard hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cptstream.train.manifest import Manifest, ShardInfo

__all__ = ["CheckError", "check_model_fits_shards", "scan_token_range"]

logger = logging.getLogger("cptstream")


class CheckError(ValueError):
    """Raised when the model, the shards and the config do not fit together; names both sides."""


def check_model_fits_shards(model_dir: Path, manifest: Manifest, seq_len: int, cache_dir: Path) -> None:
    """Compare the model's tokenizer and embedding size with the shards, and the config's sequence length.

    Args:
        model_dir: local base model directory.
        manifest: the loaded shard manifest.
        seq_len: the config's `model.max_seq_length`.
        cache_dir: directory for the token-range scan cache.

    Raises:
        CheckError: any mismatch; the message names both paths and both values.
    """
    data_dir = manifest.path.parent
    if seq_len != manifest.seq_len:
        raise CheckError(
            f"model.max_seq_length is {seq_len} but the shards in {data_dir} have seq_len {manifest.seq_len} "
            f"({manifest.path}); set model.max_seq_length: {manifest.seq_len} or reshard"
        )

    # Tokenizer identity: the exact bytes that tokenized the shards.
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckError(
            f"{tokenizer_file} not found: the model directory must contain the tokenizer.json it was trained with"
        )
    model_sha = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    shard_tokenizer = manifest.tokenizer
    if model_sha != shard_tokenizer.get("sha256"):
        raise CheckError(
            f"tokenizer mismatch: the shards in {data_dir} were made with {shard_tokenizer.get('path')} "
            f"(tokenizer.json sha256 {shard_tokenizer.get('sha256')}), but the model uses {tokenizer_file} "
            f"(sha256 {model_sha}); train the model whose tokenizer made the shards, or reshard with this one"
        )

    # Vocabulary size and EOS id, in case the hash matched a tokenizer.json that differs in its config.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size != shard_tokenizer.get("vocab_size"):
        raise CheckError(
            f"vocabulary size mismatch: {manifest.path} records {shard_tokenizer.get('vocab_size')}, "
            f"{tokenizer_file} has {vocab_size}"
        )
    eos_id = _model_eos_id(model_dir, tokenizer)
    if eos_id is not None and eos_id != shard_tokenizer.get("eos_id"):
        raise CheckError(
            f"EOS mismatch: the shards in {data_dir} end documents with id {shard_tokenizer.get('eos_id')} "
            f"({shard_tokenizer.get('eos_token')!r}), the model in {model_dir} uses EOS id {eos_id}; "
            f"reshard with the model's EOS token or train the matching model"
        )

    # Every token id must index a row of the embedding matrix.
    embedding_rows = _embedding_rows(model_dir)
    low, high = scan_token_range(manifest, cache_dir)
    if low < 0 or high >= embedding_rows:
        raise CheckError(
            f"the shards in {data_dir} contain token ids {low}..{high}, but the model in {model_dir} has "
            f"{embedding_rows} embedding rows (config.json vocab_size); ids must be in 0..{embedding_rows - 1}"
        )


def _model_eos_id(model_dir: Path, tokenizer: object) -> int | None:
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return None if eos is None else tokenizer.token_to_id(eos)


def _embedding_rows(model_dir: Path) -> int:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckError(f"{config_file} not found: model.path must be a local transformers model directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rows = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    if not isinstance(rows, int):
        raise CheckError(f"{config_file} has no integer vocab_size, so the embedding size is unknown")
    return rows


def scan_token_range(manifest: Manifest, cache_dir: Path) -> tuple[int, int]:
    """Return the smallest and largest token id over all splits, from the manifest, a cache or a scan.

    Padding slots count too, because the pad id is looked up in the embedding like any token.
    """
    if isinstance(manifest.raw.get("max_token_id"), int) and isinstance(manifest.raw.get("min_token_id"), int):
        return manifest.raw["min_token_id"], manifest.raw["max_token_id"]

    shards = [shard for split in manifest.splits.values() for shard in split]
    fingerprint = hashlib.sha256("".join(shard.sha256 + str(shard.rows) for shard in shards).encode()).hexdigest()
    cache_file = cache_dir / "data_scan.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == fingerprint:
            return cached["min_token_id"], cached["max_token_id"]

    logger.info("scanning %d shards for the token id range (cached afterwards in %s)", len(shards), cache_file)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        ranges = list(pool.map(_shard_token_range, shards))
    low = min((r[0] for r in ranges if r is not None), default=0)
    high = max((r[1] for r in ranges if r is not None), default=-1)

    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps({"fingerprint": fingerprint, "min_token_id": low, "max_token_id": high}))
    os.replace(temporary, cache_file)
    return low, high


def _shard_token_range(shard: ShardInfo) -> tuple[int, int] | None:
    low = high = None
    with pa.memory_map(str(shard.path), "r") as source:
        for batch in pa.ipc.open_stream(source):
            values = batch.column("input_ids").values
            if len(values) == 0:
                continue
            extremes = pc.min_max(values)
            batch_low, batch_high = extremes["min"].as_py(), extremes["max"].as_py()
            low = batch_low if low is None else min(low, batch_low)
            high = batch_high if high is None else max(high, batch_high)
    return None if low is None else (low, high)
