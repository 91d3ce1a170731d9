#!/usr/bin/env bash
# Mixed-precision search on SmolLM2-135M (RTN, layer granularity), two budgets, two samplers.
# Usage: bench/search_gpu.sh MODEL.gguf DATA_DIR OUT_DIR
set -euo pipefail
model=$1; data=$2; out=$3
int4_g128_size=112023936   # bytes of uniform int4-g128 (bench/results/eval_speed_h100.md)
run() {  # name, budget flags...
  name=$1; shift
  python3 -m mixq.cli search --model "$model" --data-dir "$data" --backend "${BACKEND}" --trials 100 \
    --run-dir "/tmp/search_$name" --limit 4 --seqlen 2048 "$@" > /dev/null
  cp "/tmp/search_$name/report.json" "$out/${name}_report.json"
  cp "/tmp/search_$name/trials.jsonl" "$out/${name}_trials.jsonl"
}
BACKEND=tpe run tpe_int4size --max-size "$int4_g128_size" --space bench/space_layer.yaml
BACKEND=nsga2 run nsga2_int4size --max-size "$int4_g128_size" --space bench/space_layer.yaml
BACKEND=tpe run tpe_3.25bits --max-bits 3.25 --space bench/space_layer.yaml
