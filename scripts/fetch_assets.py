#!/usr/bin/env python3
"""Fetch cptstream's real default input from package registries into a cache directory.

    python scripts/fetch_assets.py [--cache DIR] [--corpus-mb N]

Produces, under ${CPTSTREAM_CACHE:-~/.cache/cptstream}:
  qwen2/      Qwen2 tokenizer.json + tokenizer_config.json, converted from qwen.tiktoken (PyPI: dashscope)
  llama3/     Llama-3 tokenizer.json + tokenizer_config.json, from llama.cpp's vocab GGUF (PyPI: llama-cpp-python sdist)
  reference/  llama.cpp tokenizer test vectors (qwen2, llama-bpe, gpt-2) that both tokenizers must reproduce
  corpus/     English + Chinese documentation text from Debian packages, in every input format cptstream reads
  downloads/  the pinned wheel, sdist and .deb files everything above is built from

Each output directory is built aside and moved into place only when complete and checked, so a run
with a warm cache only reads the stamps and takes about a second. The paths produced are printed
on stdout, one per line; progress goes to stderr. See docs/real-input.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from _assets_cache import (
    STAMP_NAME,
    atomic_write_bytes,
    pip_download_wheel,
    publish_dir,
    pypi_download_sdist,
    read_stamp,
    remove_stale_temporaries,
    sha256_file,
    staging_dir,
)

logger = logging.getLogger("fetch_assets")

# Bump when the tokenizer conversion changes, so cached tokenizers are rebuilt.
TOKENIZER_RECIPE = 1

DASHSCOPE = {
    "name": "dashscope",
    "version": "2.0.2",
    "wheel": "dashscope-2.0.2-py3-none-any.whl",
    "sha256": "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258",
}
QWEN_TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"

LLAMA_CPP_PYTHON = {
    "name": "llama-cpp-python",
    "version": "0.3.36",
    "sha256": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}
# Reference vector pairs copied from the sdist's vendored llama.cpp. The qwen2 and llama-bpe pairs gate the builds.
REFERENCE_VOCABS = ("qwen2", "llama-bpe", "gpt-2")
LLAMA3_GGUF = "models/ggml-vocab-llama-bpe.gguf"


def default_cache() -> Path:
    return Path(os.environ.get("CPTSTREAM_CACHE", Path.home() / ".cache" / "cptstream"))


def _is_current(directory: Path, inputs: dict) -> bool:
    stamp = read_stamp(directory)
    return stamp is not None and stamp.get("inputs") == inputs


def _listing(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STAMP_NAME)


# ---- llama.cpp files from the llama-cpp-python sdist ----


def fetch_llama_cpp(cache: Path) -> tuple[Path, Path]:
    """Extract the reference vectors, the Llama-3 vocab GGUF and gguf-py from the sdist.

    Returns:
        (reference dir, llama.cpp dir holding models/ and gguf-py/).
    """
    reference, vendor = cache / "reference", cache / "llama.cpp"
    inputs = {"recipe": TOKENIZER_RECIPE, "sdist": f"{LLAMA_CPP_PYTHON['name']}=={LLAMA_CPP_PYTHON['version']}"}
    if _is_current(reference, inputs) and _is_current(vendor, inputs):
        return reference, vendor

    sdist = pypi_download_sdist(
        LLAMA_CPP_PYTHON["name"], LLAMA_CPP_PYTHON["version"], LLAMA_CPP_PYTHON["sha256"], cache / "downloads"
    )
    reference_members = {f"models/ggml-vocab-{v}.gguf.{ext}" for v in REFERENCE_VOCABS for ext in ("inp", "out")}
    ref_staged, vendor_staged = staging_dir(reference), staging_dir(vendor)

    # Member names are matched against fixed relative paths and written by hand, so no archive path
    # can escape the staging directories.
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    found = set()
    logger.info("extracting llama.cpp files from %s", sdist.name)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = member.name.removeprefix(prefix)
            is_gguf_py = rel.startswith("gguf-py/gguf/") and rel.endswith(".py") and ".." not in rel
            if rel in reference_members:
                targets = [ref_staged / Path(rel).name]
            elif rel == LLAMA3_GGUF or is_gguf_py:
                targets = [vendor_staged / rel]
            else:
                continue
            data = tar.extractfile(member).read()
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            found.add(rel)

    missing = (reference_members | {LLAMA3_GGUF, "gguf-py/gguf/__init__.py"}) - found
    if missing:
        raise RuntimeError(f"{sdist} is missing {sorted(missing)} under vendor/llama.cpp; check the pinned version")
    publish_dir(ref_staged, reference, {"inputs": inputs})
    publish_dir(vendor_staged, vendor, {"inputs": inputs})
    return reference, vendor


# ---- tokenizers ----


def fetch_qwen2(cache: Path, reference: Path) -> Path:
    """Build qwen2/ from dashscope's qwen.tiktoken and check it against the qwen2 reference vectors."""
    from _assets_tokenizers import (
        build_qwen2,
        check_reference_vectors,
        qwen2_tokenizer_config,
        read_reference_vectors,
        write_tokenizer_dir,
    )

    final = cache / "qwen2"
    inputs = {"recipe": TOKENIZER_RECIPE, "wheel": DASHSCOPE["wheel"], "sha256": DASHSCOPE["sha256"]}
    if _is_current(final, inputs):
        return final

    downloads = cache / "downloads"
    wheel = pip_download_wheel(
        DASHSCOPE["name"], DASHSCOPE["version"], DASHSCOPE["wheel"], DASHSCOPE["sha256"], downloads
    )
    try:
        with zipfile.ZipFile(wheel) as zf:
            ranks = zf.read(QWEN_TIKTOKEN_MEMBER)
    except KeyError as err:
        raise RuntimeError(f"{wheel} is missing {QWEN_TIKTOKEN_MEMBER}; check the pinned dashscope version") from err
    tiktoken_file = downloads / "qwen.tiktoken"
    atomic_write_bytes(tiktoken_file, ranks)

    logger.info("converting qwen.tiktoken to a Hugging Face tokenizer")
    tokenizer = build_qwen2(tiktoken_file)
    cases = read_reference_vectors(reference / "ggml-vocab-qwen2.gguf.inp", reference / "ggml-vocab-qwen2.gguf.out")
    check_reference_vectors(tokenizer, cases, "qwen2")

    staged = staging_dir(final)
    write_tokenizer_dir(staged, tokenizer, qwen2_tokenizer_config())
    stamp = {
        "inputs": inputs,
        "qwen_tiktoken_sha256": sha256_file(tiktoken_file),
        "reference_cases_matched": len(cases),
    }
    publish_dir(staged, final, stamp)
    return final


