#!/usr/bin/env bash
# gpt2-124M training throughput and MFU on one GPU (H100/H200): bf16 compute, cuDNN flash
# attention through jax.nn.dot_product_attention (--attention cudnn: cuDNN or an error naming
# why, never a silent fall-back to XLA's attention; --attention dot_product lets JAX choose),
# vocabulary padded to 50304 (a multiple of 128, as llm.c/nanoGPT do), micro-batch
# 64 x 1024 tokens (41.8% MFU on an H100 against 40.4% at 32). About 1-2 minutes with
# compile.
#
#   bash bench/gpu_train.sh                      # on the GPU machine, from the repo root
#   bash bench/gpu_train.sh --batch 32 --remat dots_with_no_batch_dims_saveable
#   bash bench/gpu_train.sh --profile 3          # then: the kernels that take the time
#   bash bench/gpu_train.sh --layers 2 --embd 64 --heads 4 --vocab 256 --batch 2 --seq 64 \
#        --steps 2 --dtype float32 --attention einsum      # CPU smoke test of this script
#
# Extra flags go to bench/train.py and override the defaults below. Prints a table and a
# final `RESULT gpt2: tokens/s N  MFU M%` line.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep XLA from grabbing 75% of GPU memory up front only to fragment it; allow all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# cuBLAS GEMMs unless the caller's XLA_FLAGS choose (bench/gpu_ab.py compares both).
case "${XLA_FLAGS:-}" in
  *xla_gpu_enable_triton_gemm*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" ;;
esac
exec "${PYTHON:-python}" bench/train.py --frameworks jax --sizes gpt2 --dtype bfloat16 \
  --attention cudnn --batch 64 --seq 1024 --vocab 50304 --steps 20 --warmup 2 "$@"
