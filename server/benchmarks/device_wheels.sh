#!/usr/bin/env bash
# Download, here, the wheels that the bare H200 machine lacks (its image has Python 3.12 with torch, transformers,
# scipy, OpenCV, pytest, hypothesis and httpx, but not these), into .whl/ (ignored by git), for device_check.sh.
# The versions are the ones this repository's CI environment resolved; the whole set is about 15 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=${PYTHON:-python3}
pure=(diffusers==0.42.1 kornia==0.9.0 trimesh==5.2.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
      pydantic==2.14.4 python-multipart==0.0.34 segment-anything==1.0 annotated-types==0.8.0
      typing-inspection==0.4.5 importlib-metadata==10.2.0 zipp==4.1.2)
# xatlas and fast-simplification: the asset stage's unwrap and decimation, for the bake step (#28).
binary=(kornia-rs==0.2.0 pymcubes==0.1.6 pydantic-core==2.50.5 xatlas==0.0.11 fast-simplification==0.2.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${binary[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${pure[@]}"
du -sh .whl && ls .whl
