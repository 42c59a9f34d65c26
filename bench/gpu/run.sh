#!/usr/bin/env bash
# Every GPU figure the issues ask for, in two device calls of under 10 minutes each.
#
#   step: bench/train_step.py (B/16 full step, bf16-vs-fp32 parity, anchors: goldiclip-ret and
#         open_clip ViT-B-16 at this batch and at 256; four compilations)
#   job:  bench/train_data.py (the loader on this machine's cores vs the step), bench/boxes.py
#         (OWLv2 B/16, random weights) and bench/train_job.py (a real Ray Train run vs the step);
#         the comparisons read step's bench/out/step.json
#   memory: bench/train_memory.py --validate (B/16 step at 64 images x 100 emulated workers, i.e. the
#         paper's global batch of 6,400, K = 10, 2 + 6 views: torch.cuda.max_memory_allocated and step
#         time with each memory option, against the fake-tensor estimate of the same step)
#   smoke: all five on the CPU in their smoke modes (tiny models), BENCHMARKS.md untouched: checks
#         the kit and the scripts anywhere, e.g. in a venv holding only the device image's packages
#
# Each bench script rewrites its own section of BENCHMARKS.md; this script copies
# BENCHMARKS.md, the JSON reports and every log to $OUT. Read bench/gpu/README.md first.
set -uo pipefail
part=${1:?usage: bench/gpu/run.sh step|job|memory|smoke}
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT" bench/out

# What the device image lacks, carried in .whl/ (bench/gpu/fetch_wheels.sh).
KIT=${KIT:-/tmp/goldiclip-kit}
if [ ! -d "$KIT/ray" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$KIT" .whl/*.whl || exit 1
  tar xJf .whl/ray-*-pruned.tar.xz -C "$KIT" || exit 1
fi
export PYTHONPATH="$KIT${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {  # run NAME SECONDS COMMAND...: a log per check, a line per outcome; one failure stops nothing
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  tail -n 6 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case $part in
  step)
    run train_step 540 python3 bench/train_step.py --preset B/16 --batch 128 --captions 8 --compile --parity \
      --out bench/out/step.json --write
    ;;
  job)
    step_json=()
    if [ -f bench/out/step.json ]; then step_json=(--step-json bench/out/step.json)
    else echo "no bench/out/step.json (carry it, or run the step part first): no comparison with the step"; fi
    run train_data 100 python3 bench/train_data.py --samples 256 --loader-workers 0 14 --cases B/16 \
      "${step_json[@]}" --write
    run boxes 120 python3 bench/boxes.py --random-weights --write
    run train_job 330 python3 bench/train_job.py "${step_json[@]}" --write
    ;;
  memory)
    run train_memory 560 python3 bench/train_memory.py --validate --batch 64 --workers 100 --captions 10 \
      --local-views 6 --write
    ;;
  smoke)
    run train_step 300 python3 bench/train_step.py --preset debug --device cpu --batch 4 --captions 2 --steps 2 \
      --warmup 1 --parity --out bench/out/step-smoke.json
    run boxes 300 python3 bench/boxes.py --tiny --device cpu --images 64
    run train_data 300 python3 bench/train_data.py --samples 32 --loader-workers 0 2 --cases B/16 \
      --step-json bench/out/step-smoke.json
    run train_job 300 python3 bench/train_job.py --smoke --step-json bench/out/step-smoke.json
    run train_memory 300 python3 bench/train_memory.py --validate --preset debug --batch 4 --captions 2 --workers 2
    ;;
  *) echo "unknown part $part (step|job|memory|smoke)"; exit 2 ;;
esac
cp BENCHMARKS.md "$OUT/"
cp bench/out/*.json "$OUT/" 2>/dev/null
ls -la "$OUT"
