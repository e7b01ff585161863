"""`cptstream bench shard`: cptstream against the tokenization floor and the standard Python path.

Three pipelines read the same files with the same tokenizer on the same CPUs (each child is
pinned to them), interleaved within every repeat so that a ratio compares runs that saw the
same machine load:

1. `cptstream shard`, files in, shards out, then `verify` (timed separately);
2. the floor: Python `tokenizers` batch encoding of the documents already in memory;
3. the standard Python path: `datasets` loading, `.map` tokenization with EOS over `num_proc`
   processes, `trl.pack_dataset` to the same row length and `save_to_disk`, each run with an
   empty `datasets` cache.

MB/s is the corpus's document text (UTF-8 bytes, as read from the files) over each job's own work
time. That time excludes interpreter start-up and imports, which take well under a second for
cptstream and several seconds for `datasets` + `transformers` + `trl`, so it favours the Python path.

The memory part runs `cptstream shard --no-dedup` on 1x, 4x, 16x copies of the corpus and once
more under a hard memory limit below the largest corpus's text size.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptstream.bench.corpus import list_files, read_texts, replicate
from cptstream.bench.measure import Measurement, cgroup_root, run_job
from cptstream.bench.report import MIB, environment, format_table
from cptstream.log import logger

__all__ = ["PIPELINES", "ShardBenchConfig", "format_report", "run"]

PIPELINES = ("cptstream", "floor", "python")
TIMEOUT_SECONDS = 3600


@dataclass(kw_only=True, slots=True)
class ShardBenchConfig:
    inputs: list[str]
    """Corpus files or directories."""
    tokenizer: str
    """Tokenizer directory (tokenizer.json and tokenizer_config.json)."""
    seq_len: int = 4096
    """Tokens per row, for cptstream and trl alike."""
    repeats: int = 3
    """Runs of each pipeline; the tables report medians."""
    threads: int = 0
    """CPUs every pipeline may use (threads, processes, affinity); 0 for all usable CPUs."""
    pipelines: tuple[str, ...] = PIPELINES
    """Subset of `PIPELINES` to compare."""
    scales: tuple[int, ...] = (1, 4, 16)
    """Corpus copies for the memory test; empty skips it."""
    memory_limit_mb: int = 384
    """Hard memory-cgroup limit for the limited run, in MiB; 0 skips it."""
    address_space_limit_mb: int = 4096
    """RLIMIT_AS for the limited run when no cgroup can be created, in MiB."""
    trl_strategy: str = "bfd_split"
    """trl.pack_dataset strategy. trl 1.15's "bfd" truncates documents longer than a row; "bfd_split" keeps every token as cptstream does."""
    floor_method: str = "encode_batch_fast"
    """tokenizers method of the floor: `encode_batch_fast` (ids only, as the Rust pipeline encodes) or `encode_batch`."""
    floor_batch_docs: int = 1000
    """Documents per floor batch call."""
    work_dir: str | None = None
    """Directory for outputs and logs; default: a temporary directory, removed at the end."""
    cpus: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        unknown = set(self.pipelines) - set(PIPELINES)
        if unknown or "cptstream" not in self.pipelines:
            raise ValueError(f"pipelines must include cptstream and be among {PIPELINES}, got {self.pipelines}")
        if any(scale < 1 for scale in self.scales):
            raise ValueError(f"scales must be >= 1, got {self.scales}")
        if self.trl_strategy not in ("bfd", "bfd_split", "wrapped"):
            raise ValueError(f"trl_strategy must be bfd, bfd_split or wrapped, got {self.trl_strategy!r}")
        usable = sorted(os.sched_getaffinity(0))
        if self.threads < 0 or self.threads > len(usable):
            raise ValueError(f"threads must be between 0 and the {len(usable)} usable CPUs, got {self.threads}")
        self.threads = self.threads or len(usable)
        self.cpus = set(usable[: self.threads])


