"""`cptstream bench load`: tokens/s delivered to a training loop, streaming shards against `datasets`.

Both sides read the same packed rows (the train split of one `cptstream shard` output), shuffled,
in micro-batches of the same number of rows, and hand the loop `input_ids`, `labels` and
`position_ids` with positions restarting at every document:

- stream: `PackedLoader` over `PackedDataset` (memory-mapped shards, one record batch decoded at a
  time, numpy collation), padded `[B, T]` rows;
- datasets: `Dataset.from_file` on each shard, a `DataLoader` with `shuffle=True` and
  `transformers.DataCollatorWithFlattening` over the rows' document pieces, one flat `[1, N]` row.

Tokens are real tokens (padding excluded), so both sides count the same tokens per epoch. Each
configuration runs in its own process over one epoch (or `--max-rows` rows). Tokens/s is the
steady state, from the first batch to the last. Start-up (dataset, worker processes, first batch)
is reported apart, because a training run pays it once.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptstream.bench.measure import Measurement, run_job
from cptstream.bench.report import MIB, environment, format_table
from cptstream.log import logger

__all__ = ["LoadBenchConfig", "format_report", "run"]

TIMEOUT_SECONDS = 1800


@dataclass(kw_only=True, slots=True)
class LoadBenchConfig:
    shards: str | None = None
    """A finished `cptstream shard` output directory; default: shard `inputs` first."""
    inputs: list[str] | None = None
    """Corpus to shard when `shards` is not given."""
    tokenizer: str | None = None
    """Tokenizer to shard with when `shards` is not given."""
    seq_len: int = 4096
    """Row length when sharding here."""
    micro_batch_size: int = 8
    """Rows per batch on both sides."""
    workers: tuple[int, ...] = (0, 1, 2)
    """DataLoader worker counts to measure."""
    repeats: int = 3
    """Runs of each configuration; the table reports medians."""
    max_rows: int = 0
    """Rows per run; 0 reads one whole epoch."""
    work_dir: str | None = None
    """Directory for the shards made here and the logs; default: a temporary directory, removed at the end."""

    def __post_init__(self) -> None:
        if self.shards is None and (not self.inputs or not self.tokenizer):
            raise ValueError("give either shards (a cptstream shard output) or both inputs and tokenizer")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.workers or any(w < 0 for w in self.workers):
            raise ValueError(f"workers must be a non-empty list of counts >= 0, got {self.workers}")


def run(cfg: LoadBenchConfig) -> dict[str, Any]:
    """Shard if needed, then measure every (loader, workers) pair `repeats` times, interleaved."""
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="cptstream-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shards = cfg.shards
        if shards is None:
            shards = str(work / "shards")
            spec = {"inputs": cfg.inputs, "tokenizer": cfg.tokenizer, "output": shards, "config": {"seq_len": cfg.seq_len}}
            logger.info("sharding %s into %s", cfg.inputs, shards)
            run_job("cptstream_shard", spec, work / "logs", timeout=TIMEOUT_SECONDS)
        return _measure(cfg, shards, work)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _measure(cfg: LoadBenchConfig, shards: str, work: Path) -> dict[str, Any]:
    from cptstream.shards import read_manifest

    manifest = read_manifest(shards)
    runs: dict[tuple[str, int], list[Measurement]] = {}
    for repeat in range(cfg.repeats):
        for workers in cfg.workers:
            for loader, job in (("stream", "load_stream"), ("datasets", "load_datasets")):
                spec = {"shards": shards, "micro_batch_size": cfg.micro_batch_size, "num_workers": workers,
                        "max_rows": cfg.max_rows}
                m = run_job(job, spec, work / "logs", timeout=TIMEOUT_SECONDS)
                runs.setdefault((loader, workers), []).append(m)
                logger.info("repeat %d/%d %-8s workers=%d: %.2fM tokens/s", repeat + 1, cfg.repeats, loader, workers,
                            m.result["timed_tokens"] / m.result["seconds"] / 1e6)

    results = []
    for (loader, workers), measurements in runs.items():
        first = measurements[0].result
        results.append({
            "loader": loader,
            "workers": workers,
            "tokens_per_s": statistics.median(m.result["timed_tokens"] / m.result["seconds"] for m in measurements),
            "seconds": statistics.median(m.result["seconds"] for m in measurements),
            "first_batch_seconds": statistics.median(m.result["first_batch_seconds"] for m in measurements),
            "tokens": first["tokens"],
            "rows": first["rows"],
            "peak_rss_bytes": int(statistics.median(m.peak_rss for m in measurements)),
            "runs": [{"seconds": m.result["seconds"], "first_batch_seconds": m.result["first_batch_seconds"],
                      "timed_tokens": m.result["timed_tokens"]} for m in measurements],
        })
    ratios = {}
    for workers in cfg.workers:
        stream, baseline = runs[("stream", workers)], runs[("datasets", workers)]
        per_repeat = [(s.result["timed_tokens"] / s.result["seconds"]) / (d.result["timed_tokens"] / d.result["seconds"])
                      for s, d in zip(stream, baseline)]
        ratios[str(workers)] = {"median": statistics.median(per_repeat), "per_repeat": per_repeat}

    figures = {
        **environment(),
        "shards": {"path": shards, "rows": manifest["counts"]["rows"], "tokens": manifest["counts"]["tokens"],
                   "seq_len": manifest["seq_len"]},
        "config": {"micro_batch_size": cfg.micro_batch_size, "workers": list(cfg.workers), "repeats": cfg.repeats,
                   "max_rows": cfg.max_rows},
        "results": results,
        "ratios": ratios,
    }
    figures["targets"] = {f"stream_vs_datasets>=3 (workers={w})": r["median"] >= 3 for w, r in ratios.items()}
    return figures


def format_report(figures: dict[str, Any]) -> str:
    """Render the figures as the Markdown table that `docs/benchmarks.md` records."""
    shards, config = figures["shards"], figures["config"]
    header = (f"shards: {shards['rows']:,} rows of {shards['seq_len']}, {shards['tokens']:,} tokens; micro-batch "
              f"{config['micro_batch_size']} rows; {figures['machine']['cores_usable']} CPUs; medians of "
              f"{config['repeats']} runs")
    rows = []
    for result in figures["results"]:
        ratio = figures["ratios"][str(result["workers"])]["median"] if result["loader"] == "stream" else None
        rows.append([result["loader"], result["workers"], result["tokens_per_s"], result["tokens"], result["seconds"],
                     result["first_batch_seconds"], result["peak_rss_bytes"] / MIB, ratio])
    headers = ["loader", "workers", "tokens/s", "tokens", "steady s", "start-up s", "peak RSS MiB", "stream ×"]
    table = format_table(headers, rows)
    targets = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in figures["targets"].items())
    return f"{header}\n\n{table}\n\ntargets: {targets}"
