#!/usr/bin/env bash
# Every GPU check of the project in one run (issues #11 and #16), within ONE2345_BUDGET seconds (540) on a bare
# H200: the CUDA tests, then the benchmarks, each printing one JSON line. Prepare the wheels first, here, with
# server/benchmarks/device_wheels.sh; then, through the device tool, from the repository root:
#
#     bash server/benchmarks/device_check.sh            # carry: [".whl"]
#
# On a machine without CUDA, ONE2345_DEVICE=cpu runs the same steps small (tiny presets, few steps), which is how
# the script itself is checked before device time is spent on it.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${ONE2345_DEVICE:-cuda}
PY=${PYTHON:-python3}
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
# 10-minute device call always returns with every line printed); a failure prints a JSON line instead of stopping.
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

# Most wanted first (#11, then #16): what a later step needs, or what no other step measures, comes earlier.
work=$(mktemp -d)
if [ "$DEVICE" = cuda ]; then
  gpu_tests=$(grep -rl "mark.gpu" tests --include='test_*.py' | sort)
  step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
  step reconstruct 60 "$PY" -m server.benchmarks.reconstruct --preset paper --resolution 256 --device cuda --repeats 2
  step pipeline 120 "$PY" -m server.benchmarks.pipeline --preset paper --device cuda --repeats 2
  # #28: the bake on the device, 20 k faces at 1024², with its parity against the numpy path at that size (the CUDA
  # parity test itself runs in gpu-tests: tests/server/test_bake_torch.py is marked gpu).
  step bake 90 "$PY" -m server.benchmarks.bake --faces 20000 --size 1024 --device cuda --repeats 2 --compare
  step fit 150 "$PY" -m training.benchmarks.fit --preset paper --device cuda --steps 200 --data "$work/data" \
    --out "$work/fit"
  step predict-4 60 "$PY" -m training.cli predict --data "$work/data" --random-paper --steps 50 --overwrite \
    --batch-objects 4 --device cuda
  step checkpoint-on-cpu 60 bash -c "\"$PY\" -c \"from server.common.synthetic import write_views_dir as w; w('$work/views')\" \
    && \"$PY\" -m server reconstruct '$work/views' -o '$work/mesh.ply' --device cpu --resolution 64 \
    --checkpoint \"\$(ls -d '$work'/fit/run/checkpoints/step_* | tail -1)\""
  step pipeline-eager 80 "$PY" -m server.benchmarks.pipeline --preset paper --device cuda --repeats 1 --no-cuda-graphs
  step pipeline-low-vram 90 "$PY" -m server.benchmarks.pipeline --preset paper --device cuda --repeats 1 --low-vram
else
  step reconstruct 300 "$PY" -m server.benchmarks.reconstruct --preset tiny --resolution 64 --device cpu --repeats 1
  step pipeline 300 "$PY" -m server.benchmarks.pipeline --preset tiny --device cpu --steps-stage1 2 --steps-stage2 2 \
    --resolution 32
  step bake 300 "$PY" -m server.benchmarks.bake --faces 5000 --size 256 --device cpu --path torch --repeats 1 --compare
  step fit 300 "$PY" -m training.benchmarks.fit --preset tiny --device cpu --steps 5 --objects 2 --data "$work/data" \
    --out "$work/fit"
  step predict-4 120 "$PY" -m training.cli predict --data "$work/data" --tiny --steps 2 --overwrite --batch-objects 4 \
    --device cpu
  step checkpoint-on-cpu 120 bash -c "\"$PY\" -c \"from server.common.synthetic import write_views_dir as w; w('$work/views')\" \
    && \"$PY\" -m server reconstruct '$work/views' -o '$work/mesh.ply' --device cpu --resolution 64 \
    --checkpoint \"\$(ls -d '$work'/fit/run/checkpoints/step_* | tail -1)\""
  step pipeline-low-vram 300 "$PY" -m server.benchmarks.pipeline --preset tiny --device cpu --steps-stage1 2 \
    --steps-stage2 2 --resolution 32 --low-vram
fi
rm -rf "$work"
echo "{\"step\": \"total\", \"seconds\": $(( $(date +%s) - start ))}"
