#!/usr/bin/env bash
# Zero-shot accuracy (lm-eval, local task files) and WikiText-2 perplexity, base vs quantized.
# Usage: bench/zeroshot_gpu.sh MODEL DATA_DIR OUT_DIR [SOLVER]   (then bench/summarize_zeroshot.py OUT_DIR)
set -euo pipefail
model=$1; data=$2; out=$3; solver=${4:-gptq}
mkdir -p "$out"
python3 -m mixq.cli eval --model "$model" --data-dir "$data" --json \
  --tasks wikitext2,arc_easy,piqa,lambada_openai,copa,openbook_qa,siqa \
  --plan base,int8,int4-g128,int3-g128 --solver "$solver" --nsamples 128 --seqlen 2048 \
  > "$out/zeroshot.jsonl"
