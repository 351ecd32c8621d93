#!/usr/bin/env bash
# The GPU measurements of issue 16 in one run on a machine with one CUDA GPU (about 10 to 15
# minutes on an H100, most of it building full-size random-init models): the extraction
# rate of the full default feature set and of CLIP alone with one and two workers on the
# GPU, and the paper-size training cost of the PCDMs stages, each printed as a fraction of
# the physical bound of bench/limits.py.
#
#   bash bench/gpu_checks.sh
#
# The bounds come from bench/results/limits.json: bring it along (it is counted on CPU, no
# GPU needed: `python bench/limits.py`, ~15 min on 2 cores); without it, it is counted here
# first (on the GPU, a few minutes more). Results: bench/results/extraction_cuda.{json,md},
# bench/results/train_cost_cuda.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f bench/results/limits.json ] || python bench/limits.py
python bench/extraction.py --device cuda --weights random --res 512x352 \
    --features openpose,clip,vae:sd21,vae:sd15,dinov2:giant,dinov2:base,parsing,clip_regions,higherhrnet,pose_latent:sd15 \
    --entries full --cli none --no-bracket --images 512 --model-images 64 --scaling-features clip \
    --out bench/results/extraction_cuda.json
python bench/train_cost.py --device cuda --weights random --res 512x352 --mixed-precision bf16 --batch-size 8 \
    --stages pcdm-prior,pcdm-inpaint,pcdm-refine --steps 10 --warmup 3 --repeats 3 --num-workers 4 \
    --out bench/results/train_cost_cuda.json
