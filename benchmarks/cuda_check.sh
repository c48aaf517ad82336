#!/usr/bin/env bash
# GPU code-path check on a machine with an NVIDIA GPU (about 10 minutes on one H200).
#
#   bash benchmarks/cuda_check.sh [WHEEL_DIR]
#
# MLX's CUDA backend runs the same built-in ops as the Apple GPU (MLX_EVIT_KERNELS=native, which
# `auto` chooses on a GPU device), so this is the closest check of the Mac path a Linux machine allows.
#
# Install (skipped when MLX already has a GPU device):
#   * WHEEL_DIR with an install.sh (the shared bundle ../shared/gpu/: MLX + its CUDA-13 sm_90 files,
#     no package index needed): `source WHEEL_DIR/install.sh`;
#   * WHEEL_DIR of plain wheels: pip --no-index --find-links WHEEL_DIR;
#   * no WHEEL_DIR: the package index.
#   The MLX CUDA extra follows the machine's CUDA: mlx[cuda13] where CUDA 13 is present (torch built for
#   13.x, or nvidia-smi reporting 13.x), else mlx[cuda] (which is the CUDA-12 build).
# Then, writing logs into ${OUT:-gpu_check_out}/:
#   1. the parity tests on the GPU in native mode, with MLX's default TF32 (tests use the TF32 tolerance of
#      tests/precision.py) and with MLX_ENABLE_TF32=0 (exact float32 tolerances);
#   2. benchmarks/gpu_bench.py (every family, MLX beside torch eager; JSON);
#   3. benchmarks/xl_bisect.py under MLX_ENABLE_TF32=0 (the SAM-XL crash: failing op and reproducer).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
wheels="${1:-}"

cuda_major() {
  python3 -c "import torch; v = torch.version.cuda; print(v.split('.')[0] if v else '')" 2>/dev/null && return
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1
}

if ! python3 -c "import mlx.core as mx, sys; sys.exit(0 if mx.is_available(mx.gpu) else 1)" 2>/dev/null; then
  if [ "$(cuda_major)" = "13" ]; then extra="cuda13"; else extra="cuda"; fi
  echo "installing mlx[$extra]"
  if [ -n "$wheels" ] && [ -f "$wheels/install.sh" ]; then
    # shellcheck disable=SC1091
    source "$wheels/install.sh" || exit 2
  elif [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --find-links "$wheels" "mlx[$extra]" || exit 2
  else
    python3 -m pip install -q "mlx[$extra]" -e ".[test]" || exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'EOF' || exit 2
import mlx.core as mx, torch
assert mx.is_available(mx.gpu), "MLX has no GPU device here (install mlx[cuda13] or mlx[cuda])"
assert torch.cuda.is_available(), "torch has no CUDA device"
print("MLX", mx.__version__, "default device", mx.default_device(), "| torch", torch.__version__,
      "CUDA", torch.version.cuda, torch.cuda.get_device_name())
EOF

MLX_EVIT_KERNELS=native timeout 300 python3 -m pytest -q -m parity -p no:cacheprovider -x -n 4 2>&1 \
  | tail -30 | tee "$out/parity_native_gpu_tf32.log"
parity=${PIPESTATUS[0]}
MLX_ENABLE_TF32=0 MLX_EVIT_KERNELS=native timeout 300 python3 -m pytest -q -m parity -p no:cacheprovider -n 4 \
  -k "not xl" 2>&1 | tail -30 | tee "$out/parity_native_gpu_fp32.log"
exact=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/gpu_bench.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

MLX_ENABLE_TF32=0 timeout 240 python3 benchmarks/xl_bisect.py --variants xl1 --json "$out/xl_bisect.json" 2>&1 \
  | tee "$out/xl_bisect.log"

echo "parity (TF32) exit $parity, parity (MLX_ENABLE_TF32=0, XL excluded) exit $exact, benchmark exit $bench"
[ "$parity" = 0 ] && [ "$exact" = 0 ] && [ "$bench" = 0 ]
