#!/usr/bin/env bash
# GPU check: shard real text with the real Qwen2 tokenizer, then train the unsloth and the hf
# backend for the same number of steps on one Qwen2.5-0.5B-sized model. It reports tokens/s,
# peak GPU memory and the final loss of each, and benches/gpu_train.py does the training part.
#
# It runs on the lent GPU machine (no network), over the working tree plus .whl/, which
# `bash scripts/gpu_wheels.sh` fills here first. Planned for about 5 minutes on one H200:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Everything it prints also goes to $OUT/gpu_check.log, and the figures to $OUT/gpu_check.json,
# when $OUT is set. Settings: GPU_CHECK_STEPS (30), GPU_CHECK_SEQ_LEN (2048),
# GPU_CHECK_BACKENDS (unsloth,hf), GPU_CHECK_BACKEND_TIMEOUT_S (240 per backend).
# A CPU rehearsal of the script itself, with a 2-layer model and the packages already installed:
#
#   PATH=$PWD/.venv/bin:$PATH GPU_CHECK_DEVICE=cpu GPU_CHECK_INSTALL=0 GPU_CHECK_STEPS=3 \
#       GPU_CHECK_SEQ_LEN=256 bash scripts/gpu_check.sh
#
# Exit status: 0 when both backends trained; 1 unsloth failed, 2 hf failed, 3 both failed,
# 4 the model could not be built; 10 the wheels did not install, 11 no tokenizer,
# 12 sharding failed. A failed backend does not stop the other one.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS="${GPU_CHECK_STEPS:-30}"
SEQ_LEN="${GPU_CHECK_SEQ_LEN:-2048}"
BACKENDS="${GPU_CHECK_BACKENDS:-unsloth,hf}"
BACKEND_TIMEOUT_S="${GPU_CHECK_BACKEND_TIMEOUT_S:-240}"
CACHE="${CPTSTREAM_CACHE:-$HOME/.cache/cptstream}"
SITE=/tmp/site
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check}"
ASSETS=.whl/assets
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TRAIN_ARGS=()
if [ "$DEVICE" = cpu ]; then
    TRAIN_ARGS=(--device cpu --tiny --micro-batch-size 2 --grad-accum 1 --eval-batches 2)
fi

step() {
    echo
    echo "==== $(date +%H:%M:%S) $* ===="
}

install_wheels() {
    step "installing .whl/*.whl into $SITE"
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in .whl/; run 'bash scripts/gpu_wheels.sh' on the development machine and carry .whl" >&2
        return 1
    fi
    ls -l .whl/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 1048576, $9}'
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl; then
        echo "error: pip install of the carried wheels failed (see above)" >&2
        return 1
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

check() {
    # ---- install the carried wheels ----
    if [ "${GPU_CHECK_INSTALL:-1}" = 0 ]; then
        step "GPU_CHECK_INSTALL=0: using the packages of $(command -v python3)"
    else
        install_wheels || return 10
    fi

    # ---- machine and versions ----
    step "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv ||
        echo "warning: nvidia-smi failed; the unsloth backend needs CUDA and will be skipped"
    python3 - <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
for name in ("cptstream", "transformers", "peft", "accelerate", "unsloth", "unsloth_zoo", "trl", "datasets",
             "bitsandbytes", "triton", "flash_attn", "xformers"):
    try:
        print(f"  {name} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name} not installed")
PYEOF

    # ---- tokenizer ----
    step "tokenizer"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    local tokenizer="$WORK/qwen2"
    if [ -f "$ASSETS/qwen2/tokenizer.json.gz" ]; then
        mkdir -p "$tokenizer"
        gunzip -c "$ASSETS/qwen2/tokenizer.json.gz" >"$tokenizer/tokenizer.json"
        cp "$ASSETS/qwen2/tokenizer_config.json" "$tokenizer/"
        echo "real Qwen2 tokenizer from $ASSETS/qwen2"
    elif [ -f "$CACHE/qwen2/tokenizer.json" ]; then
        tokenizer="$CACHE/qwen2"
        echo "real Qwen2 tokenizer from $tokenizer"
    else
        echo "error: no Qwen2 tokenizer in $ASSETS/qwen2 or $CACHE/qwen2; run 'bash scripts/gpu_wheels.sh' and carry .whl" >&2
        return 11
    fi

    # ---- corpus ----
    step "corpus"
    local corpus
    if [ -d "$ASSETS/corpus" ] && [ -n "$(ls -A "$ASSETS/corpus")" ]; then
        corpus="$ASSETS/corpus"
        echo "real corpus slice from $corpus"
    elif [ -d "$CACHE/corpus" ]; then
        corpus="$CACHE/corpus"
        echo "real corpus from $corpus"
    else
        # Without the real corpus, the standard library's docstrings are real English prose.
        corpus="$WORK/corpus"
        echo "no real corpus carried; writing standard-library docstrings instead"
        python3 benches/gpu_train.py corpus --output "$corpus" --mb 8 || return 12
    fi
    du -sh "$corpus"/*

    # ---- shard ----
    step "cptstream shard --seq-len $SEQ_LEN"
    if ! python3 -m cptstream.cli shard "$corpus" --tokenizer "$tokenizer" --output "$WORK/shards" \
        --seq-len "$SEQ_LEN" --val-fraction 0.02 --num-threads 0 --no-progress; then
        echo "error: cptstream shard failed (see above)" >&2
        return 12
    fi
    if ! python3 -m cptstream.cli verify "$WORK/shards"; then
        echo "error: cptstream verify failed on the new shards (see above)" >&2
        return 12
    fi

    # ---- train both backends ----
    step "train $BACKENDS for $STEPS steps each"
    local report="${OUT:-$WORK}/gpu_check.json"
    python3 benches/gpu_train.py run --data "$WORK/shards" --tokenizer "$tokenizer" --work "$WORK/train" \
        --backends "$BACKENDS" --steps "$STEPS" --timeout-s "$BACKEND_TIMEOUT_S" --json "$report" "${TRAIN_ARGS[@]}"
    local status=$?
    step "done: exit status $status"
    nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
    return "$status"
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    check 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
check
