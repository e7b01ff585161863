"""The measured pipelines, each run as `python -m cptstream.bench.jobs JOB SPEC.json RESULT.json`.

A job reads its arguments from SPEC.json, does its work and writes RESULT.json with `seconds` and
the counts that the orchestrator checks and reports. `seconds` is the job's own `perf_counter` time
for the work, after interpreter start-up and imports, which only the parent's wall time covers.
Imports happen inside each job so that one job's libraries never load into another's process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["JOBS"]


def cptstream_shard(spec: dict[str, Any]) -> dict[str, Any]:
    """`cptstream shard` end to end, as the command line runs it, then `cptstream verify` on the output."""
    from cptstream.shard import load_config, run
    from cptstream.shards import verify_dir

    started = time.perf_counter()
    cfg = load_config(None, {"inputs": spec["inputs"], "tokenizer": spec["tokenizer"], "output": spec["output"],
                             **spec.get("config", {})})
    manifest, _ = run(cfg, show_progress=False)
    seconds = time.perf_counter() - started

    started = time.perf_counter()
    report = verify_dir(spec["output"])
    verify_seconds = time.perf_counter() - started
    if report["problems"]:
        raise RuntimeError(f"cptstream verify found problems in {spec['output']}: {report['problems'][:5]}")
    counts = manifest["counts"]
    return {
        "seconds": seconds,
        "verify_seconds": verify_seconds,
        "tokens": counts["tokens"],
        "rows": counts["rows"],
        "seq_len": manifest["seq_len"],
        "docs_read": counts["docs_read"],
        "docs_kept": counts["docs_kept"],
        "text_bytes": counts["text_bytes"],
        "input_bytes": counts["input_bytes"],
        "pad_tokens": counts["pad_tokens"],
        "verified_tokens": report["tokens"],
    }


def tokenize_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Python `tokenizers` batch encoding of the documents, already in memory: no cleaning, packing or writing."""
    from tokenizers import Tokenizer

    from cptstream.bench.corpus import list_files, read_texts

    texts = read_texts(list_files(spec["inputs"]))
    tokenizer_path = Path(spec["tokenizer"])
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    # Same setting as the Rust pipeline: special-token strings inside raw text are plain text.
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, spec["method"])
    batch_docs = spec["batch_docs"]

    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), batch_docs):
        for encoding in encode(texts[start : start + batch_docs], add_special_tokens=False):
            tokens += len(encoding.ids)
    seconds = time.perf_counter() - started
    # One EOS per document, which the other pipelines append and count.
    return {"seconds": seconds, "tokens": tokens + len(texts), "docs": len(texts),
            "text_bytes": sum(len(text.encode("utf-8")) for text in texts)}


def python_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """`datasets` loading, `.map` tokenization with EOS, `trl.pack_dataset` and `save_to_disk`, from the files."""
    # An empty cache for every run, set before `datasets` reads its configuration on import.
    os.environ["HF_DATASETS_CACHE"] = spec["cache_dir"]
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    started = time.perf_counter()
    import datasets
    import pyarrow.compute as pc
    import trl
    from transformers import AutoTokenizer

    from cptstream.bench.corpus import format_of, list_files

    import_seconds = time.perf_counter() - started

    started = time.perf_counter()
    groups: dict[str, list[str]] = {}
    for path in list_files(spec["inputs"]):
        groups.setdefault(format_of(path), []).append(str(path))
    parts = []
    for builder, files in groups.items():
        # The text builder reads one document per file only with sample_by="document".
        options = {"sample_by": "document"} if builder == "text" else {}
        part = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=spec["cache_dir"], **options)
        parts.append(part.select_columns(["text"]))
    raw = datasets.concatenate_datasets(parts)

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = raw.map(tokenize, batched=True, num_proc=spec["num_proc"], remove_columns=["text"])
    packed = trl.pack_dataset(tokenized, spec["seq_len"], strategy=spec["strategy"])
    packed.save_to_disk(spec["output"])
    seconds = time.perf_counter() - started

    # ---- counts, not timed ----
    doc_lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_numpy()
    packed_lengths = pc.list_value_length(packed.data.column("input_ids")).to_numpy()
    seq_len = spec["seq_len"]
    return {
        "seconds": seconds,
        "import_seconds": import_seconds,
        "docs": len(raw),
        "doc_tokens": int(doc_lengths.sum()),
        "tokens": int(packed_lengths.sum()),
        "rows": len(packed),
        "seq_len": seq_len,
        "longest_row": int(packed_lengths.max()) if len(packed_lengths) else 0,
        # What trl's "bfd" strategy, which truncates documents longer than a row, would drop.
        "bfd_truncate_would_drop": int((doc_lengths - seq_len).clip(min=0).sum()),
    }


