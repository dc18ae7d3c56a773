#!/usr/bin/env bash
# The GPU check (issue 17) on a machine prepared by benchmarks/gpu_bundle.sh:
#   bash benchmarks/gpu_run.sh [BUDGET_S] [gpu.py args...]
# Installs the bundle into /tmp/site, then runs benchmarks/gpu.py; results go to $OUT (the
# device tool's folder that comes back) or ./gpu-results.
# The like-for-like comparison with diffusers (issue 28: diffusers batched as its users call
# it; headline cells 1x1 and 4x1 in `matrix`, members 4 and 10 apart in `matrix_ensembling`,
# the compiled engine at 1x1) in one run that fits a 15-minute lease:
#   bash benchmarks/gpu_run.sh 450 --device cuda --model sd2-random --skip job --skip tiling
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-450}
shift || true
dir=${GPU_DIR:-.gpu}
python=${PYTHON:-python3}
out=${OUT:-$PWD/gpu-results}
mkdir -p "$out" /tmp/site
t0=$(date +%s)
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$dir"/wheels/*.whl || exit 3
xz -dc "$dir/ray.tar.xz" | tar -xf - -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
echo "bundle installed in $(( $(date +%s) - t0 )) s"
nvidia-smi -L 2>/dev/null || true
"$python" -c 'import ray, diffusers, torch; print("ray", ray.__version__, "diffusers", diffusers.__version__, "torch", torch.__version__)' || exit 3
"$python" benchmarks/gpu.py --budget-s "$budget" --out "$out/gpu.jsonl" "$@" 2>&1 | tee "$out/gpu.log"
