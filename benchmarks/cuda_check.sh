#!/usr/bin/env bash
# GPU code-path check on a machine with an NVIDIA GPU (under 8 minutes on one H200).
#
#   bash benchmarks/cuda_check.sh [WHEEL_DIR]
#
# MLX's CUDA backend runs the same built-in ops as the Apple GPU (MLX_EVIT_KERNELS=native, which
# `auto` chooses on a GPU device), so this is the closest check of the Mac path a Linux machine
# allows. Steps: install mlx[cuda] (from WHEEL_DIR with --no-index when the machine has no index,
# else from the package index) beside a CUDA torch; run every parity test with MLX's default device
# on the GPU, in native mode; then benchmarks/gpu_bench.py (MLX on the GPU beside torch on CUDA).
# Writes logs into ${OUT:-gpu_check_out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
wheels="${1:-}"

if ! python3 -c "import mlx.core as mx, sys; sys.exit(0 if mx.is_available(mx.gpu) else 1)" 2>/dev/null; then
  if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --find-links "$wheels" "mlx[cuda]" -e ".[test]" || exit 2
  else
    python3 -m pip install -q "mlx[cuda]" -e ".[test]" "torch==2.14.1" "torchvision==0.29.1" || exit 2
  fi
fi
python3 - <<'EOF' || exit 2
import mlx.core as mx, torch
assert mx.is_available(mx.gpu), "MLX has no GPU device here (install mlx[cuda])"
assert torch.cuda.is_available(), "torch has no CUDA device"
print("MLX", mx.__version__, "default device", mx.default_device(), "| torch", torch.__version__, torch.cuda.get_device_name())
EOF

# The parity suite on MLX's GPU device (the default device there), MLX built-ins only.
MLX_EVIT_KERNELS=native timeout 300 python3 -m pytest -q -m parity -p no:cacheprovider 2>&1 | tee "$out/parity_native_gpu.log"
parity=${PIPESTATUS[0]}

timeout 180 python3 benchmarks/gpu_bench.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

echo "parity exit $parity, benchmark exit $bench"
[ "$parity" = 0 ] && [ "$bench" = 0 ]