def fetch_llama3(cache: Path, reference: Path, vendor: Path) -> Path:
    """Build llama3/ from llama.cpp's Llama-3 vocab GGUF and check it against the llama-bpe vectors."""
    from _assets_tokenizers import (
        build_llama3,
        check_reference_vectors,
        llama3_tokenizer_config,
        read_reference_vectors,
        write_tokenizer_dir,
    )

    final = cache / "llama3"
    inputs = {"recipe": TOKENIZER_RECIPE, "sdist": f"{LLAMA_CPP_PYTHON['name']}=={LLAMA_CPP_PYTHON['version']}"}
    if _is_current(final, inputs):
        return final

    logger.info("building the Llama-3 tokenizer from %s", LLAMA3_GGUF)
    tokenizer = build_llama3(vendor / LLAMA3_GGUF, vendor / "gguf-py")
    cases = read_reference_vectors(
        reference / "ggml-vocab-llama-bpe.gguf.inp", reference / "ggml-vocab-llama-bpe.gguf.out"
    )
    check_reference_vectors(tokenizer, cases, "llama3")

    staged = staging_dir(final)
    write_tokenizer_dir(staged, tokenizer, llama3_tokenizer_config())
    publish_dir(staged, final, {"inputs": inputs, "reference_cases_matched": len(cases)})
    return final


# ---- corpus ----


def fetch_corpus(cache: Path, corpus_mb: float) -> Path:
    """Build corpus/ from Debian documentation packages; SOURCES.json doubles as its build stamp."""
    from _assets_corpus import CORPUS_RECIPE, build_corpus

    final = cache / "corpus"
    try:
        sources = json.loads((final / "SOURCES.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sources = None
    if sources is not None and sources.get("recipe") == CORPUS_RECIPE and sources.get("corpus_mb") == corpus_mb:
        return final

    staged = staging_dir(final)
    record = build_corpus(staged, cache / "downloads" / "debs", corpus_mb)
    (staged / "SOURCES.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    publish_dir(staged, final, stamp=None)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="cache directory (default: $CPTSTREAM_CACHE or ~/.cache/cptstream)")  # fmt: skip
    parser.add_argument("--corpus-mb", type=float, default=40.0,
                        help="corpus text budget in MB (10^6 bytes of UTF-8 text, default: 40)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.corpus_mb <= 0:
        parser.error(f"--corpus-mb must be positive, got {args.corpus_mb}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fetch_assets: %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    cache = args.cache.expanduser().resolve()
    for directory in (cache, cache / "downloads", cache / "downloads" / "debs"):
        remove_stale_temporaries(directory)

    try:
        reference, vendor = fetch_llama_cpp(cache)
        outputs = [reference, fetch_qwen2(cache, reference), fetch_llama3(cache, reference, vendor)]
        outputs.append(fetch_corpus(cache, args.corpus_mb))
    except (RuntimeError, ValueError, OSError) as err:
        logger.error("failed: %s", err)
        return 1

    for directory in outputs:
        for path in _listing(directory):
            print(path)
    logger.info("assets ready in %s (%.1f s)", cache, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
