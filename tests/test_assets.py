"""Checks on the real assets that scripts/fetch_assets.py builds into the cache.

Tests that need the cache skip, naming the missing path, until `python scripts/fetch_assets.py` has
run. The extraction helpers are also tested on inline inputs, which needs no cache.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer

CACHE = Path(os.environ.get("CPTSTREAM_CACHE", Path.home() / ".cache" / "cptstream"))
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"
# Cases in the llama.cpp files vendored by llama-cpp-python 0.3.36, the version fetch_assets.py pins.
REFERENCE_CASES = 46


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not built; run `python scripts/fetch_assets.py` (cache: {CACHE})")
    return path


def load_tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_file(str(require(CACHE / name / "tokenizer.json")))


def read_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """Parse llama.cpp's .inp/.out pair; kept separate from the script's parser so a bug there shows here."""
    inp = require(CACHE / "reference" / f"ggml-vocab-{vocab}.gguf.inp")
    out = CACHE / "reference" / f"ggml-vocab-{vocab}.gguf.out"
    texts = inp.read_bytes().decode("utf-8").split(TEST_SEPARATOR)[:-1]
    lines = out.read_bytes().decode("utf-8").split("\n")[:-1]
    assert len(texts) == len(lines), f"{inp.name} has {len(texts)} strings, {out.name} has {len(lines)} lines"
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines)]


def reference_mismatches(tokenizer: Tokenizer, cases: list[tuple[str, list[int]]]) -> list[str]:
    mismatches = []
    for text, expected in cases:
        actual = tokenizer.encode(text, add_special_tokens=False).ids
        if actual != expected:
            mismatches.append(f"{text[:50]!r}: got {actual[:12]}, expected {expected[:12]}")
    return mismatches


# ---- Qwen2 tokenizer ----


def test_qwen2_reference_vectors_exact():
    tokenizer = load_tokenizer("qwen2")
    cases = read_cases("qwen2")

    assert len(cases) == REFERENCE_CASES
    # The cases cover whitespace runs, newlines, digits, emoji, Cyrillic, CJK, and contractions.
    assert any("\n\n" in text for text, _ in cases)
    assert any("\u4e00" <= ch <= "\u9fff" for text, _ in cases for ch in text)
    mismatches = reference_mismatches(tokenizer, cases)
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(mismatches)


def test_qwen2_special_token_ids():
    tokenizer = load_tokenizer("qwen2")

    assert tokenizer.get_vocab_size() == 151646
    assert tokenizer.token_to_id("<|endoftext|>") == 151643
    assert tokenizer.token_to_id("<|im_start|>") == 151644
    assert tokenizer.token_to_id("<|im_end|>") == 151645
    assert tokenizer.encode("a<|endoftext|>b", add_special_tokens=False).ids == [64, 151643, 65]


def test_qwen2_split_special_tokens():
    tokenizer = load_tokenizer("qwen2")
    text = "end of doc <|endoftext|> next"

    tokenizer.encode_special_tokens = True
    ids = tokenizer.encode(text, add_special_tokens=False).ids

    # Text that looks like a special token must not become one, or user data could inject EOS.
    assert 151643 not in ids
    assert tokenizer.encode("<|endoftext|>", add_special_tokens=False).ids == [27, 91, 8691, 723, 427, 91, 29]
    assert tokenizer.decode(ids) == text


def test_qwen2_adds_no_bos():
    tokenizer = load_tokenizer("qwen2")

    assert tokenizer.encode("Hello world", add_special_tokens=True).ids == [9707, 1879]


def test_qwen2_config_loads_in_transformers():
    directory = require(CACHE / "qwen2")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    transformers = pytest.importorskip("transformers")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))

    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert tokenizer.eos_token_id == 151643
    assert tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 32768
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]


# ---- Llama-3 tokenizer ----


def test_llama3_reference_vectors_exact():
    tokenizer = load_tokenizer("llama3")
    cases = read_cases("llama-bpe")

    assert len(cases) == REFERENCE_CASES
    mismatches = reference_mismatches(tokenizer, cases)
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(mismatches)


def test_llama3_prepends_bos_only():
    tokenizer = load_tokenizer("llama3")

    assert tokenizer.get_vocab_size() == 128256
    assert tokenizer.token_to_id("<|begin_of_text|>") == 128000
    assert tokenizer.token_to_id("<|end_of_text|>") == 128001
    assert tokenizer.encode("Hello world", add_special_tokens=True).ids == [128000, 9906, 1917]
    assert tokenizer.encode("Hello world", add_special_tokens=False).ids == [9906, 1917]


# ---- corpus ----


def read_corpus_file(path: Path) -> list[str]:
    """Return the document texts of one corpus output, in any of the formats the script writes."""
    if path.is_dir():
        return [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["text"]).column("text").to_pylist()

    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(set(r) == {"text", "source"} for r in records), f"{path.name}: records must be {{text, source}}"
    return [r["text"] for r in records]


@pytest.fixture(scope="module")
def corpus() -> tuple[dict, dict[str, list[str]]]:
    sources = json.loads(require(CACHE / "corpus" / "SOURCES.json").read_text(encoding="utf-8"))
    texts = {name: read_corpus_file(CACHE / "corpus" / name) for name in sources["files"]}
    return sources, texts


def test_corpus_matches_sources_json(corpus):
    sources, texts = corpus

    for name, entry in sources["files"].items():
        assert len(texts[name]) == entry["docs"], name
        assert sum(len(t.encode("utf-8")) for t in texts[name]) == entry["text_bytes"], name
    formats = {name.split(".", 1)[1] if "." in name else "txt-dir" for name in sources["files"]}
    assert formats == {"jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt-dir"}


def test_corpus_chinese_share(corpus):
    sources, texts = corpus
    zh = sum(len(t.encode("utf-8")) for n, e in sources["files"].items() if e["language"] == "zh" for t in texts[n])
    total = sum(len(t.encode("utf-8")) for docs in texts.values() for t in docs)

    assert zh / total >= 0.15
    assert total <= sources["corpus_mb"] * 1_000_000


def test_corpus_chinese_roundtrip(corpus):
    _, texts = corpus
    tokenizer = load_tokenizer("qwen2")
    docs = texts["zh-debian-reference.jsonl"] + texts["zh-linux-docs"][:40] + texts["zh-manpages.parquet"][:40]
    # Some translated kernel pages are mostly English boilerplate, so only pages with real Chinese text count.
    samples = [doc[:4000] for doc in docs if sum("\u4e00" <= ch <= "\u9fff" for ch in doc[:4000]) >= 200]

    assert len(samples) >= 60, f"only {len(samples)} of {len(docs)} Chinese docs have 200 CJK characters"
    for sample in samples:
        # The tokenizer applies NFC, so only NFC text can come back byte for byte.
        assert unicodedata.is_normalized("NFC", sample)
        ids = tokenizer.encode(sample, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == sample


# ---- extraction helpers (no cache needed) ----


@pytest.fixture(scope="module")
def asset_helpers():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import _assets_text
        import _assets_tokenizers
    finally:
        sys.path.remove(str(SCRIPTS))
    return _assets_text, _assets_tokenizers


def test_html_to_text_drops_navigation(asset_helpers):
    text_module, _ = asset_helpers
    html = (
        "<html><head><title>T</title><style>p {}</style></head><body>"
        '<div class="related" role="navigation"><ul><li>prev</li><div>next</div></ul></div>'
        '<h1>Title<a class="headerlink" href="#">\u00b6</a></h1>\n  <p>One   two\n three &amp; four.</p>'
        "<pre>  indented\n    code</pre><script>var x = 1;</script><nav>menu</nav><p>中文段落</p>"
        "</body></html>"
    )

    assert text_module.html_to_text(html) == "Title\nOne two three & four.\n  indented\n    code\n中文段落\n"


def test_reference_parser_keeps_crlf(asset_helpers, tmp_path):
    _, tokenizers_module = asset_helpers
    inp, out = tmp_path / "v.inp", tmp_path / "v.out"
    inp.write_bytes(b"a\r\nb\n__ggml_vocab_test__\n\n__ggml_vocab_test__\n")
    out.write_bytes(b" 1 2\n\n")

    cases = tokenizers_module.read_reference_vectors(inp, out)

    assert cases == [("a\r\nb", [1, 2]), ("", [])]
