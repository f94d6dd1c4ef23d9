#!/usr/bin/env bash
# The GPU checks of training at speed ("the paper network in a day on one H200"), one JSON line per step, at most
# 9 minutes wall on a bare H200 (ONE2345_BUDGET). Prepare the wheels first, here, with
# server/benchmarks/device_wheels.sh; then, through the device tool, from the repository root:
#
#     bash training/benchmarks/device_fit.sh            # carry: [".whl"]
#
# Steps, most wanted first: the CUDA tests of training; the fit benchmark at the paper preset (bf16, the default) for
# 200 steps; Zero123-XL's architecture with random weights predicting the 4 rendered objects' nearby views one object
# per sampler run, then 4 at once; 40-step fit variants on the same objects (2 objects per step, fp32, fp16, no
# loader workers).
# ONE2345_DEVICE=cpu runs the same steps tiny (how the script itself is checked before device time is spent on it).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${ONE2345_DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)

if [ "$DEVICE" = cuda ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # cp312 wheels, for the device
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo '{"step": "install", "ok": false}'; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
"$PY" -c 'import json, torch; print(json.dumps({"step": "environment", "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))'

# step NAME SECONDS COMMAND…: run with a time limit, cut to what is left of ONE2345_BUDGET seconds (default 540, so a
# 10-minute device call always returns); a failure prints a JSON line instead of stopping the script.
deadline=$(( start + ${ONE2345_BUDGET:-540} ))
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  (( limit > deadline - t0 )) && limit=$(( deadline - t0 ))
  if (( limit < 20 )); then echo "{\"step\": \"$name\", \"ok\": false, \"skipped\": \"budget\"}"; return; fi
  timeout "$limit" "$@"
  local rc=$?
  echo "{\"step\": \"$name\", \"ok\": $([ $rc -eq 0 ] && echo true || echo false), \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
}

work=$(mktemp -d)
if [ "$DEVICE" = cuda ]; then
  preset=(--preset paper --device cuda --data "$work/data" --objects 4)
  long=200; short=40; zero123=--random-paper; ddim=50
  step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/training/test_train_speed.py
else
  preset=(--preset tiny --device cpu --data "$work/data" --objects 2)
  long=5; short=3; zero123=--tiny; ddim=2
fi
step fit 240 "$PY" -m training.benchmarks.fit "${preset[@]}" --steps $long --out "$work/default"
step predict-1 100 "$PY" -m training.cli predict --data "$work/data" $zero123 --steps $ddim --overwrite \
  --batch-objects 1
step predict-4 80 "$PY" -m training.cli predict --data "$work/data" $zero123 --steps $ddim --overwrite \
  --batch-objects 4
step fit-batch2 100 "$PY" -m training.benchmarks.fit "${preset[@]}" --steps $short --batch-size 2 --out "$work/b2"
if [ "$DEVICE" = cuda ]; then
  step fit-fp32 100 "$PY" -m training.benchmarks.fit "${preset[@]}" --steps $short --amp off --out "$work/fp32"
  step fit-fp16 80 "$PY" -m training.benchmarks.fit "${preset[@]}" --steps $short --amp fp16 --out "$work/fp16"
  step fit-no-workers 80 "$PY" -m training.benchmarks.fit "${preset[@]}" --steps $short --workers 0 --out "$work/w0"
fi
rm -rf "$work"
echo "{\"step\": \"total\", \"seconds\": $(( $(date +%s) - start ))}"
