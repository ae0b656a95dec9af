#!/usr/bin/env bash
# One device window spent on the paper's full schedule, several runs sharing the one GPU
# (issue 24, items 3 and 4). Prepare here first, as for device_check.sh:
#
#   here, once:  bash benchmarks/device_check.sh --prepare   (data and wheels, git-ignored)
#   device:      run(command="bash benchmarks/gpu_window.sh", carry=["device_data", ".whl",
#                    "device_runs"], timeout_s=560)
#   here, after: tar -xzf FILES_AT/runs.tar.gz   (workdirs into device_runs/, to resume or export:
#                python -m experiments.results --runs=results/runs --export=NAME=device_runs/NAME)
#
# 1. `concurrency`: k = 1, 2, 4 short copies of d_depth18 at once for CONC_SECONDS each; prints
#    the total images per second of k runs against one (concurrency.jsonl).
# 2. `paper`: the full schedule of d_depth18, r_depth18 and s_depth11 at once
#    (experiments.sweep --parallel=3) until PAPER_SECONDS, then SIGTERM: each run checkpoints and
#    exits 143, and the next window resumes it from device_runs/ (carried back in runs.tar.gz:
#    results, metrics and the last checkpoint of each run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
DATA=${DATA_DIR:-/tmp/stabnet-data}
CONC_SECONDS=${CONC_SECONDS:-45}
PAPER_SECONDS=${PAPER_SECONDS:-330}
mkdir -p "$OUT" device_runs
export PYTHONUNBUFFERED=1 STABNET_DATA_DIR=$DATA
exec > >(tee -a "$OUT/log.txt") 2>&1
# data and wheels exactly as device_check.sh sets them up (its first jobs only)
bash benchmarks/device_check.sh true >/dev/null 2>&1 || true
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-}

concurrency() {  # total images/s of k concurrent short d_depth18 runs, k = 1, 2, 4
  local k i pids
  for k in 1 2 4; do
    pids=()
    for i in $(seq "$k"); do
      rm -rf "/tmp/conc/$k-$i"
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(0.9/$k)") \
        timeout -s TERM "$CONC_SECONDS" python3 -m experiments.main \
        --config=experiments/configs/d_depth18.py --workdir="/tmp/conc/$k-$i" \
        --config.eval_every=100000 --config.progress_bar=false >/dev/null 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    python3 - "$k" <<'EOF' | tee -a "$OUT/concurrency.jsonl"
import glob, json, sys
k = int(sys.argv[1])
rates = []
for path in sorted(glob.glob(f"/tmp/conc/{k}-*/metrics.jsonl")):
    rows = [json.loads(l) for l in open(path) if '"images_per_second"' in l]
    tail = rows[len(rows) // 2:]  # past the compilation and warm-up
    rates.append(sum(r["images_per_second"] for r in tail) / max(len(tail), 1))
print(json.dumps({"concurrent_runs": k, "images_per_second_each": rates,
                  "images_per_second_total": sum(rates)}))
EOF
  done
}

paper() {  # the full schedule, three runs at once, stopped (checkpointed) at PAPER_SECONDS
  timeout -s TERM "$PAPER_SECONDS" python3 -m experiments.sweep --root=device_runs \
    --depths=18,11 --variants=resnet,resnet_d,resnet_s --parallel=3 --per_run_figures=false
  while pgrep -f experiments.main >/dev/null; do sleep 1; done  # the runs' last checkpoints
  for d in device_runs/*/; do
    [ -f "$d/metrics.jsonl" ] && echo "$d $(tail -1 "$d/metrics.jsonl" | cut -c1-160)"
  done
  tar -czf "$OUT/runs.tar.gz" device_runs
  ls -la "$OUT/runs.tar.gz"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for job in "${@:-concurrency paper}"; do
  for j in $job; do
    start=$(date +%s); echo "== $j"; "$j"; echo "== $(( $(date +%s) - start )) s: $j"
  done
done
