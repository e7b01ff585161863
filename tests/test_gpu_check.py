"""benches/gpu_train.py, the Python part of scripts/gpu_check.sh.

The CPU test runs the whole path on tiny sizes: the fallback corpus, a BPE tokenizer trained on
it, the real `cptstream shard`, a 2-layer tied Qwen2 model and the hf backend through `cptstream
train` in a child process. The unsloth backend needs CUDA, so there it must be reported as
skipped without failing the run. The `gpu` test runs the real check on the real tokenizer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from cptstream.tiny_model import train_tiny_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benches" / "gpu_train.py"
REPORT_KEYS = {"preset", "device", "versions", "steps", "data", "model", "backends", "exit_status"}
RESULT_KEYS = {"status", "exit_code", "reason", "wall_s", "steps", "final_loss", "tokens_per_s", "peak_mem_gib"}


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCH), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    """Shards of 64-token rows of standard-library docstrings, and their 512-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("gpu_check")
    corpus = run_bench("corpus", "--output", str(root / "corpus"), "--mb", "0.2")
    assert corpus.returncode == 0, corpus.stderr

    lines = (root / "corpus" / "stdlib-docstrings.jsonl").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tiny_tokenizer([json.loads(line)["text"] for line in lines], root / "tokenizer")
    run_cli(
        "shard",
        str(root / "corpus"),
        "--tokenizer",
        str(tokenizer),
        "--output",
        str(root / "shards"),
        "--seq-len",
        "64",
        "--val-fraction",
        "0.1",
        "--no-progress",
        check=True,
    )
    return root / "shards", tokenizer


def test_fallback_corpus_has_documents(tiny_shards, tmp_path):
    result = run_bench("corpus", "--output", str(tmp_path), "--mb", "0.05")
    assert result.returncode == 0, result.stderr
    documents = [json.loads(line) for line in (tmp_path / "stdlib-docstrings.jsonl").read_text().splitlines()]
    assert len(documents) >= 2
    assert all(len(document["text"]) >= 200 for document in documents)
    assert len({document["source"] for document in documents}) == len(documents)


def test_cpu_smoke_run_reports_hf(tiny_shards, tmp_path):
    shards, tokenizer = tiny_shards
    report_path = tmp_path / "report.json"
    result = run_bench(
        "run",
        "--data",
        str(shards),
        "--tokenizer",
        str(tokenizer),
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(report_path),
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "3",
        "--micro-batch-size",
        "2",
        "--grad-accum",
        "2",
        "--eval-batches",
        "2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hf       ok" in result.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert set(report) == REPORT_KEYS
    assert report["exit_status"] == 0
    assert report["model"]["tie_word_embeddings"] is True
    assert report["model"]["vocab_rows"] % 64 == 0
    assert report["data"]["seq_len"] == 64

    hf = report["backends"]["hf"]
    assert RESULT_KEYS <= set(hf)
    assert hf["status"] == "ok"
    assert hf["steps"] == 3
    assert math.isfinite(hf["final_loss"])
    assert hf["final_loss"] > 0
    assert math.isfinite(hf["eval_loss_first"])
    assert hf["tokens_per_s"] > 0
    assert hf["peak_mem_gib"] is None
    assert hf["trainable"]["weights"]["lora"]["float32"] > 0
    assert hf["trainable"]["weights"]["embeddings"]["float32"] > 0

    unsloth = report["backends"]["unsloth"]
    assert unsloth["status"] == "skipped"
    assert "CUDA" in unsloth["reason"]


def test_failed_backend_sets_exit_bit(tiny_shards, tmp_path):
    # A one-second limit stops the hf run while it imports torch, so the report must show the
    # failure and the exit status must carry hf's bit (2).
    shards, tokenizer = tiny_shards
    work = tmp_path / "work"
    result = run_bench(
        "run",
        "--data",
        str(shards),
        "--tokenizer",
        str(tokenizer),
        "--work",
        str(work),
        "--json",
        str(tmp_path / "report.json"),
        "--tiny",
        "--device",
        "cpu",
        "--backends",
        "hf",
        "--steps",
        "1",
        "--timeout-s",
        "1",
    )
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert result.returncode == 2
    assert report["backends"]["hf"]["status"] == "failed"
    assert "timed out" in report["backends"]["hf"]["reason"]
    assert "FAILED: hf" in result.stdout


def test_invalid_backend_name_rejected(tiny_shards, tmp_path):
    shards, tokenizer = tiny_shards
    result = run_bench(
        "run", "--data", str(shards), "--tokenizer", str(tokenizer), "--work", str(tmp_path), "--backends", "vllm"
    )
    assert result.returncode == 2
    assert "--backends 'vllm' is invalid" in result.stderr


@pytest.mark.gpu
def test_gpu_check_both_backends(qwen2_tokenizer, real_corpus, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_cli(
        "shard",
        str(real_corpus / "en-python-docs.jsonl.zst"),
        "--tokenizer",
        str(qwen2_tokenizer),
        "--output",
        str(tmp_path / "shards"),
        "--seq-len",
        "2048",
        "--val-fraction",
        "0.02",
        "--no-progress",
        check=True,
    )
    report_path = tmp_path / "report.json"
    result = run_bench(
        "run",
        "--data",
        str(tmp_path / "shards"),
        "--tokenizer",
        str(qwen2_tokenizer),
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(report_path),
        "--steps",
        "10",
        timeout=1200,
    )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stdout[-5000:]
    for backend in ("unsloth", "hf"):
        outcome = report["backends"][backend]
        assert outcome["status"] == "ok", (backend, outcome.get("reason"))
        assert outcome["steps"] == 10
        assert math.isfinite(outcome["final_loss"])
        assert outcome["peak_mem_gib"] > 0
        assert outcome["tokens_per_s"] > 0
