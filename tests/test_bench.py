"""Smoke runs of `cptstream bench shard` and `cptstream bench load` on a small corpus.

They check that the benchmarks still run and that their figures are consistent (token counts
that must agree across pipelines, packing efficiency, copies of the corpus), never timings.
A whitespace word-level tokenizer makes every token count exact.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_wordlevel_tokenizer, run_cli
from cptstream.bench.corpus import list_files, read_texts, replicate
from cptstream.bench.measure import JobError, run_job
from cptstream.bench.report import format_table

WORDS = [f"w{i}" for i in range(400)]
SEQ_LEN = 64


def _doc(rng: random.Random, index: int) -> str:
    # A unique first word keeps every document distinct, so deduplication drops none.
    length = rng.choice([3, 10, 30, 60, 150])
    return " ".join([f"doc{index}", *(rng.choice(WORDS) for _ in range(length - 1))])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> tuple[Path, Path, int]:
    """Corpus in every input format, its tokenizer, and the exact token count with one EOS per document."""
    root = tmp_path_factory.mktemp("bench")
    rng = random.Random(0)
    docs = [_doc(rng, i) for i in range(260)]
    corpus = root / "corpus"
    (corpus / "pages").mkdir(parents=True)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:100]))
    with gzip.open(corpus / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[100:160])
    pq.write_table(pa.table({"text": docs[160:240]}), corpus / "c.parquet")
    for i, d in enumerate(docs[240:]):
        (corpus / "pages" / f"{i:02d}.txt").write_text(d)

    vocab = sorted({word for d in docs for word in d.split()})
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    tokenizer = make_wordlevel_tokenizer(root / "tokenizer", vocab, config=config)
    tokens = sum(len(d.split()) + 1 for d in docs)
    return corpus, tokenizer, tokens


def test_reader_sees_every_document(small_corpus):
    corpus, _, tokens = small_corpus
    texts = read_texts(list_files([corpus]))
    assert len(texts) == 260
    assert sum(len(t.split()) + 1 for t in texts) == tokens


def test_replicate_makes_distinct_copies(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    copies = replicate([corpus], 3, tmp_path)
    files = list_files(copies)
    assert len(files) == 3 * len(list_files([corpus]))
    assert len(set(files)) == len(files)


def test_bench_shard_smoke(small_corpus, tmp_path):
    corpus, tokenizer, tokens = small_corpus
    out = tmp_path / "shard.json"
    proc = run_cli("bench", "shard", "--inputs", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", str(SEQ_LEN),
                   "--repeats", "1", "--threads", "1", "--scales", "1,2", "--json", str(out), check=True)
    figures = json.loads(out.read_text())
    assert "| cptstream shard (end to end)" in proc.stdout

    pipelines = figures["pipelines"]
    assert set(pipelines) == {"cptstream", "floor", "python"}
    for name in pipelines:
        assert pipelines[name]["tokens"] == tokens, name
        assert pipelines[name]["mb_per_s"] > 0, name
        assert pipelines[name]["peak_rss_bytes"] > 0, name

    cpt = pipelines["cptstream"]
    assert cpt["packing_efficiency"] == pytest.approx(tokens / (cpt["rows"] * SEQ_LEN))
    assert cpt["packing_efficiency"] >= 0.95
    python = pipelines["python"]
    assert python["doc_tokens"] == tokens
    assert python["packing_efficiency"] <= 1.0
    assert set(figures["ratios"]) == {"floor", "python"}
    assert figures["corpus"]["docs"] == 260

    scaling = figures["scaling"]
    assert [row["scale"] for row in scaling] == [1, 2]
    assert scaling[1]["tokens"] == 2 * scaling[0]["tokens"]
    limited = figures["memory_limit"]
    assert limited["completed"], limited.get("stderr_tail")
    assert limited["tokens"] == scaling[1]["tokens"]
    assert "bfd_packing_efficiency>=0.99" in figures["targets"]


def test_bench_load_smoke(small_corpus, tmp_path):
    corpus, tokenizer, tokens = small_corpus
    out = tmp_path / "load.json"
    proc = run_cli("bench", "load", "--inputs", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", str(SEQ_LEN),
                   "--workers", "0,1", "--repeats", "1", "--micro-batch-size", "4", "--json", str(out), check=True)
    figures = json.loads(out.read_text())
    assert "| stream" in proc.stdout

    assert figures["shards"]["tokens"] == tokens
    results = {(r["loader"], r["workers"]): r for r in figures["results"]}
    assert set(results) == {("stream", 0), ("stream", 1), ("datasets", 0), ("datasets", 1)}
    for key, result in results.items():
        assert result["tokens"] == tokens, key
        assert result["rows"] == figures["shards"]["rows"], key
        assert result["tokens_per_s"] > 0, key
    assert set(figures["ratios"]) == {"0", "1"}


def test_failed_job_raises_with_stderr(tmp_path):
    spec = {"inputs": [str(tmp_path / "missing")], "tokenizer": "x", "method": "encode_batch", "batch_docs": 1}
    with pytest.raises(JobError, match="not found"):
        run_job("tokenize_floor", spec, tmp_path)


def test_bench_cli_import_is_light():
    code = "import sys, cptstream.bench.cli; print('torch' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_table_right_aligns_numbers():
    table = format_table(["name", "MB/s"], [["a", 1.5], ["bb", 1234.0]])
    lines = table.splitlines()
    assert lines[1] == "|------|------:|"
    assert lines[2] == "| a    |  1.50 |"
    assert lines[3] == "| bb   | 1,234 |"
