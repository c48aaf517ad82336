#!/usr/bin/env bash
# GPU code-path check on a machine with an NVIDIA GPU (one call of at most CHECK_SECONDS, default 540 s).
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
#      tests/precision.py) and with MLX_ENABLE_TF32=0 (exact float32 tolerances), and beside them
#      benchmarks/xl_bisect.py under MLX_ENABLE_TF32=0 (the SAM-XL crash: failing op and reproducer);
#   2. benchmarks/gpu_bench.py (every family, MLX beside torch eager; JSON);
#   3. benchmarks/gpu_profile.py (where each model's time goes, op by op, beside torch's kernel profile).
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

# Every step is bounded so that the whole check fits one call of a lent machine (CHECK_SECONDS, default 540):
# correctness first (the two parity runs and the XL bisection in parallel: they do not time anything), then
# the timed parts alone on the GPU (benchmark, then the per-op profile).
t0=$SECONDS
budget=${CHECK_SECONDS:-540}
left() { local l=$(( budget - (SECONDS - t0) - ${1:-0} )); [ "$l" -lt 10 ] && l=10; echo "$l"; }

python3 - > "$out/env.txt" 2>&1 <<'EOF2'
import mlx.core as mx, torch, mlx_evit
print("MLX", mx.__version__, mx.default_device(), "| torch", torch.__version__, torch.version.cuda,
      torch.cuda.get_device_name(), "| cudnn tf32", torch.backends.cudnn.allow_tf32,
      "matmul tf32", torch.backends.cuda.matmul.allow_tf32, "| blas", mlx_evit.blas_info())
EOF2

ptime=$(( $(left 300) < 150 ? $(left 300) : 150 ))
MLX_EVIT_KERNELS=native timeout "$ptime" python3 -m pytest -m parity -p no:cacheprovider -n 4 -v --tb=short \
  > "$out/parity_native_gpu_tf32.log" 2>&1 &
p1=$!
MLX_ENABLE_TF32=0 MLX_EVIT_KERNELS=native timeout "$ptime" python3 -m pytest -m parity -p no:cacheprovider \
  -n 4 -v --tb=short > "$out/parity_native_gpu_fp32.log" 2>&1 &
p2=$!
MLX_ENABLE_TF32=0 timeout "$ptime" python3 benchmarks/xl_bisect.py --variants xl1,xl0 --kernels native \
  --timeout 60 --json "$out/xl_bisect.json" > "$out/xl_bisect.log" 2>&1 &
p3=$!
wait $p1; parity=$?
wait $p2; exact=$?
wait $p3
tail -15 "$out/parity_native_gpu_tf32.log"; tail -15 "$out/parity_native_gpu_fp32.log"; cat "$out/xl_bisect.log"

timeout "$(left 70)" python3 benchmarks/gpu_bench.py --burst 0.15 --json "$out/gpu_bench.json" 2>&1 \
  | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}

timeout "$(left 5)" python3 benchmarks/gpu_profile.py --json "$out/gpu_profile.json" > "$out/gpu_profile.log" 2>&1
tail -60 "$out/gpu_profile.log"

echo "parity (TF32) exit $parity, parity (MLX_ENABLE_TF32=0) exit $exact, benchmark exit $bench, $((SECONDS - t0)) s"
# The gate is exact float32 (README "Float32 on CUDA"); the TF32 run is reported beside it.
[ "$exact" = 0 ] && [ "$bench" = 0 ]
