#!/usr/bin/env bash
# Issue 4's GPU/TPU figures in one run: decode tokens/s and the fraction of the HBM roofline it reaches at batch
# 64 and 128, and the train step's MFU, on the ~1.4B `--size large` bench model in bf16. Ours only (--skip-hf):
# the bench's HF side runs PyTorch on the CPU, so a ratio against it would mean nothing here.
#
#   PYTHONPATH=. bash docs/tools/accelerator_bench.sh [WORKDIR]
#
# Builds the random model once in WORKDIR (5.5 GB of fp32 safetensors). The datasheet peaks come from
# mstar_jax/bench/roofline.py (PEAKS, by jax's device_kind); --peak-hbm-gbs / --peak-tflops override them.
set -euo pipefail
W=${1:-runs/bench}
M=(python -m mstar_jax.cli bench)
"${M[@]}" sampler --size large --workdir "$W" --skip-hf --dtype bfloat16 --prompts 4 --n 16 --max-new-tokens 256 \
  --modes greedy,sample --stream-mb 2048
"${M[@]}" sampler --size large --workdir "$W" --skip-hf --dtype bfloat16 --prompts 8 --n 16 --max-new-tokens 256 \
  --modes greedy --stream-mb 2048
"${M[@]}" train --size large --workdir "$W" --skip-hf --dtypes bfloat16 --global-batch 128 --micro-batch 32