def run(cfg: ShardBenchConfig) -> dict[str, Any]:
    """Run every part of the benchmark and return the figures (also what the JSON file contains)."""
    files = list_files(cfg.inputs)
    texts = read_texts(files)
    corpus = {
        "inputs": [str(p) for p in cfg.inputs],
        "files": len(files),
        "file_bytes": sum(p.stat().st_size for p in files),
        "docs": len(texts),
        "text_bytes": sum(len(text.encode("utf-8")) for text in texts),
    }
    del texts
    figures: dict[str, Any] = {**environment(), "corpus": corpus, "config": _config_record(cfg)}

    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="cptstream-bench-shard-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures["pipelines"], figures["ratios"] = _compare(cfg, work, corpus["text_bytes"])
        if cfg.scales:
            figures["scaling"] = _scaling(cfg, work)
        if cfg.memory_limit_mb and cfg.scales:
            figures["memory_limit"] = _limited(cfg, work, max(cfg.scales), figures["scaling"])
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    figures["targets"] = _targets(figures)
    return figures


def _config_record(cfg: ShardBenchConfig) -> dict[str, Any]:
    record = {name: getattr(cfg, name) for name in cfg.__slots__ if name not in ("cpus", "work_dir")}
    record["cpus"] = sorted(cfg.cpus)
    return record


def _shard_spec(cfg: ShardBenchConfig, inputs: list[str], output: Path, **config: Any) -> dict[str, Any]:
    return {"inputs": inputs, "tokenizer": cfg.tokenizer, "output": str(output),
            "config": {"seq_len": cfg.seq_len, "num_threads": cfg.threads, **config}}