def load_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s that `PackedLoader` over `PackedDataset` delivers: one shuffled epoch, or `max_rows` rows."""
    from cptstream.data import PackedDataset, PackedLoader

    started = time.perf_counter()
    dataset = PackedDataset(spec["shards"], micro_batch_size=spec["micro_batch_size"],
                            num_workers=spec["num_workers"], epochs=1, seed=0)
    clock = _LoaderClock(started)
    for batch in PackedLoader(dataset):
        missing = {"input_ids", "labels", "position_ids"} - batch.keys()
        if missing:
            raise RuntimeError(f"PackedLoader batch lacks {sorted(missing)}")
        clock.batch(int(batch["num_tokens"].sum()), batch["input_ids"].shape[0])
        if spec["max_rows"] and clock.rows >= spec["max_rows"]:
            break
    return clock.result()


def load_datasets(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of `Dataset.from_file` on the same shards, a DataLoader and `DataCollatorWithFlattening`."""
    import torch
    from datasets import Dataset, concatenate_datasets
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithFlattening

    from cptstream.shards import read_manifest

    started = time.perf_counter()
    manifest = read_manifest(spec["shards"])
    shards = [Dataset.from_file(str(Path(spec["shards"]) / entry["path"])) for entry in manifest["splits"]["train"]]
    dataset = concatenate_datasets(shards)
    flatten = DataCollatorWithFlattening()

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        # The collator takes one feature per sequence, so a packed row goes in as its document pieces
        # (the padding tail dropped), and position ids restart at every piece as in PackedDataset.
        pieces = []
        for row in rows:
            start = 0
            for length in row["seq_lengths"]:
                pieces.append({"input_ids": row["input_ids"][start : start + length]})
                start += length
        batch = flatten(pieces)
        batch["num_rows"] = torch.tensor(len(rows))
        return batch

    generator = torch.Generator()
    generator.manual_seed(0)
    loader = DataLoader(dataset, batch_size=spec["micro_batch_size"], shuffle=True, num_workers=spec["num_workers"],
                        collate_fn=collate, generator=generator)
    clock = _LoaderClock(started)
    for batch in loader:
        clock.batch(batch["input_ids"].numel(), int(batch["num_rows"]))
        if spec["max_rows"] and clock.rows >= spec["max_rows"]:
            break
    return clock.result()


class _LoaderClock:
    """Counts a loader's tokens and rows, and times its steady state apart from its start-up.

    `seconds` runs from the first batch's arrival to the last one's and covers the tokens after the
    first batch. Start-up (building the dataset, forking workers, the first batch) is reported
    apart as `first_batch_seconds`, because a training run pays it once.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_at: float | None = None
        self.tokens = self.rows = self.batches = self.first_tokens = 0

    def batch(self, tokens: int, rows: int) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.first_tokens = tokens
        self.tokens += tokens
        self.rows += rows
        self.batches += 1

    def result(self) -> dict[str, Any]:
        if self.first_at is None or self.batches < 2:
            raise RuntimeError(f"the loader returned {self.batches} batches; at least 2 are needed to time it")
        return {"seconds": time.perf_counter() - self.first_at, "first_batch_seconds": self.first_at - self.started,
                "tokens": self.tokens, "timed_tokens": self.tokens - self.first_tokens, "rows": self.rows,
                "batches": self.batches}


JOBS = {
    "cptstream_shard": cptstream_shard,
    "tokenize_floor": tokenize_floor,
    "python_baseline": python_baseline,
    "load_stream": load_stream,
    "load_datasets": load_datasets,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in JOBS:
        print(f"usage: python -m cptstream.bench.jobs {{{','.join(JOBS)}}} SPEC.json RESULT.json", file=sys.stderr)
        return 2
    job, spec_path, result_path = argv
    result = JOBS[job](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
