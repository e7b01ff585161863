#!/usr/bin/env bash
# The main job on a fresh machine, end to end on real input:
#   set-up → real Qwen2 tokenizer and Debian corpus from the registries → cptstream shard →
#   verify → inspect → a small Qwen2-architecture model with the real vocabulary → cptstream train
#   (LoRA + full embed_tokens/lm_head, CPU) → report of validation perplexity.
# Everything goes to runs/demo (override with CPTSTREAM_RUN); each run starts that folder afresh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export CPTSTREAM_CACHE="${CPTSTREAM_CACHE:-$HOME/.cache/cptstream}"
RUN="${CPTSTREAM_RUN:-runs/demo}"
PY=.venv/bin/python
CLI=.venv/bin/cptstream

# ---- real input, fetched by setup.sh ----
TOKENIZER="$CPTSTREAM_CACHE/qwen2"
CORPUS="$CPTSTREAM_CACHE/corpus"

rm -rf "$RUN"
mkdir -p "$RUN"

# ---- shard, verify, inspect ----
$CLI shard "$CORPUS" --tokenizer "$TOKENIZER" --output "$RUN/shards" \
    --seq-len 256 --val-fraction 0.02 --no-progress
$CLI verify "$RUN/shards"
$CLI inspect "$RUN/shards" --samples 2 | tail -n 40

# ---- train a small model with the real vocabulary ----
$PY -m cptstream.tiny_model --tokenizer "$TOKENIZER" --output "$RUN/model" --hidden-size 128 --layers 2
$CLI train --config configs/demo-cpu.yaml --model "$RUN/model" --data "$RUN/shards" --output "$RUN/train"

# ---- report ----
$PY - "$RUN/train/metrics.jsonl" <<'PYEOF'
import json, sys

evals = [r for r in map(json.loads, open(sys.argv[1], encoding="utf-8")) if "eval/ppl" in r]
if len(evals) < 2:
    sys.exit(f"expected at least two evaluations in {sys.argv[1]}, found {len(evals)}")
first, last = evals[0], evals[-1]
print(f"validation perplexity: step {first['step']}: {first['eval/ppl']:,.1f} -> step {last['step']}: {last['eval/ppl']:,.1f}")
if not last["eval/ppl"] < 0.5 * first["eval/ppl"]:
    sys.exit("validation perplexity did not fall by half; the run did not learn")
PYEOF
echo "adapter: $RUN/train/adapter"
