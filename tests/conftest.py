"""Shared fixtures: small real tokenizers built in-process, and the real assets when cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

CACHE = Path(os.environ.get("CPTSTREAM_CACHE", Path.home() / ".cache" / "cptstream"))
QWEN2 = CACHE / "qwen2"
CORPUS = CACHE / "corpus"


def make_wordlevel_tokenizer(
    directory: Path,
    words: list[str],
    *,
    specials: tuple[str, ...] = ("<|endoftext|>",),
    bos: str | None = None,
    config: dict | None = None,
) -> Path:
    """Write a whitespace word-level tokenizer: one token per word, so token counts are exact.

    With `bos`, the post-processor prepends it to every sequence, as Llama-3's does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0}
    for w in list(specials) + words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `cptstream` in a child process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "cptstream.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cptstream {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def qwen2_tokenizer() -> Path:
    if not (QWEN2 / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen2 tokenizer not built; run `python scripts/fetch_assets.py` (looked in {QWEN2})")
    return QWEN2


@pytest.fixture
def real_corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"real corpus not built; run `python scripts/fetch_assets.py` (looked in {CORPUS})")
    return CORPUS
