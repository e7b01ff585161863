#!/usr/bin/env bash
# Run every test: set-up (with the real input), Rust unit tests, then pytest. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -k clean -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export CPTSTREAM_CACHE="${CPTSTREAM_CACHE:-$HOME/.cache/cptstream}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CPTSTREAM_CACHE/cargo-target}"

cargo test --release -p cptstream-core
.venv/bin/python -m pytest "$@"
