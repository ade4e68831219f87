#!/usr/bin/env bash
# Checks for a CUDA machine, in under 10 minutes: the GPU-only tests, fine-tuning throughput against
# timm's train.py at 180 px (efficientnet_b0 and resnet50, bf16 AMP, channels-last), and a 2-process
# torchrun run (nccl with 2+ GPUs, else the gloo test on the CPU).
#
#   TIMM_TRAIN=/path/to/pytorch-image-models/train.py bash benchmarks/gpu_check.sh
#
# Env: PYTHON (default: python), TIMM_TRAIN (timm's train.py; without it the comparison is skipped),
# DATA / TAXONOMY (default: ../shared/data/fashion), PRODUCTS (default 6000), BATCH (default 128),
# WORKERS (default: the CPU count, at most 8). Results go to $OUT (default /tmp/hierclass-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/hierclass-gpu-check}
DATA=${DATA:-../shared/data/fashion/train.bson}
TAXONOMY=${TAXONOMY:-../shared/data/fashion/category_names.csv}
PRODUCTS=${PRODUCTS:-6000}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch: nothing to check here" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
N_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. GPU tests (AMP bf16/fp16, channels-last) =="
timeout 90 "$PYTHON" -m pytest -q tests/test_finetune.py -k cuda -rs 2>&1 | tee "$OUT/tests.txt" || echo "GPU tests failed"

echo "== 2. training img/s against timm's train.py: 180 px, bf16 AMP, channels-last =="
if [[ -n "${TIMM_TRAIN:-}" && -f "$TIMM_TRAIN" ]]; then
    for model in efficientnet_b0 resnet50; do
        timeout 170 "$PYTHON" benchmarks/bench_train.py --timm-train "$TIMM_TRAIN" --data "$DATA" \
            --taxonomy "$TAXONOMY" --products "$PRODUCTS" --model "$model" --image-size 180 \
            --batch-size "$BATCH" --epochs 2 --workers "$WORKERS" --device cuda --amp bf16 --channels-last \
            --work "$OUT/bench" 2>&1 | tail -2 | tee "$OUT/bench-$model.txt" || echo "$model: bench failed or timed out"
    done
else
    echo "TIMM_TRAIN not set (or not a file): comparison skipped" | tee "$OUT/bench-skipped.txt"
fi

echo "== 3. two processes under torchrun =="
if (( N_GPUS >= 2 )); then
    timeout 140 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m hierclass train-flat \
        --train "$DATA" --taxonomy "$TAXONOMY" --run-dir "$OUT/ddp" --overwrite --backbone efficientnet_b0 \
        --pretrained none --image-size 180 --batch-size 64 --epochs 1 --device cuda --amp bf16 \
        --workers 4 --no-progress 2>&1 | tail -3 | tee "$OUT/ddp.txt" || echo "torchrun run failed"
else
    echo "one GPU: nccl needs a GPU per process; running the 2-process gloo test on the CPU instead"
    timeout 140 "$PYTHON" -m pytest -q tests/test_distributed.py 2>&1 | tail -3 | tee "$OUT/ddp.txt" || echo "gloo test failed"
fi
echo "results in $OUT"
