#!/usr/bin/env bash
# One device call: the GPU benchmark and a short CIFAR-10 training of ResNet-D, ResNet-S and the
# baseline (issue 5). Prepared so that a session lent a GPU spends its minutes measuring:
#
#   here, once:  bash benchmarks/device_check.sh --prepare   (the data and the wheels the device
#                lacks, in folders that git ignores; needs ../shared/data and the package index)
#   device:      run(command="bash benchmarks/device_check.sh", carry=["device_data", ".whl"],
#                    timeout_s=480)  # the jobs in order of importance: a call cut short loses the last
#
# Writes to $OUT (or ./device_out), 8 files at most (the device tool's limit): log.txt (with
# the kernel counts of the HLO dump and each job's wall time), bench.jsonl (one
# `experiments.benchmark --json` object a line), traces.jsonl (benchmarks/trace_summary.py of
# the profiled benchmarks) and traces.tar (their raw traces), norms.jsonl
# (benchmarks/norms_bench.py), forms.jsonl (benchmarks/forms.py), trains.jsonl (results.json of
# each training, with its name) and metrics_tail.txt (the last lines of each training's
# metrics.jsonl). CUDA graphs of the whole loop (--xla_gpu_enable_command_buffer=…,WHILE) were
# measured once and gave nothing (RESULTS.md).
# BENCH_STEPS and TRAIN_STEPS shrink it for a dry run on a CPU (e.g.
# BENCH_STEPS=2 TRAIN_STEPS=4). Arguments, if any, replace the default jobs, one job each, e.g.
#   bash benchmarks/device_check.sh norms "bench experiments/configs/s_depth20.py" \
#       "train s20 experiments/configs/s_depth20.py --config.runtime.norm_method=eigh"
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then  # here, not on the device
  set -e
  mkdir -p .git/info && touch .git/info/exclude
  for path in /device_data/ /.whl/ /device_out/; do
    grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
  done
  mkdir -p device_data && cp -f ../shared/data/cifar10_jpeg.npz ../shared/data/materialize.py device_data/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
    ml_collections==1.1.0 tensorboardX==2.6.5
  du -sh device_data .whl
  exit 0
fi
OUT=${OUT:-$PWD/device_out}
BENCH_STEPS=${BENCH_STEPS:-300}
TRAIN_STEPS=${TRAIN_STEPS:-3000}
DATA=${DATA_DIR:-/tmp/stabnet-data}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ -d .whl ] && ! python3 -c "import ml_collections, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"

if [ ! -f "$DATA/cifar10.npz" ]; then
  start=$(date +%s)
  python3 - "$DATA" <<'EOF'
import os, sys
import numpy as np
sys.path.insert(0, "device_data")
import materialize  # the shared folder's decoder (numpy + Pillow)
arrays = materialize.decode_cifar10("device_data/cifar10_jpeg.npz")
tmp = os.path.join(sys.argv[1], "cifar10.tmp.npz")
np.savez(tmp, **arrays)
os.replace(tmp, os.path.join(sys.argv[1], "cifar10.npz"))
EOF
  echo "decoded CIFAR-10 in $(( $(date +%s) - start )) s"
fi

