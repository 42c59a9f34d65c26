#!/usr/bin/env bash
# Build .whl/: what the lent GPU machine lacks to run bench/gpu/run.sh (run this here, with internet).
#
# The device image has torch, transformers, timm, torchvision, pyarrow, fsspec, pillow, numpy,
# matplotlib, pandas, requests, aiohttp, ... for CPython 3.12 but no pydantic, webdataset, Ray
# or open_clip, and no internet. A call carries at most 64 MiB, and Ray's wheel alone is ~80 MB,
# so Ray travels as a pruned tar.xz (~30 MB): no Java jars, dashboard web build, RLlib, Serve
# or LLM modules, none of which Ray Train on one node uses.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
RAY_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('ray'))")
TRANSFORMERS_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('transformers'))")
# CPython version of the target (the device image's 3.12); DEST where the kit goes.
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
DEST=${DEST:-.whl}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$DEST" && mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd)

download() {
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$1" "${@:2}"
}

# Pure-Python or cp312 wheels, versions pinned to what this checkout's venv runs.
pin() { $PY -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
download "$DEST" \
  "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin webdataset)" "$(pin braceexpand)" \
  "$(pin jsonschema)" "$(pin jsonschema-specifications)" "$(pin referencing)" "$(pin rpds-py)" \
  "transformers==$TRANSFORMERS_VERSION" \
  open_clip_torch==3.3.0 ftfy wcwidth

download "$TMP" "ray==$RAY_VERSION"
mkdir "$TMP/ray"
(cd "$TMP/ray" && unzip -q ../ray-*.whl \
  && rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build \
  && tar cf - . | xz -T0 -6 > "$DEST/ray-$RAY_VERSION-$TAG-pruned.tar.xz")
du -sh "$DEST" && ls -la "$DEST"
