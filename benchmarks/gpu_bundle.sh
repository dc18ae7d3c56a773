#!/usr/bin/env bash
# Packs into .gpu/ what a bare GPU machine (the `device` tool's nvidia-h200: Python 3.12, torch
# with CUDA, transformers, pyarrow, pandas, fsspec, pillow; no Ray, no diffusers, nothing to
# download from) lacks for benchmarks/gpu.py:
#   - wheels: diffusers, isal, jsonschema (+ referencing, rpds-py, jsonschema-specifications),
#     importlib_metadata;
#   - Ray as an unpacked tree, xz-compressed, without what a local Ray Data job never loads
#     (Java jars, RLlib, Serve, LLM, the dashboard's web client): the wheel is 79 MB, over the
#     device tool's 64 MiB limit on what travels; this is ~28 MB.
#
#   bash benchmarks/gpu_bundle.sh            # needs pip and network here, once
#   device run, carry [".gpu"], command:     (benchmarks/gpu_run.sh does exactly this)
#     bash benchmarks/gpu_run.sh 450
#
# PY=311 GPU_DIR=/tmp/gpu311 bash benchmarks/gpu_bundle.sh packs the same for Python 3.11
# (a rehearsal on a CPU machine: `bash benchmarks/gpu_run.sh` with GPU_DIR set, --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-312}
dir=${GPU_DIR:-.gpu}
ray_version=$(sed -n 's/^ray==//p' constraints.txt)
rm -rf "$dir"
mkdir -p "$dir/wheels" "$dir/tmp"
dl() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
pin() { sed -n "s/^$1==/$1==/p" constraints.txt; }
dl "$dir/wheels" "$(pin diffusers)" "$(pin isal)" "$(pin jsonschema)" "$(pin jsonschema-specifications)" \
    referencing rpds-py importlib_metadata
dl "$dir/tmp" "ray==$ray_version"
(cd "$dir/tmp" && unzip -q ray-*.whl && rm ray-*.whl \
    && rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client \
    && find . -name __pycache__ -prune -exec rm -rf {} + \
    && tar -cf - ray ray-*.dist-info | xz -T0 -6 > ../ray.tar.xz)
rm -rf "$dir/tmp"
if [ "$dir" = .gpu ]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
fi
echo "wrote $dir ($(du -sh "$dir" | cut -f1)); carry it as [\"$dir\"]"