bench() {  # bench CONFIG [overrides...]: its JSON line into bench.jsonl, its stderr into the log
  python3 -m experiments.benchmark --config="$1" "${@:2}" --steps="$BENCH_STEPS" --json \
    --config.data.local_dir="$DATA" | grep '^{' | tail -1 | tee -a "$OUT/bench.jsonl"
}
trace() {  # trace DIR NAME: where the profiled steps' GPU time went (bench ... --profile=DIR),
  # and what the constraints add to it (DIR/on against DIR/off)
  local steps minus="" part raw room
  steps=$(tail -1 "$OUT/bench.jsonl" 2>/dev/null | python3 -c "import json,sys; r = json.load(sys.stdin)
print(r['profiled_steps'] if r.get('profile_dir') == sys.argv[1] else 0)" "$1" 2>/dev/null)
  [ "${steps:-0}" -gt 0 ] || { echo "trace $2: the last benchmark did not profile into $1"; return; }
  [ -d "$1/off" ] && minus="--minus=$1/off"
  { echo "{\"trace\": \"$2\"}"; python3 benchmarks/trace_summary.py "$1/on" --steps="$steps" $minus; } \
    | tee -a "$OUT/traces.jsonl"
  for part in on off; do
    raw=$(ls -t "$1/$part"/plugins/profile/*/*.trace.json.gz 2>/dev/null | head -1)
    room=$(( 15000000 - $(stat -c %s "$OUT/traces.tar" 2>/dev/null || echo 0) ))
    if [ -n "$raw" ] && [ "$(stat -c %s "$raw")" -lt "$room" ]; then  # 16 MiB a file come back
      cp "$raw" "/tmp/trace_$2_$part.json.gz" && tar -C /tmp -rf "$OUT/traces.tar" "trace_$2_$part.json.gz"
    fi
  done
}
kernels() {  # kernels DUMP_DIR: what XLA launches, from the optimised HLO of the largest modules
  for f in $(ls -S "$1"/*after_optimizations.txt 2>/dev/null | head -3); do
    echo "$(basename "$f"): fusions $(grep -c ' fusion(' "$f"), custom-calls" \
      "$(grep -c ' custom-call(' "$f") (convolutions: $(grep -c 'cudnn\$conv' "$f"))," \
      "whiles $(grep -c ' while(' "$f"), conditionals $(grep -c ' conditional(' "$f")," \
      "transposes/copies $(grep -c ' transpose(\| copy(' "$f")"
    grep 'cudnn\$conv' "$f" | head -2 | cut -c1-400  # the layouts XLA chose for cuDNN
  done
}
norms() {  # the exact-norm methods of ResNet-S's constraint, alone [norms_bench.py options]
  python3 benchmarks/norms_bench.py "$@" | tee -a "$OUT/norms.jsonl"
}
forms() {  # forms OP [CONFIG]: alternative formulations of one operation, timed in alternation
  python3 benchmarks/forms.py --op="$1" --config="${2:-experiments/configs/d_depth18.py}" \
    --rounds=3 --steps="$BENCH_STEPS" --json | tee -a "$OUT/forms.jsonl"
}

train() {  # train NAME CONFIG: TRAIN_STEPS steps, learning rate ÷10 at 2/3, one evaluation
  local name=$1 config=$2 start
  start=$(date +%s)
  rm -rf "/tmp/runs/$name"  # a fresh run, not a resumed one
  python3 -m experiments.main --config="$config" --workdir="/tmp/runs/$name" "${@:3}" \
    --config.data.local_dir="$DATA" --config.num_train_steps="$TRAIN_STEPS" \
    --config.optim.decay_every=$(( TRAIN_STEPS * 2 / 3 > 0 ? TRAIN_STEPS * 2 / 3 : 1 )) \
    --config.eval_every="$TRAIN_STEPS" --config.checkpoint_every="$TRAIN_STEPS" \
    --config.final_average_steps="$TRAIN_STEPS" --config.progress_bar=false
  python3 -c "import json,sys; print(json.dumps({'name': sys.argv[1], **json.load(open(sys.argv[2]))}))" \
    "$name" "/tmp/runs/$name/results.json" >> "$OUT/trains.jsonl"
  { echo "== $name"; tail -3 "/tmp/runs/$name/metrics.jsonl"; } >> "$OUT/metrics_tail.txt"
  echo "$name: $(( $(date +%s) - start )) s wall"
}
trainings() {  # the three trainings share the GPU (a quarter of its memory each): their wall
  # times are concurrent ones, their accuracies those of separate runs
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.25
  train d18 experiments/configs/d_depth18.py &
  train s20 experiments/configs/s_depth20.py &
  train r18 experiments/configs/r_depth18.py &
  wait $(jobs -p)  # not a bare `wait`: that also waits for the `tee` of the log, forever
  unset XLA_PYTHON_CLIENT_MEM_FRACTION
}
if [ $# -gt 0 ]; then
  jobs_=("$@")
else  # in order of importance: a call cut short by its time limit loses the last
  jobs_=(
    "XLA_FLAGS=--xla_dump_to=/tmp/xla_d18 bench experiments/configs/d_depth18.py --profile=/tmp/prof_d18"
    "kernels /tmp/xla_d18"
    "trace /tmp/prof_d18 d18"
    # ResNet-S past its first ~100 steps (flat spectra), where the screen rules frequencies out
    "bench experiments/configs/s_depth20.py --warmup=200 --profile=/tmp/prof_s20"  # auto: fused
    "trace /tmp/prof_s20 s20"
    "trainings"
    "bench experiments/configs/d_depth54.py"
    "forms fold"  # stride-1 convolutions: side by side / one by one "VALID" (the form off CPUs)
    "bench experiments/configs/d_depth18.py --config.model.dtype=bfloat16"
    "norms --filters=lowpass --methods_only"
    "bench experiments/configs/s_depth20.py --warmup=200 --config.runtime.norm_method=squaring"
    "norms"
    "forms bn"  # BatchNorm statistics: two_pass (the reference) / one_pass (default)
  )
fi
for job in "${jobs_[@]}"; do
  start=$(date +%s)
  echo "== $job"
  eval "$job"
  echo "== $(( $(date +%s) - start )) s: $job"
done
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
bench = out / "bench.jsonl"
for line in bench.read_text().splitlines() if bench.exists() else []:
    r = json.loads(line)
    print(f"{r['config']:<20} {r['dtype']:<8} b{r['batch_size']} spd {r['steps_per_dispatch']:>3}"
          f" w{r['warmup_steps']}"
          f" {r['images_per_second']:>8,.0f} img/s {r['step_ms']:6.2f} ms/step compile "
          f"{r['compile_seconds']:4.1f} s constraints {100 * r['constraint_share']:4.1f}% "
          f"{r.get('norm_method') or ''} {r.get('xla_flags') or ''}")
trains = out / "trains.jsonl"
for line in trains.read_text().splitlines() if trains.exists() else []:
    print(line[:300])
EOF
echo "device_check: done"
