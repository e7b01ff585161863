"""Hostile input: damaged and non-text files, bad records, panics, arbitrary bytes, untrusted model files.

Every case runs the real pipeline (the `cptstream` CLI or the `_core` bindings) on files written
here. Word-level tokenizers give one token per word, so token counts are exact.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_wordlevel_tokenizer, run_cli
from cptstream import CptstreamError, _core
from cptstream.shards import iter_rows, read_manifest

MAX_EXAMPLES = int(os.environ.get("CPTSTREAM_MAX_EXAMPLES", "40"))
WORDS = [f"w{i}" for i in range(200)]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa"


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def kept_docs(directory: Path) -> list[tuple[int, ...]]:
    """Every document piece in the train shards, as token tuples."""
    docs = []
    for ids, lengths in iter_rows(directory):
        start = 0
        for n in lengths:
            docs.append(tuple(ids[start : start + n]))
            start += n
    return docs


def encoded(tok_dir: Path, texts: list[str]) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in _core.encode(str(tok_dir), texts)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_wordlevel_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


# ---- damaged files ----


def test_bad_files_named_and_exit_follows_on_error(tmp_path, tok_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [f"w{i} w{i + 1} w{i + 2}" for i in range(0, 120)]
    (inputs / "a_good.jsonl").write_bytes(jsonl(good))

    # 20,000 documents (about 600 kB, several 128 KiB zstd blocks) unlike the good ones, cut at 60 % of the bytes.
    cut_texts = [f"w{i % 150} w{(i * 7) % 200} w{(i * 13) % 200} w{i % 199}" for i in range(20_000)]
    compressed = zstandard.ZstdCompressor().compress(jsonl(cut_texts))
    (inputs / "b_cut.jsonl.zst").write_bytes(compressed[: len(compressed) * 6 // 10])

    header = bytearray(gzip.compress(jsonl(["w1 w2"])))
    header[2] = 0x07  # compression method 7 is reserved; gzip defines only 8 (deflate)
    (inputs / "c_header.jsonl.gz").write_bytes(bytes(header))
    (inputs / "d_image.txt").write_bytes(PNG)

    common = ["--tokenizer", str(tok_dir), "--seq-len", "64", "--no-progress", "--no-dedup"]
    proc = run_cli("shard", str(inputs), "--output", str(tmp_path / "skip"), *common)
    assert proc.returncode == 3, proc.stderr
    manifest = read_manifest(tmp_path / "skip")
    assert manifest["counts"]["files_failed"] == {"truncated": 1, "corrupt_gzip": 1, "not_text": 1}
    for reason, name, detail in [
        ("truncated", "b_cut.jsonl.zst:", "incomplete frame"),
        ("corrupt_gzip", "c_header.jsonl.gz", "invalid gzip header"),
        ("not_text", "d_image.txt", "binary"),
    ]:
        lines = [line for line in proc.stdout.splitlines() if name in line]
        assert len(lines) == 1, proc.stdout
        assert lines[0].split()[0] == reason, lines[0]
        assert detail in lines[0], lines[0]

    # Every good document is kept; the cut file gives a whole prefix and never a partial line.
    docs = kept_docs(tmp_path / "skip")
    from_cut = len(docs) - len(good)
    assert 0 < from_cut < len(cut_texts)
    assert Counter(docs) == Counter(encoded(tok_dir, good) + encoded(tok_dir, cut_texts[:from_cut]))
    assert manifest["counts"]["docs_kept"] == len(docs)

    tolerated = run_cli("shard", str(inputs), "--output", str(tmp_path / "tolerate"), *common, "--tolerate-bad-files")
    assert tolerated.returncode == 0, tolerated.stderr

    strict = run_cli("shard", str(inputs), "--output", str(tmp_path / "fail"), *common, "--on-error", "fail")
    assert strict.returncode == 2
    assert "b_cut.jsonl.zst" in strict.stderr, strict.stderr
    assert "(truncated)" in strict.stderr, strict.stderr
    assert not (tmp_path / "fail" / "manifest.json").exists()


def test_record_problems_counted_with_locations(tmp_path, tok_dir):
    data = tmp_path / "records.jsonl"
    long_doc = " ".join(["w7"] * 1_000_000)  # about 3 MB on one line
    data.write_bytes(
        b'{"text": "w1"}\n'
        b'{"text": 5}\n'
        b'{"body": "w2"}\n'
        b'["w3"]\n'
        b'{"text": "w4 \xff"}\n'
        + json.dumps({"text": long_doc}).encode()
        + b"\n"
        + b'{"text": "w5"'  # a partial last line of a plain file is invalid JSON, never a document
    )
    (tmp_path / "empty.jsonl").write_bytes(b"")

    proc = run_cli(
        "shard", str(data), str(tmp_path / "empty.jsonl"), "--tokenizer", str(tok_dir), "--seq-len", "4096",
        "--output", str(tmp_path / "out"), "--no-progress", "--invalid-utf8", "skip",
    )
    assert proc.returncode == 0, proc.stderr

    manifest = read_manifest(tmp_path / "out")
    counts = manifest["counts"]
    assert counts["records_skipped"] == {"not_string": 1, "missing_field": 1, "not_object": 1, "invalid_utf8": 1,
                                         "invalid_json": 1}
    assert counts["files_skipped"] == {"empty_file": 1}
    assert counts["docs_kept"] == 2
    assert counts["tokens"] == 2 + 1_000_001

    problems = manifest["problems"]
    for reason, line in [("not_string", 2), ("missing_field", 3), ("not_object", 4), ("invalid_utf8", 5),
                         ("invalid_json", 7)]:
        assert problems[reason][0].startswith(f"{data}:{line}: "), problems[reason]
    assert problems["empty_file"] == [f"{tmp_path / 'empty.jsonl'}: no records"]
    assert f"{data}:2: " in proc.stdout


# ---- panics ----


def test_panic_is_exception_naming_record(tmp_path, tok_dir, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(["w1 w2", "w3", "w4 BOOM w5", "w6"]))
    monkeypatch.setenv("CPTSTREAM_TEST_PANIC_MARKER", "BOOM")

    cfg = json.loads(_core.default_config())
    cfg.update(inputs=[str(data)], tokenizer=str(tok_dir), output=str(tmp_path / "lib"), seq_len=16)
    with pytest.raises(CptstreamError) as raised:
        _core.shard(json.dumps(cfg))
    assert f"{data}:3" in str(raised.value)
    assert "test panic" in str(raised.value)

    proc = run_cli("shard", str(data), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "cli"), "--no-progress")
    assert proc.returncode == 2
    assert f"internal error while processing {data}:3" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- arbitrary bytes ----

EXTENSIONS = ["jsonl", "txt", "md", "jsonl.zst", "jsonl.gz", "txt.gz", "parquet"]
FILE_REASONS = {"truncated", "corrupt_zstd", "corrupt_gzip", "read_error", "not_text", "corrupt_parquet",
                "missing_field", "not_string"}
RECORD_REASONS = {"blank_line", "invalid_json", "not_object", "missing_field", "null_field", "not_string",
                  "invalid_utf8", "record_too_large"}


def compressed(data: bytes, extension: str, keep: float) -> bytes:
    """Compress `data` to match `extension`, so arbitrary bytes reach the JSONL and text readers, then cut it."""
    if extension.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif extension.endswith(".gz"):
        data = gzip.compress(data)
    return data[: round(len(data) * keep)]


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(
    data=st.binary(max_size=3000),
    extension=st.sampled_from(EXTENSIONS),
    wrap=st.booleans(),
    keep=st.sampled_from([1.0, 0.97, 0.6, 0.1]),
)
def test_arbitrary_bytes_never_crash(tok_dir, data, extension, wrap, keep):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input.{extension}"
        path.write_bytes(compressed(data, extension, keep) if wrap else data)
        cfg = json.loads(_core.default_config())
        cfg.update(inputs=[str(path)], tokenizer=str(tok_dir), output=str(Path(tmp) / "out"), seq_len=32)
        manifest = json.loads(_core.shard(json.dumps(cfg))[0])
        counts = manifest["counts"]
        assert set(counts["files_failed"]) <= FILE_REASONS
        assert set(counts["records_skipped"]) <= RECORD_REASONS
        assert counts["files_read"] == 1


@settings(max_examples=MAX_EXAMPLES * 5, deadline=None)
@given(text=st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("utf-8", "replace")))
def test_clean_idempotent_on_any_text(text):
    once = _core.clean(text)
    assert _core.clean(once) == once
    nfkc = json.dumps({"normalization": "nfkc"})
    once = _core.clean(text, nfkc)
    assert _core.clean(once, nfkc) == once


# ---- untrusted paths, model files and checkpoints ----


def test_manifest_paths_stay_inside(tmp_path, tok_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(["w1 w2 w3"] + [f"w{i}" for i in range(4, 40)]))
    out = tmp_path / "out"
    run_cli("shard", str(data), "--tokenizer", str(tok_dir), "--output", str(out), "--seq-len", "8", check=True)
    secret = tmp_path / "secret.arrow"
    secret.write_bytes((out / "train" / "shard_00000.arrow").read_bytes())
    manifest = read_manifest(out)
    original = json.dumps(manifest)

    from cptstream.train.manifest import load_manifest

    (out / "train" / "link.arrow").symlink_to(secret)
    for bad in ["../secret.arrow", str(secret), "train/link.arrow"]:
        changed = json.loads(original)
        changed["splits"]["train"][0]["path"] = bad
        (out / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="shard path"):
            list(iter_rows(out))
        with pytest.raises(ValueError, match="shard path"):
            load_manifest(out)
    for bad in ["../secret.arrow", str(secret), "train/link.arrow"]:
        changed = json.loads(original)
        changed["splits"]["train"][0]["path"] = bad
        (out / "manifest.json").write_text(json.dumps(changed))
        proc = run_cli("verify", str(out))
        assert proc.returncode == 1
        assert f"FAIL train: {bad}: path leaves the output directory" in proc.stdout


class _RunsCode:
    """A pickle payload that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from cptstream.tiny_model import build_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("model")
    tokenizer = train_tiny_tokenizer(["continued pretraining on hostile input " * 20], root / "tok", vocab_size=300)
    return build_tiny_model(tokenizer, root / "model")


