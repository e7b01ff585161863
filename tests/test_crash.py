"""Crash recovery: SIGKILL at random moments, full disks, a second writer, and `cptstream verify`.

The kill harness runs on the real corpus and Qwen2 tokenizer when scripts/fetch_assets.py has
built them (CI does), and on a generated corpus in every input format otherwise. Kill moments are
random; the seed is in every failure message, and CPTSTREAM_CRASH_SEED replays a draw.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import CORPUS, QWEN2, make_wordlevel_tokenizer, run_cli
from cptstream.shards import read_manifest

SEED = int(os.environ.get("CPTSTREAM_CRASH_SEED", random.randrange(1 << 30)))
SHARD_KILLS = 5
WORDS = [f"w{i}" for i in range(200)]
# Part of the real corpus in all five input formats: about 15 s of sharding on 2 cores.
REAL_INPUTS = [
    "en-python-docs.jsonl.zst",
    "en-postgres-docs.jsonl.gz",
    "zh-debian-reference.jsonl",
    "zh-linux-docs",
    "zh-manpages.parquet",
]


# ---- inputs ----


def write_corpus(root: Path, documents: int = 12_000) -> list[str]:
    """Write random word documents as JSONL, zstd and gzip JSONL, Parquet and a folder of .txt files."""
    rng = random.Random(7)
    texts = [" ".join(f"w{rng.randrange(200)}" for _ in range(rng.randrange(5, 120))) for _ in range(documents)]
    parts = [texts[i::5] for i in range(5)]
    root.mkdir(parents=True, exist_ok=True)
    lines = [("".join(json.dumps({"text": t}) + "\n" for t in part)).encode() for part in parts]
    (root / "a.jsonl").write_bytes(lines[0])
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[1]))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines[2], mtime=0))
    pq.write_table(pa.table({"text": parts[3]}), root / "d.parquet")
    (root / "e").mkdir(exist_ok=True)
    for index, text in enumerate(parts[4][:300]):
        (root / "e" / f"{index:04d}.txt").write_text(text, encoding="utf-8")
    return [str(root)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], Path, list[str]]:
    """Inputs, tokenizer and shard flags for the kill harness: the real corpus when it is built."""
    real = [CORPUS / name for name in REAL_INPUTS]
    if (QWEN2 / "tokenizer.json").is_file() and all(path.exists() for path in real):
        return [str(path) for path in real], QWEN2, ["--seq-len", "1024", "--shard-rows", "128"]
    root = tmp_path_factory.mktemp("generated")
    tokenizer = make_wordlevel_tokenizer(root / "tok", WORDS)
    return write_corpus(root / "corpus"), tokenizer, ["--seq-len", "256", "--shard-rows", "100"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[list[str], Path]:
    """The generated corpus and its tokenizer, for tests that size disks and files to it."""
    root = tmp_path_factory.mktemp("small")
    return write_corpus(root / "corpus"), make_wordlevel_tokenizer(root / "tok", WORDS)


def shard_command(inputs: list[str], tokenizer: Path, output: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "cptstream.cli", "shard", *inputs, "--tokenizer", str(tokenizer),
        "--output", str(output), "--no-progress", "--num-threads", "2", "--val-fraction", "0.05", *flags,
    ]


def shard_hashes(output: Path) -> dict[str, str]:
    """sha256 of every .arrow file under `output`, by relative path, computed from the bytes."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output.rglob("*.arrow"))
    }


def reference_run(inputs: list[str], tokenizer: Path, output: Path, *flags: str) -> float:
    """Shard without interruption; returns the wall time in seconds."""
    started = time.monotonic()
    proc = subprocess.run(shard_command(inputs, tokenizer, output, *flags), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - started


def assert_same_output(resumed: Path, reference: Path, context: str) -> None:
    want, got = read_manifest(reference), read_manifest(resumed)
    assert shard_hashes(resumed) == shard_hashes(reference), context
    assert got["splits"] == want["splits"], context
    assert got["counts"] == want["counts"], context
    assert got["problems"] == want["problems"], context


# ---- kill and resume: shard ----


def test_shard_killed_five_times_resumes_identically(tmp_path, corpus):
    inputs, tokenizer, flags = corpus
    reference = tmp_path / "reference"
    seconds = reference_run(inputs, tokenizer, reference, *flags)
    shards = len(shard_hashes(reference))
    assert shards >= 10, f"only {shards} shards; the harness needs many checkpoints"

    rng = random.Random(SEED)
    output = tmp_path / "killed"
    checkpoint = output / ".cptstream" / "checkpoint.json"
    kills: list[str] = []
    while len(kills) < SHARD_KILLS:
        command = shard_command(inputs, tokenizer, output, *flags, *(["--resume"] if kills else []))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not kills:
            # The first kill lands anywhere in start-up or the first shards, before any checkpoint is sure.
            time.sleep(rng.uniform(0.05, 0.3) * seconds)
        else:
            # Later kills land after this process wrote a checkpoint, at a random point of a shard.
            before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 2 * seconds / shards))
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, f"seed {SEED}: run finished before kill {len(kills) + 1}"
        done = len(list(output.rglob("*.arrow")))
        kills.append(f"kill {len(kills) + 1} with {done} of {shards} shards on disk")
        assert not (output / "manifest.json").exists(), f"seed {SEED}: {kills[-1]} left a manifest"

    proc = subprocess.run(shard_command(inputs, tokenizer, output, *flags, "--resume"), capture_output=True, text=True)
    context = f"seed {SEED}, {'; '.join(kills)}"
    assert proc.returncode == 0, f"{context}\n{proc.stderr}"
    assert_same_output(output, reference, context)
    assert run_cli("verify", str(output)).returncode == 0, context


