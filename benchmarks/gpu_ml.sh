#!/bin/bash
# One device-tool call of benchmarks/gpu_ml.py (docs/scaling.md, "On one GPU"): grow frames from the bundle's
# seeds on the GPU, then maximum likelihood of one variant as a captured CUDA graph, falling back to eager
# steps if the capture fails. Run on the device machine from the repository root, the bundle carried:
#     bash benchmarks/gpu_ml.sh .gpu/bundle.pt relay 240 "--batch 16384 --lr 3e-4"
# Writes $OUT/log.txt and the variant's checkpoint(s) to $OUT (join them here with gpu_ml.py join).
set -u
BUNDLE=${1:?bundle}; VARIANT=${2:-relay}; BUDGET=${3:-240}; EXTRA=${4:-}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
G=benchmarks/gpu_ml.py; L=${OUT:?OUT is the device tool\'s output folder}/log.txt
date >> "$L"
python3 $G grow "$BUNDLE" -o /tmp/frames.pt --burnin 200 --stride 50 --frames-per-seed 32 \
  --threads 8 >> "$L" 2>&1 || { echo "grow failed" >> "$L"; exit 1; }
C="--half --with-seeds --evals 8 -o $OUT $EXTRA"
python3 $G train "$BUNDLE" /tmp/frames.pt --variant "$VARIANT" --budget "$BUDGET" --graph $C >> "$L" 2>&1 \
  || python3 $G train "$BUNDLE" /tmp/frames.pt --variant "$VARIANT" --budget "$((BUDGET * 4 / 5))" $C >> "$L" 2>&1
date >> "$L"