def load_run(model_dir: Path, output: Path):
    import torch

    from cptstream.train.config import load_config
    from cptstream.train.lora import load_model, param_groups

    config_file = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
    config = load_config(config_file, {"model.path": str(model_dir), "train.output": str(output)})
    loaded = load_model(config, "hf", torch.float32)
    optimizer = torch.optim.AdamW(param_groups(loaded.model, 1e-3, None, 0.0))
    return loaded.model, optimizer


def test_model_dir_code_never_runs(tmp_path, tiny_model):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    marker = tmp_path / "code-ran"
    (model_dir / "evil_model.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))

    try:
        load_run(model_dir, tmp_path / "run")
    except ValueError as err:  # transformers may also refuse the directory outright
        assert "trust_remote_code" in str(err)
    assert not marker.exists(), "loading the model ran Python code from the model directory"


def test_checkpoint_pickle_never_runs(tmp_path, tiny_model):
    from cptstream.train.checkpoint import load_checkpoint, save_checkpoint

    model, optimizer = load_run(tiny_model, tmp_path / "run")
    path = save_checkpoint(tmp_path / "run", step=1, model=model, optimizer=optimizer, trainer_state={}, keep=1)
    assert load_checkpoint(path, model, optimizer)["step"] == 1

    marker = tmp_path / "code-ran"
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _RunsCode(marker)}))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, model, optimizer)
    assert not marker.exists(), "resuming unpickled code from a checkpoint"
