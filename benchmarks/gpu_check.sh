#!/usr/bin/env bash
# Every GPU check of issue 15 in one run, for a session that is lent a CUDA device (run from the
# repository root; results under ${OUT:-gpu_results}/). Untested on a GPU so far: no device was
# lent while it was written. Sized to finish in about 8 minutes on one modern GPU.
#   1. the suite's CUDA paths (the Triton kernel against its fallback, CUDA training, bf16 harvest)
#   2. bench_harvest on the GPU (fp32 vs bf16 harvest, bare forwards, the accuracy cost)
#   3. bench_train on the GPU (TopK vs SAELens, achieved fraction of the measured bf16 matmul peak)
#   4. bench_sparsify on the GPU (conca vs EleutherAI sparsify, same activations and batches)
#   5. GPU memory: nvidia-smi before and after, and each benchmark's torch.cuda.max_memory_allocated
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi-before.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" > "$OUT/torch.txt" 2>&1
timeout 150 python -m pytest -q -p no:cacheprovider tests/dictionaries/test_triton_kernels.py \
    tests/dictionaries/test_kernels.py tests/models/test_precision.py tests/training/test_training.py \
    tests/activations/test_harvest_parallel.py > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest: $?" >> "$OUT/status.txt"
timeout 150 python benchmarks/bench_harvest.py --device cuda --tokens 65536 --slice-contexts 64 \
    --out "$OUT" > "$OUT/bench_harvest.log" 2>&1; echo "bench_harvest: $?" >> "$OUT/status.txt"
timeout 120 python benchmarks/bench_train.py --device cuda --latents 16384 --methods topk --out "$OUT/train" \
    > "$OUT/bench_train.log" 2>&1; echo "bench_train: $?" >> "$OUT/status.txt"
if python -c "import sparsify" 2>/dev/null; then
  timeout 120 python benchmarks/bench_sparsify.py --device cuda --autocast none,bf16 --latents 16384 --steps 1000 --warmup 50 --out "$OUT" \
      > "$OUT/bench_sparsify.log" 2>&1; echo "bench_sparsify: $?" >> "$OUT/status.txt"
else
  echo "bench_sparsify: skipped (pip install --no-deps eai-sparsify and its small deps first)" >> "$OUT/status.txt"
fi
nvidia-smi > "$OUT/nvidia-smi-after.txt" 2>&1
cat "$OUT/status.txt"
