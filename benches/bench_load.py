#!/usr/bin/env python3
"""Reproduce the `cptstream bench load` table of docs/benchmarks.md.

    .venv/bin/maturin develop --release       # the extension must be a release build
    .venv/bin/python benches/bench_load.py    # same flags as `cptstream bench load`, e.g. --shards DIR

Without flags it shards the real corpus with the Qwen2 tokenizer from
${CPTSTREAM_CACHE:-~/.cache/cptstream} into a temporary directory first, and writes runs/bench-load.json.
"""

import sys

from cptstream.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "load", *sys.argv[1:]]))
