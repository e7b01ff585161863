"""End-to-end tests of `cptstream shard` through the command line and the Rust bindings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import make_wordlevel_tokenizer, run_cli
from cptstream import _core
from cptstream.shards import iter_rows, read_manifest

WORDS = [f"w{i}" for i in range(1, 40)] + ["a", "b", "Hello", "World", "中文︰测试，好！", "line2tail"]


def shard(tmp_path: Path, inputs: list[Path], tokenizer: Path, *extra: str, out: str = "out", check: bool = True):
    return run_cli(
        "shard", *map(str, inputs), "--tokenizer", str(tokenizer), "--output", str(tmp_path / out),
        "--no-progress", *extra, check=check,
    )


def rows(directory: Path, split: str = "train") -> list[tuple[list[int], list[int]]]:
    return list(iter_rows(directory, split))


def pieces(ids: list[int], lengths: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in lengths:
        out.append(ids[start : start + n])
        start += n
    return out


def tid(tok_dir: Path, token: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).token_to_id(token)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_llama3_style_bos_and_eos_once_per_doc(tmp_path):
    tok_dir = make_wordlevel_tokenizer(
        tmp_path / "tok", WORDS, specials=("<|begin_of_text|>", "<|end_of_text|>"), bos="<|begin_of_text|>",
        config={"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"},
    )
    info = json.loads(_core.tokenizer_info(str(tok_dir)))
    bos, eos = info["bos_id"], info["eos_id"]
    assert (bos, eos) == (1, 2)

    data = write_jsonl(tmp_path / "d.jsonl", ["Hello", "World"])
    shard(tmp_path, [data], tok_dir, "--seq-len", "16")
    (ids, lengths), = rows(tmp_path / "out")
    docs = pieces(ids, lengths)
    assert len(docs) == 2
    hello, world = tid(tok_dir, "Hello"), tid(tok_dir, "World")
    assert sorted(docs) == sorted([[bos, hello, eos], [bos, world, eos]])
    for doc in docs:
        assert doc.count(eos) == 1
        assert doc[-1] == eos
        assert doc.count(bos) == 1
        assert doc[0] == bos

    # `--bos never` drops it; a Qwen-style tokenizer (no template) gets none under auto.
    shard(tmp_path, [data], tok_dir, "--seq-len", "16", "--bos", "never", out="never")
    (ids, lengths), = rows(tmp_path / "never")
    assert bos not in ids[: sum(lengths)]


def test_missing_eos_fails_before_any_shard(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    data = write_jsonl(tmp_path / "d.jsonl", ["a b"])
    proc = shard(tmp_path, [data], tok_dir, "--eos-token", "<|no_such_token|>", check=False)
    assert proc.returncode != 0
    assert "<|no_such_token|>" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.arrow"))


def test_row_count_exact(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    data = write_jsonl(tmp_path / "d.jsonl", [" ".join(["w1"] * 7), " ".join(["w2"] * 7), "w3 w4 w5"])
    shard(tmp_path, [data], tok_dir, "--seq-len", "8")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["counts"]["rows"] == 3
    assert manifest["counts"]["tokens"] == 20
    assert sum(sum(lengths) for _, lengths in rows(tmp_path / "out")) == 20

    single = write_jsonl(tmp_path / "s.jsonl", ["w1 w2 w3 w4"])
    shard(tmp_path, [single], tok_dir, "--seq-len", "8", out="single")
    assert read_manifest(tmp_path / "single")["counts"]["rows"] == 1
    (ids, lengths), = rows(tmp_path / "single")
    assert lengths == [5]
    assert len(ids) == 8


def test_bfd_splits_long_document_into_new_segment():
    docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    packed = _core.pack(docs, 4, "bfd")
    tokens = sorted(t for ids, _ in packed for t in ids)
    assert tokens == list(range(1, 12))
    assert all(len(ids) <= 4 for ids, _ in packed)
    starts = {ids[sum(lengths[:i])] for ids, lengths in packed for i in range(len(lengths))}
    assert 5 in starts, f"the split-off piece [5] must start a segment: {packed}"
    assert packed[0] == ([1, 2, 3, 4], [4])


def test_jsonl_bad_records_counted_by_reason(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    lines = ['{"text": "a"}', '"bare string"', "[1, 2]", "42", '{"other": "x"}', "", '{"text": "b"}',
             '{"text": ""}', '{"text": null}']
    data = tmp_path / "nine.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shard(tmp_path, [data], tok_dir, "--seq-len", "8")
    manifest = read_manifest(tmp_path / "out")
    eos = manifest["tokenizer"]["eos_id"]
    kept = sorted(p for ids, lengths in rows(tmp_path / "out") for p in pieces(ids, lengths))
    assert kept == sorted([[tid(tok_dir, "a"), eos], [tid(tok_dir, "b"), eos]])

    counts = manifest["counts"]
    assert counts["records_skipped"] == {"not_object": 3, "missing_field": 1, "blank_line": 1, "null_field": 1}
    assert counts["docs_dropped"] == {"empty": 1}
    assert counts["docs_read"] == 3
    assert counts["docs_kept"] == 2
    problems = manifest["problems"]
    assert [p.split(":")[1] for p in problems["not_object"]] == ["2", "3", "4"]
    assert problems["missing_field"][0].split(":")[1] == "5"
    assert problems["null_field"][0].split(":")[1] == "9"
    assert problems["empty"][0].endswith(":8")

    strict = shard(tmp_path, [data], tok_dir, "--seq-len", "8", "--on-error", "fail", out="strict", check=False)
    assert strict.returncode != 0
    assert "nine.jsonl:2" in strict.stderr


def test_bom_and_invalid_utf8_policies(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS + ["\ufffd"])
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "w1"}\n{"text": "w2 \xff"}\n{"text": "w3"}\n')

    shard(tmp_path, [data], tok_dir, "--seq-len", "16")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["counts"]["docs_kept"] == 3
    tok = __import__("tokenizers").Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    decoded = [tok.decode(p) for ids, lengths in rows(tmp_path / "out") for p in pieces(ids, lengths)]
    assert "\ufeff" not in "".join(decoded)
    assert sorted(decoded) == sorted(["w1", "w2 \ufffd", "w3"])

    shard(tmp_path, [data], tok_dir, "--seq-len", "16", "--invalid-utf8", "skip", out="skip")
    manifest = read_manifest(tmp_path / "skip")
    assert manifest["counts"]["docs_kept"] == 2
    assert manifest["counts"]["records_skipped"] == {"invalid_utf8": 1}
    decoded = sorted(tok.decode(p) for ids, lengths in rows(tmp_path / "skip") for p in pieces(ids, lengths))
    assert decoded == ["w1", "w3"]


def test_cjk_text_document_cleaned_byte_for_byte(tmp_path):
    raw = "中文︰测试，好！\r\nline2\x00tail"
    assert _core.clean(raw) == "中文︰测试，好！\nline2tail"

    # The same text through a real text file and the real Qwen2 byte-level BPE when available;
    # the word-level tokenizer checks the pipeline path everywhere.
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    doc = tmp_path / "doc.txt"
    doc.write_bytes(raw.encode("utf-8"))
    shard(tmp_path, [doc], tok_dir, "--seq-len", "8")
    (ids, lengths), = rows(tmp_path / "out")
    eos = read_manifest(tmp_path / "out")["tokenizer"]["eos_id"]
    assert ids[: sum(lengths)] == [tid(tok_dir, "中文︰测试，好！"), tid(tok_dir, "line2tail"), eos]


def test_cjk_survives_real_qwen2(tmp_path, qwen2_tokenizer):
    raw = "中文︰测试，好！\r\nline2\x00tail"
    doc = tmp_path / "doc.txt"
    doc.write_bytes(raw.encode("utf-8"))
    shard(tmp_path, [doc], qwen2_tokenizer, "--seq-len", "64")
    (ids, lengths), = rows(tmp_path / "out")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen2_tokenizer / "tokenizer.json"))
    text = tok.decode(ids[: sum(lengths)], skip_special_tokens=False)
    assert text == "中文︰测试，好！\nline2tail<|endoftext|>"
    assert ids[sum(lengths) - 1] == 151643


def test_qwen2_reference_ids_from_rust(qwen2_tokenizer):
    from conftest import CACHE

    inp = CACHE / "reference" / "ggml-vocab-qwen2.gguf.inp"
    out = CACHE / "reference" / "ggml-vocab-qwen2.gguf.out"
    if not inp.is_file():
        pytest.skip(f"llama.cpp reference vectors not fetched ({inp})")
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    expected = [[int(t) for t in line.split()] for line in out.read_text(encoding="utf-8").split("\n")[: len(texts)]]
    got = _core.encode(str(qwen2_tokenizer), texts, add_eos=False)
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert len(texts) > 20
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"


def test_special_token_text_is_not_a_control_token(qwen2_tokenizer):
    ids = _core.encode(str(qwen2_tokenizer), ["before <|endoftext|> after"])[0]
    assert ids.count(151643) == 1
    assert ids[-1] == 151643


def test_same_bytes_whatever_the_thread_count(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    texts = [" ".join(f"w{1 + (i * 7 + j) % 39}" for j in range(1 + (i * 13) % 29)) for i in range(3000)]
    data = write_jsonl(tmp_path / "d.jsonl", texts)
    common = ["--seq-len", "32", "--shard-rows", "200", "--val-fraction", "0.1"]
    shard(tmp_path, [data], tok_dir, *common, "--num-threads", "1", out="t1")
    shard(tmp_path, [data], tok_dir, *common, "--num-threads", "2", out="t2")
    m1, m2 = read_manifest(tmp_path / "t1"), read_manifest(tmp_path / "t2")
    assert len(m1["splits"]["train"]) > 1
    assert m1["splits"]["validation"]
    assert m1["splits"] == m2["splits"]
    for split in ("train", "validation"):
        for entry in m1["splits"][split]:
            assert (tmp_path / "t1" / entry["path"]).read_bytes() == (tmp_path / "t2" / entry["path"]).read_bytes()


def test_shards_readable_by_pyarrow_and_datasets(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    data = write_jsonl(tmp_path / "d.jsonl", [f"w{i} w{i + 1}" for i in range(1, 30)])
    shard(tmp_path, [data], tok_dir, "--seq-len", "8")
    manifest = read_manifest(tmp_path / "out")
    entry = manifest["splits"]["train"][0]
    path = tmp_path / "out" / entry["path"]

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.column_names == ["input_ids", "seq_lengths"]
    assert table.num_rows == entry["rows"]

    # Seek to the last record batch by its recorded offset.
    buf = pa.memory_map(str(path)).read_buffer()
    schema = pa.ipc.open_stream(buf).schema
    batch = pa.ipc.read_record_batch(pa.ipc.read_message(buf.slice(entry["batch_offsets"][-1])), schema)
    assert batch.num_rows >= 1

    import datasets

    ds = datasets.Dataset.from_file(str(path))
    assert len(ds) == entry["rows"]
    assert all(len(r) == 8 for r in ds["input_ids"])


def test_verify_names_the_changed_shard(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    data = write_jsonl(tmp_path / "d.jsonl", [f"w{i} w{i + 1} w{i + 2}" for i in range(1, 35)])
    shard(tmp_path, [data], tok_dir, "--seq-len", "8", "--shard-rows", "4")
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0

    manifest = read_manifest(tmp_path / "out")
    victim = tmp_path / "out" / manifest["splits"]["train"][1]["path"]
    data_bytes = bytearray(victim.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    victim.write_bytes(bytes(data_bytes))
    proc = run_cli("verify", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert manifest["splits"]["train"][1]["path"] in proc.stdout
    assert manifest["splits"]["train"][0]["path"] not in proc.stdout


def test_compressed_and_parquet_inputs(tmp_path):
    import gzip

    import pyarrow.parquet as pq
    import zstandard

    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "w1"}\n{"text": "w2"}\n'))
    (inputs / "b.jsonl.gz").write_bytes(gzip.compress(b'{"content": "w3"}\n'))
    pq.write_table(pa.table({"content": ["w4", None, "w5"]}), inputs / "c.parquet")
    (inputs / "d.md").write_text("w6 w7", encoding="utf-8")
    (inputs / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    shard(tmp_path, [inputs], tok_dir, "--seq-len", "8", "--text-field", "content", "--tolerate-bad-files")
    counts = read_manifest(tmp_path / "out")["counts"]
    # a.jsonl.zst uses "text", so with --text-field content its records are missing the field.
    assert counts["records_skipped"] == {"missing_field": 2, "null_field": 1}
    assert counts["docs_kept"] == 4
    assert counts["files_skipped"] == {"unsupported_file": 1}


def test_real_llama3_bos_and_eos_once_per_doc(tmp_path):
    from conftest import CACHE

    llama3 = CACHE / "llama3"
    if not (llama3 / "tokenizer.json").is_file():
        pytest.skip(f"real Llama-3 tokenizer not built ({llama3})")
    data = write_jsonl(tmp_path / "d.jsonl", ["Hello", "World"])
    shard(tmp_path, [data], llama3, "--seq-len", "16")
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == (128000, 128001)
    (ids, lengths), = rows(tmp_path / "out")
    docs = pieces(ids, lengths)
    assert sorted(docs) == sorted([[128000, 9906, 128001], [128000, 10343, 128001]])


def test_duplicates_and_filters_counted_from_config_file(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    texts = ["w1 w2", "w1 w2", "w1  w2  \r\n", "w3", "w4 w5 w6", "!!! ### $$$ w7"]
    data = write_jsonl(tmp_path / "d.jsonl", texts)
    config = tmp_path / "shard.yaml"
    config.write_text("seq_len: 16\nclean:\n  min_chars: 3\n", encoding="utf-8")
    shard(tmp_path, [data], tok_dir, "--config", str(config))
    manifest = read_manifest(tmp_path / "out")
    # "w1  w2  \r\n" cleans to "w1  w2", which differs from "w1 w2" by a space: not a duplicate.
    assert manifest["counts"]["docs_dropped"] == {"duplicate": 1, "too_short": 1, "symbol_ratio": 1}
    assert manifest["counts"]["docs_kept"] == 3
    assert manifest["config"]["clean"]["min_chars"] == 3
    assert manifest["seq_len"] == 16

    # Without deduplication the copy stays.
    shard(tmp_path, [data], tok_dir, "--config", str(config), "--no-dedup", out="nodedup")
    assert read_manifest(tmp_path / "nodedup")["counts"]["docs_kept"] == 4


def test_resume_on_complete_output_is_a_no_op(tmp_path):
    tok_dir = make_wordlevel_tokenizer(tmp_path / "tok", WORDS)
    data = write_jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3"])
    shard(tmp_path, [data], tok_dir, "--seq-len", "8")
    before = (tmp_path / "out" / "manifest.json").read_bytes()

    again = shard(tmp_path, [data], tok_dir, "--seq-len", "8", check=False)
    assert again.returncode == 2
    assert "--resume" in again.stderr

    resumed = shard(tmp_path, [data], tok_dir, "--seq-len", "8", "--resume")
    assert "already complete" in resumed.stderr
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