# ---- kill and resume: train ----


TRAIN_TEXTS = [
    "Continued pretraining adapts a language model to a domain corpus.",
    "继续预训练让语言模型适应领域语料。模型从原始文档中学习领域词汇。",
    "Packed rows hold several documents, and no document may attend to another.",
    "東京の研究所で新しい言語モデルを訓練した。日本語の文書も正しく扱う。",
]


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen2 model and shards of a small corpus made with `cptstream shard`."""
    from cptstream.tiny_model import build_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("train")
    tokenizer = train_tiny_tokenizer([t * 4 for t in TRAIN_TEXTS], root / "tok", vocab_size=300)
    model = build_tiny_model(tokenizer, root / "model")
    corpus = root / "corpus.jsonl"
    rng = random.Random(3)
    texts = [" ".join(rng.sample(TRAIN_TEXTS, 2))[: rng.randrange(20, 120)] + f" {i}" for i in range(120)]
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    run_cli("shard", str(corpus), "--tokenizer", str(model), "--seq-len", "32", "--val-fraction", "0.2",
            "--output", str(root / "shards"), "--no-progress", check=True)
    return model, root / "shards"


def train_command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
    return [
        sys.executable, "-m", "cptstream.cli", "train", "--config", str(config), "--model", str(model),
        "--data", str(data), "--output", str(output), "--max-steps", "10",
        "--set", "model.max_seq_length=32", "--set", "data.micro_batch_size=2", "--set", "data.num_workers=1",
        "--set", "lora.dropout=0.1", "--set", "checkpoint.every=3", "--set", "checkpoint.keep=5",
        "--set", "log.eval_every=100", "--set", "data.eval_max_batches=2", *extra,
    ]


def losses(output: Path, *, partial_ok: bool = False) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; with `partial_ok`, a line still being written is ignored."""
    records = []
    for line in (output / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not partial_ok:
                raise
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


def test_train_killed_twice_repeats_losses(tmp_path, train_inputs):
    model, data = train_inputs
    straight = tmp_path / "straight"
    proc = subprocess.run(train_command(model, data, straight), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 11))

    # Kill after a step between two checkpoints (every 3 steps), so steps past the checkpoint are lost.
    rng = random.Random(SEED)
    output = tmp_path / "killed"
    kills = []
    for target in (rng.choice([4, 5]), rng.choice([7, 8])):
        extra = ["--resume"] if kills else []
        # A new session, so the kill reaches the DataLoader worker too, as a job scheduler's kill does.
        process = subprocess.Popen(train_command(model, data, output, *extra), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        metrics = output / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and target in losses(output, partial_ok=True):
                break
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, f"seed {SEED}: training finished before the kill at step {target}"
        logged = max(losses(output, partial_ok=True))
        saved = max(int(p.name.removeprefix("step_")) for p in (output / "checkpoints").glob("step_*"))
        kills.append((target, logged, saved))

    proc = subprocess.run(train_command(model, data, output, "--resume"), capture_output=True, text=True)
    context = f"seed {SEED}, kills (target step, last logged step, last checkpoint): {kills}"
    assert proc.returncode == 0, f"{context}\n{proc.stderr}"
    assert any(logged > saved for _, logged, saved in kills), f"no kill fell between checkpoints: {context}"
    assert losses(output) == expected, context


# ---- writes that fail midway ----


def mount_tmpfs(directory: Path, size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")


def test_full_disk_names_path_then_resumes(tmp_path, small):
    inputs, tokenizer = small
    flags = ["--seq-len", "256", "--shard-rows", "100"]
    reference = tmp_path / "reference"
    reference_run(inputs, tokenizer, reference, *flags)
    total = sum(path.stat().st_size for path in reference.rglob("*"))

    disk = tmp_path / "disk"
    mount_tmpfs(disk, total // 2 // 4096 * 4096)
    try:
        output = disk / "out"
        proc = subprocess.run(shard_command(inputs, tokenizer, output, *flags), capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert re.search(rf"{re.escape(str(output))}/\S+: No space left on device", proc.stderr), proc.stderr
        assert "rerun the same command with --resume" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (output / "manifest.json").exists()
        finished = list(output.rglob("*.arrow"))
        assert finished, "the disk filled before the first shard; the test needs a later failure"
        for path in finished:  # a file under its final name is always a whole stream
            assert pa.ipc.open_stream(pa.memory_map(str(path))).read_all().num_rows > 0, path

        subprocess.run(["mount", "-o", f"remount,size={total * 4}", str(disk)], check=True)
        proc = subprocess.run(shard_command(inputs, tokenizer, output, *flags, "--resume"), capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        assert_same_output(output, reference, "after the disk was full")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_file_size_limit_names_path_then_resumes(tmp_path, small):
    inputs, tokenizer = small
    flags = ["--seq-len", "256", "--shard-rows", "100", "--no-dedup"]
    reference = tmp_path / "reference"
    reference_run(inputs, tokenizer, reference, *flags)
    limit = max(path.stat().st_size for path in reference.rglob("*.arrow")) // 2

    def limit_file_size() -> None:
        # With SIGXFSZ ignored, a write past the limit fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    output = tmp_path / "out"
    command = shard_command(inputs, tokenizer, output, *flags)
    proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert re.search(rf"{re.escape(str(output))}/train/shard_00000\.arrow\.tmp: File too large", proc.stderr), proc.stderr
    assert not (output / "manifest.json").exists()
    assert not list(output.rglob("*.arrow"))

    proc = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_output(output, reference, "after the file-size limit")


# ---- one writer per directory ----


def test_second_writer_names_holder_pid(tmp_path, small):
    inputs, tokenizer = small
    output = tmp_path / "out"
    first = subprocess.Popen(shard_command(inputs, tokenizer, output), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        # Freeze the first run once it holds the lock, so the second one surely finds it held.
        lock = output / ".cptstream.lock"
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)

        started = time.monotonic()
        second = run_cli("shard", *inputs, "--tokenizer", str(tokenizer), "--output", str(output), "--no-progress")
        assert second.returncode == 2
        assert f"in use by process {first.pid}" in second.stderr, second.stderr
        assert time.monotonic() - started < 30
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # The kernel dropped the killed holder's lock, so a resume starts at once.
    proc = subprocess.run(shard_command(inputs, tokenizer, output, "--resume"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- verify ----


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, small) -> Path:
    inputs, tokenizer = small
    output = tmp_path_factory.mktemp("pristine") / "out"
    reference_run(inputs, tokenizer, output, "--seq-len", "256", "--shard-rows", "400")
    return output


def damaged_copy(pristine: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy, read_manifest(copy)


def failures(directory: Path) -> list[str]:
    proc = run_cli("verify", str(directory))
    assert proc.returncode == 1, proc.stdout
    return [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]


def test_verify_names_truncated_shard(tmp_path, pristine):
    out, manifest = damaged_copy(pristine, tmp_path)
    victim = manifest["splits"]["train"][1]["path"]
    size = (out / victim).stat().st_size
    os.truncate(out / victim, size * 2 // 3)

    lines = failures(out)
    assert lines, "a truncated shard passed verify"
    assert all(f"train: {victim}: " in line for line in lines), lines
    assert any("sha256 is" in line for line in lines), lines


def test_verify_names_missing_shard(tmp_path, pristine):
    out, manifest = damaged_copy(pristine, tmp_path)
    victim = manifest["splits"]["train"][2]["path"]
    (out / victim).unlink()
    assert failures(out) == [f"FAIL train: {victim}: missing"]


def test_verify_names_manifest_mismatch(tmp_path, pristine):
    out, manifest = damaged_copy(pristine, tmp_path)
    entry = manifest["splits"]["train"][0]
    entry["rows"] += 1
    manifest["counts"]["tokens"] += 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(out / entry["path"], out / "train" / "shard_00099.arrow")

    lines = failures(out)
    assert f"FAIL train: {entry['path']}: holds {entry['rows'] - 1} rows, manifest says {entry['rows']}" in lines
    tokens = manifest["counts"]["tokens"]
    assert f"FAIL manifest.json: counts.tokens is {tokens}, but its shards list {tokens - 5} tokens" in lines
    assert "FAIL train: train/shard_00099.arrow: not listed in the manifest" in lines
    assert len(lines) == 4, lines  # the three above and counts.rows, which no longer adds up either