def _compare(cfg: ShardBenchConfig, work: Path, text_bytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the pipelines `repeats` times, interleaved, and return their medians and the per-repeat ratios."""
    runs: dict[str, list[Measurement]] = {name: [] for name in cfg.pipelines}
    env = {"RAYON_NUM_THREADS": str(cfg.threads)}
    for repeat in range(cfg.repeats):
        for name in cfg.pipelines:
            output = work / f"{name}-{repeat}"
            if name == "cptstream":
                spec = _shard_spec(cfg, cfg.inputs, output)
            elif name == "floor":
                spec = {"inputs": cfg.inputs, "tokenizer": cfg.tokenizer, "method": cfg.floor_method,
                        "batch_docs": cfg.floor_batch_docs}
            else:
                spec = {"inputs": cfg.inputs, "tokenizer": cfg.tokenizer, "output": str(output), "seq_len": cfg.seq_len,
                        "num_proc": cfg.threads, "strategy": cfg.trl_strategy, "cache_dir": str(work / f"hf-cache-{repeat}")}
            job = {"cptstream": "cptstream_shard", "floor": "tokenize_floor", "python": "python_baseline"}[name]
            measurement = run_job(job, spec, work / "logs", env=env, cpus=cfg.cpus, timeout=TIMEOUT_SECONDS)
            runs[name].append(measurement)
            logger.info("repeat %d/%d %-9s %6.2f MB/s, peak RSS %d MiB", repeat + 1, cfg.repeats, name,
                        text_bytes / measurement.result["seconds"] / 1e6, measurement.peak_rss // MIB)
            # Outputs are removed at once: 16 copies of several hundred MB would not fit every disk.
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(work / f"hf-cache-{repeat}", ignore_errors=True)

    pipelines = {name: _summary(measurements, text_bytes) for name, measurements in runs.items()}
    ratios = {}
    for name in cfg.pipelines:
        if name == "cptstream":
            continue
        per_repeat = [other.result["seconds"] / cpt.result["seconds"] for cpt, other in zip(runs["cptstream"], runs[name])]
        ratios[name] = {"median": statistics.median(per_repeat), "per_repeat": per_repeat}
    return pipelines, ratios


def _summary(measurements: list[Measurement], text_bytes: int) -> dict[str, Any]:
    """Medians over the repeats of one pipeline, plus every run's raw figures."""
    first = measurements[0].result

    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    seconds = median([m.result["seconds"] for m in measurements])
    summary: dict[str, Any] = {
        "repeats": len(measurements),
        "seconds": seconds,
        "wall_seconds": median([m.seconds for m in measurements]),
        "mb_per_s": median([text_bytes / m.result["seconds"] / 1e6 for m in measurements]),
        "tokens_per_s": median([m.result["tokens"] / m.result["seconds"] for m in measurements]),
        "peak_rss_bytes": int(median([m.peak_rss for m in measurements])),
        "tokens": first["tokens"],
    }
    if "rows" in first:
        slots = first["rows"] * first["seq_len"]
        summary["rows"] = first["rows"]
        summary["packing_efficiency"] = first["tokens"] / slots if slots else 0.0
    for key in ("verify_seconds", "import_seconds"):
        if key in first:
            summary[key] = median([m.result[key] for m in measurements])
    for key in ("doc_tokens", "bfd_truncate_would_drop", "docs", "docs_kept"):
        if key in first:
            summary[key] = first[key]
    summary["runs"] = [{"seconds": m.result["seconds"], "wall_seconds": m.seconds, "max_rss_bytes": m.max_rss,
                        "tree_rss_bytes": m.tree_rss} for m in measurements]
    return summary


def _scaling(cfg: ShardBenchConfig, work: Path) -> list[dict[str, Any]]:
    """Peak RSS of `cptstream shard --no-dedup` on `scale` copies of the corpus, one run per scale."""
    rows = []
    for scale in cfg.scales:
        inputs = [str(p) for p in replicate(cfg.inputs, scale, work / f"corpus-x{scale}")]
        output = work / f"scaled-x{scale}"
        m = run_job("cptstream_shard", _shard_spec(cfg, inputs, output, dedup=False), work / "logs", cpus=cfg.cpus,
                    timeout=TIMEOUT_SECONDS)
        shutil.rmtree(output, ignore_errors=True)
        logger.info("scale %dx: peak RSS %d MiB", scale, m.peak_rss // MIB)
        rows.append({"scale": scale, "text_bytes": m.result["text_bytes"], "input_bytes": m.result["input_bytes"],
                     "tokens": m.result["tokens"], "rows": m.result["rows"], "peak_rss_bytes": m.peak_rss,
                     "max_rss_bytes": m.max_rss, "tree_rss_bytes": m.tree_rss, "peak_vms_bytes": m.peak_vms})
    return rows


def _limited(cfg: ShardBenchConfig, work: Path, scale: int, scaling: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the largest scale again under a hard memory limit and check that it finishes with the same tokens."""
    inputs = [str(p) for p in replicate(cfg.inputs, scale, work / f"corpus-x{scale}")]
    output = work / f"limited-x{scale}"
    unlimited = next(row for row in scaling if row["scale"] == scale)
    if cgroup_root() is not None:
        kind, limit = "cgroup memory limit (RSS + page cache)", cfg.memory_limit_mb * MIB
        options = {"cgroup_limit": limit}
    else:
        kind, limit = "RLIMIT_AS (virtual address space)", cfg.address_space_limit_mb * MIB
        options = {"address_space_limit": limit}
    m = run_job("cptstream_shard", _shard_spec(cfg, inputs, output, dedup=False), work / "logs", cpus=cfg.cpus,
                timeout=TIMEOUT_SECONDS, **options)
    shutil.rmtree(output, ignore_errors=True)
    completed = m.returncode == 0 and m.result.get("tokens") == unlimited["tokens"]
    logger.info("limited run (%s %d MiB): %s", kind, limit // MIB, "completed" if completed else "FAILED")
    return {"kind": kind, "limit_bytes": limit, "scale": scale, "text_bytes": unlimited["text_bytes"],
            "completed": completed, "returncode": m.returncode, "tokens": m.result.get("tokens"),
            "peak_rss_bytes": m.peak_rss, "peak_vms_bytes": m.peak_vms,
            "cgroup_peak_bytes": m.result.get("cgroup_peak_bytes"), "oom_kills": m.result.get("cgroup_oom_kills"),
            "stderr_tail": m.result.get("stderr_tail")}


def _targets(figures: dict[str, Any]) -> dict[str, Any]:
    """Compare the figures with the project's benchmark targets."""
    pipelines, ratios = figures["pipelines"], figures["ratios"]
    cpt = pipelines["cptstream"]
    targets: dict[str, Any] = {
        "bfd_packing_efficiency>=0.99": cpt["packing_efficiency"] >= 0.99,
    }
    if "python" in ratios:
        targets["speed_vs_python>=5"] = ratios["python"]["median"] >= 5
    if "floor" in ratios:
        targets["speed_vs_floor>=0.9"] = ratios["floor"]["median"] >= 0.9
    scaling = figures.get("scaling") or []
    if len(scaling) > 1:
        growth = scaling[-1]["peak_rss_bytes"] / scaling[0]["peak_rss_bytes"]
        targets["rss_growth_largest_vs_1x"] = growth
        targets["rss_growth<=1.2"] = growth <= 1.2
        targets["rss_largest<2GiB"] = scaling[-1]["peak_rss_bytes"] < 2 * 1024 * MIB
    if "memory_limit" in figures:
        targets["completes_under_memory_limit"] = figures["memory_limit"]["completed"]
    return targets


def format_report(figures: dict[str, Any]) -> str:
    """Render the figures as the Markdown tables that `docs/benchmarks.md` records."""
    corpus, config = figures["corpus"], figures["config"]
    machine = figures["machine"]
    header = (
        f"corpus: {corpus['docs']:,} documents, {corpus['text_bytes'] / 1e6:.1f} MB of text in {corpus['files']} files "
        f"({corpus['file_bytes'] / 1e6:.1f} MB on disk); seq_len {config['seq_len']}; {config['threads']} CPUs "
        f"of {machine['cores_usable']} ({machine['cpu']}); medians of {config['repeats']} runs"
    )
    lines = [header, ""]
    names = {"cptstream": "cptstream shard (end to end)", "floor": f"tokenizers {config['floor_method']} (floor)",
             "python": f"datasets + .map + trl {config['trl_strategy']} + save_to_disk"}
    rows = []
    for name, p in figures["pipelines"].items():
        ratio = figures["ratios"].get(name, {}).get("median") if name != "cptstream" else 1.0
        efficiency = f"{p['packing_efficiency']:.2%}" if "packing_efficiency" in p else "-"
        rows.append([names[name], p["mb_per_s"], p["tokens_per_s"], p["peak_rss_bytes"] / MIB,
                     efficiency, p["tokens"], p["seconds"], p["wall_seconds"], ratio])
    lines.append(format_table(["pipeline", "MB/s", "tokens/s", "peak RSS MiB", "packing eff.", "tokens",
                               "work s", "wall s", "cptstream ×"], rows))
    python = figures["pipelines"].get("python")
    if python and "bfd_truncate_would_drop" in python:
        lines.append(f"\ntrl strategy \"bfd\" would truncate {python['bfd_truncate_would_drop']:,} of "
                     f"{python['doc_tokens']:,} tokens ({python['bfd_truncate_would_drop'] / max(python['doc_tokens'], 1):.1%})")
    if figures.get("scaling"):
        base = figures["scaling"][0]["peak_rss_bytes"]
        rows = [[f"{row['scale']}x", row["text_bytes"] / 1e6, row["tokens"], row["peak_rss_bytes"] / MIB,
                 row["peak_rss_bytes"] / base, row["peak_vms_bytes"] / MIB] for row in figures["scaling"]]
        lines += ["", format_table(["corpus", "text MB", "tokens", "peak RSS MiB", "vs 1x", "peak virtual MiB"], rows)]
    limited = figures.get("memory_limit")
    if limited:
        outcome = "completed with the same token count" if limited["completed"] else "DID NOT COMPLETE"
        summary = (
            f"under {limited['kind']} of {limited['limit_bytes'] / MIB:.0f} MiB, {limited['scale']}x corpus "
            f"({limited['text_bytes'] / 1e6:.0f} MB of text): {outcome}, peak RSS {limited['peak_rss_bytes'] / MIB:.0f} "
            f"MiB, cgroup peak {(limited['cgroup_peak_bytes'] or 0) / MIB:.0f} MiB, OOM kills {limited['oom_kills']}"
        )
        lines += ["", summary]
    lines += ["", "targets: " + ", ".join(f"{k} {v if isinstance(v, bool) else round(v, 3)}"
                                           for k, v in figures["targets"].items())]
    return "\n".join(lines)
