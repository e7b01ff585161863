#!/usr/bin/env python3
"""Reproduce the `cptstream bench shard` tables of docs/benchmarks.md.

    .venv/bin/maturin develop --release        # the extension must be a release build
    .venv/bin/python benches/bench_shard.py    # same flags as `cptstream bench shard`, e.g. --repeats 5

Without flags it runs on the real corpus and Qwen2 tokenizer that `scripts/fetch_assets.py`
puts under ${CPTSTREAM_CACHE:-~/.cache/cptstream}, and writes runs/bench-shard.json.
"""

import sys

from cptstream.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "shard", *sys.argv[1:]]))
