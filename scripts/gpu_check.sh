#!/usr/bin/env bash
# GPU checks in one run, under 8 minutes: NCCL DDP, FSDP2 (ModelParallelStrategy), bf16-mixed, and a
# ViT-B/16 CLIP throughput/MFU measurement; JSON in outputs/gpu_check/results.json.
#   bash scripts/gpu_check.sh            # on a machine with CUDA GPUs (after pip install -e .)
#   bash scripts/gpu_check.sh --dry-run  # CPU, tiny model: exercises the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 470 python scripts/gpu_check.py "$@"
