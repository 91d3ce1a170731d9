#!/usr/bin/env bash
# Mixed-precision search on SmolLM2-135M in one GPU command (about 7 minutes on one H100):
#  1. measured sensitivity, once: KL to the base model of each Linear layer quantized alone,
#     at every choice of bench/space_block.yaml and bench/space_layer.yaml (sens_measured.json);
#  2. four studies at once on the GPU, 100 trials each (RTN), each seeded with the uniform plans
#     and the guided starts (greedy on the measured KL over the study's units):
#       ax_block_int4size     Ax, block granularity, at most the bytes of uniform int4-g128
#       ax_block_3.25bits     Ax, block granularity, at most 3.25 bits/weight
#       tpe_layer_int4size    Optuna TPE, layer granularity, the int4-g128 size
#       nsga2_layer_int4size  Optuna NSGA-II, layer granularity, the int4-g128 size
#     every study also times the reload-and-requantize loop against its cached trials (searches over
#     GPTQ or QuantEase weights: bench/database_gpu.py);
#  3. bench/summarize_search.py: the tables and the best-vs-trial plot.
# Usage: bench/search_gpu.sh MODEL DATA_DIR OUT_DIR   (MODEL: smollm2-135m or its GGUF file)
# OUT_DIR receives search_h100.md, search_best_vs_trial.png, search_runs.tar.gz (every report,
# trial log and sensitivity file: untar it in bench/results/ and rerun the summary) and search_log.txt.
# MIXQ_BENCH_SMOKE=1 runs the same steps at toy sizes (a check of the script on a CPU); PYTHON names
# the interpreter (default python3); MIXQ_BENCH_WORK names the work folder (default: a new temporary
# one): run again with the same folder, the sensitivity file is reused and the studies start over;
# MIXQ_BENCH_STUDIES picks studies by name (space-separated; default all four) and MIXQ_BENCH_TRIALS
# sets the trials per study (default 100).
set -euo pipefail
model=$1; data=$2; out=$3
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${MIXQ_BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mixq_search.XXXXXX")}
runs="$work/search"
mkdir -p "$runs"
log="$out/search_log.txt"
: > "$log"
int4_g128_size=112023936   # bytes of uniform int4-g128 on SmolLM2-135M (bench/results/eval_speed_h100.md)
if [[ ${MIXQ_BENCH_SMOKE:-0} == 1 ]]; then
  trials=20; seqlen=64; limit=2; final=(--final-limit 2); sens=(--nsamples 1 --seqlen 32)
  device=(--device cpu)
else
  trials=${MIXQ_BENCH_TRIALS:-100}; seqlen=2048; limit=4; final=(); sens=(--nsamples 4 --seqlen 1024)
  device=()
fi
py=${PYTHON:-python3}
mixq() { "$py" -m mixq.cli "$@"; }
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$log"; }
trap 'trap - INT TERM; kill 0' INT TERM   # an interrupt stops the studies running in the background
start=$SECONDS

formats=$("$py" -c 'import sys, yaml; print(",".join(dict.fromkeys(c for f in sys.argv[1:] for c in yaml.safe_load(open(f))["choices"])))' \
  "$root/bench/space_block.yaml" "$root/bench/space_layer.yaml")
if [[ -f "$runs/sens_measured.json" ]]; then
  say "sensitivity: reusing $runs/sens_measured.json"
else
  say "sensitivity (measured KL) at $formats"
  mixq sensitivity --model "$model" --data-dir "$data" --method measured --formats "$formats" "${sens[@]}" \
    --out "$runs/sens_measured.json" --json "${device[@]}" >> "$log" 2>&1
  say "sensitivity done ($((SECONDS - start)) s)"
fi

study() {  # name, backend, space, budget flags and extra flags...
  local name=$1 backend=$2 space=$3; shift 3
  rm -rf "${work:?}/$name"
  mixq search --model "$model" --data-dir "$data" --backend "$backend" --space "$root/bench/$space" \
    --trials "$trials" --seqlen "$seqlen" --limit "$limit" "${final[@]}" --sens "$runs/sens_measured.json" \
    --run-dir "$work/$name" --json "${device[@]}" "$@" > "$work/$name.out" 2> "$work/$name.err"
  for f in report.json trials.jsonl best_plan.yaml report.md; do cp "$work/$name/$f" "$runs/${name}_$f"; done
}
export OMP_NUM_THREADS=4   # four studies share the host's cores
all=(ax_block_int4size ax_block_3.25bits tpe_layer_int4size nsga2_layer_int4size)
read -r -a names <<< "${MIXQ_BENCH_STUDIES:-${all[*]}}"
pids=()
for name in "${names[@]}"; do
  case $name in
    ax_block_int4size) study "$name" ax space_block.yaml --max-size "$int4_g128_size" & pids+=($!) ;;
    ax_block_3.25bits) study "$name" ax space_block.yaml --max-bits 3.25 & pids+=($!) ;;
    tpe_layer_int4size) study "$name" tpe space_layer.yaml --max-size "$int4_g128_size" & pids+=($!) ;;
    nsga2_layer_int4size) study "$name" nsga2 space_layer.yaml --max-size "$int4_g128_size" & pids+=($!) ;;
    *) echo "unknown study $name (one of ${all[*]})" >&2; exit 2 ;;
  esac
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    say "${names[$i]} done ($((SECONDS - start)) s)"
  else
    failed=1
    say "${names[$i]} FAILED; the end of its log:"
    tail -n 30 "$work/${names[$i]}.err" | tee -a "$log"
  fi
done
for n in "${names[@]}"; do cat "$work/$n.err" >> "$log" 2>/dev/null || true; done
"$py" -c 'import json, os, sys; json.dump({"seconds": int(sys.argv[2]), "cpus": os.cpu_count(),
  "command": "bench/search_gpu.sh " + os.path.basename(sys.argv[3]) + " DATA OUT"}, open(sys.argv[1], "w"))' \
  "$runs/bench.json" "$((SECONDS - start))" "$model"
tar -czf "$out/search_runs.tar.gz" -C "$work" search
"$py" "$root/bench/summarize_search.py" --runs "$runs" --out "$out" >> "$log" 2>&1 || { failed=1; say "summary FAILED"; }
say "total $((SECONDS - start)) s; $out: $(cd "$out" && ls | tr '\n' ' ')"
exit "$failed"
