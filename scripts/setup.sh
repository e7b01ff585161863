#!/usr/bin/env bash
# Set up a fresh machine for cptstream: a virtual environment in .venv with the pinned
# dependencies, the Rust extension built in release mode, and the real input (tokenizers and
# corpus, see docs/real-input.md). Idempotent, so a second run takes seconds. Downloads and build
# outputs are cached under $CPTSTREAM_CACHE (default ~/.cache/cptstream), kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CPTSTREAM_CACHE="${CPTSTREAM_CACHE:-$HOME/.cache/cptstream}"
mkdir -p "$CPTSTREAM_CACHE"
# The Rust build is the slowest step on a fresh clone; sharing its target directory between
# clones makes rebuilds incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CPTSTREAM_CACHE/cargo-target}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install the Rust toolchain (https://rustup.rs) and rerun" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

# Install the pinned dependencies only when pyproject.toml changed since the last install.
stamp=".venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
else
    # Rebuild the extension in place; maturin skips Cargo work that is up to date.
    .venv/bin/maturin develop --release --quiet >/dev/null
fi

# The corpus comes from Debian packages; a fresh machine may have no package lists yet.
if [ ! -d "$CPTSTREAM_CACHE/corpus" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
fi
.venv/bin/python scripts/fetch_assets.py --cache "$CPTSTREAM_CACHE" >/dev/null
.venv/bin/python -c "import cptstream, sys; print(f'cptstream {cptstream.__version__} ready in {sys.prefix}')"
