#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool) lacks for the engine benchmarks into .gpu/:
# diffusers, which is pure Python, copied from this checkout's .venv. The machine has torch
# (CUDA), transformers, huggingface_hub, safetensors, pyarrow, fsspec, pillow and pyyaml; it
# has no Ray, so the job section is skipped there (`--skip job`).
#
#   bash benchmarks/gpu_bundle.sh
#   device run: carry [".gpu"], command:
#     export PYTHONPATH=$PWD/.gpu:$PWD PYTHONUNBUFFERED=1; python3 benchmarks/run.py --device cuda \
#       --model sd2-random --skip job 2>&1 | tee $OUT/bench.txt
#
# Not yet exercised on a GPU: no GPU was lent to the task that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))')
rm -rf .gpu
mkdir -p .gpu
cp -r "$site/diffusers" .gpu/
find .gpu -name __pycache__ -type d -prune -exec rm -rf {} +
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
echo "wrote .gpu/ ($(du -sh .gpu | cut -f1)); carry it as [\".gpu\"]"
