"""`cptstream shard`: build the configuration, run the Rust pipeline with a progress bar, summarize.

Defaults live in one place, the Rust `ShardConfig`; a `--config` file (YAML or JSON, same keys
as the manifest's `config`) overrides them, and command-line flags override the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cptstream import _core
from cptstream.lock import DirLock

__all__ = ["load_config", "run", "format_summary"]


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge the defaults, a config file and the command-line overrides into one configuration.

    Raises:
        ValueError: the file is not a mapping or names a key that does not exist.
    """
    cfg: dict[str, Any] = json.loads(_core.default_config())
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of shard settings, got {type(data).__name__}")
        section = data.get("shard", data)
        for key, value in section.items():
            if key not in cfg:
                raise ValueError(f"{path}: unknown shard setting {key!r}; known settings: {', '.join(sorted(cfg))}")
            if key == "clean" and isinstance(value, dict):
                cfg["clean"].update(value)
            else:
                cfg[key] = value
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("clean."):
            cfg["clean"][key.removeprefix("clean.")] = value
        else:
            cfg[key] = value
    return cfg


def run(cfg: dict[str, Any], *, resume: bool = False, show_progress: bool = True) -> tuple[dict[str, Any], bool]:
    """Shard the inputs as configured and return the manifest and whether it was already complete.

    The output directory is locked for the whole run, so a second writer fails at once.

    Raises:
        cptstream.lock.LockHeldError: another process is writing to the output directory.
        ValueError: the configuration or an input is invalid (also under ``on_error: fail``).
        cptstream.TokenizerError: the tokenizer cannot be loaded or its EOS is not in the vocabulary.
    """
    output = Path(cfg["output"])
    bar = _ProgressBar() if show_progress else None
    with DirLock(output):
        try:
            text, already_complete, _ = _core.shard(json.dumps(cfg), resume, bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    return json.loads(text), already_complete


class _ProgressBar:
    """tqdm bar over documents with MB/s and tokens/s in the postfix."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(unit=" docs", dynamic_ncols=True, smoothing=0.1)
        self.started = time.perf_counter()

    def update(self, docs: int, text_bytes: int, tokens: int, rows: int, files_done: int, files_total: int) -> None:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.bar.n = docs
        self.bar.set_postfix_str(
            f"files {files_done}/{files_total} | {text_bytes / seconds / 1e6:.1f} MB/s | "
            f"{tokens / seconds:,.0f} tok/s | {rows:,} rows",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_summary(manifest: dict[str, Any]) -> str:
    """Render the manifest's counts as the final summary printed after a run."""
    c = manifest["counts"]
    tok = manifest["tokenizer"]
    seconds = max(manifest.get("run", {}).get("seconds", 0.0), 1e-9)
    slots = c["rows"] * manifest["seq_len"]
    fill = c["tokens"] / slots if slots else 0.0
    dropped = sum(c["docs_dropped"].values())
    splits = manifest["splits"]
    bos = f'"{tok["bos_token"]}" = {tok["bos_id"]}' if tok.get("bos_id") is not None else "off"
    lines = [
        f"files      {c['files_read']:,} read | failed: {_reasons(c['files_failed'])} | "
        f"skipped: {_reasons(c['files_skipped'])}",
        f"records    skipped: {_reasons(c['records_skipped'])}",
        f"documents  {c['docs_read']:,} read, {c['docs_kept']:,} kept "
        f"(train {c['docs_train']:,}, validation {c['docs_validation']:,}), {dropped:,} dropped: "
        f"{_reasons(c['docs_dropped'])}",
        f"tokens     {c['tokens']:,} in {c['rows']:,} rows of {manifest['seq_len']} "
        f"({manifest['packing']}, {fill:.2%} filled, {c['pad_tokens']:,} padding)",
        f"shards     train {len(splits['train'])}, validation {len(splits['validation'])}",
        f"speed      {c['text_bytes'] / seconds / 1e6:.2f} MB/s of text, {c['tokens'] / seconds:,.0f} tokens/s, "
        f"{c['docs_read'] / seconds:,.0f} docs/s over {seconds:.1f} s",
        f'EOS        "{tok["eos_token"]}" = {tok["eos_id"]} (from {tok["eos_source"]}); BOS {bos}',
    ]
    if c.get("dedup_false_positive_rate"):
        lines.append(f"dedup      Bloom filter in use, estimated false-positive rate {c['dedup_false_positive_rate']:.2e}")
    problems = manifest.get("problems") or {}
    if problems:
        lines.append("problems   (first locations per reason)")
        for reason, places in sorted(problems.items()):
            for place in places:
                lines.append(f"  {reason:<18} {place}")
    return "\n".join(lines)
