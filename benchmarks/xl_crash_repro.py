"""Minimal pure-MLX reproducer of the EfficientViT-SAM XL crash on CUDA with TF32 off (for reporting upstream).

    MLX_ENABLE_TF32=0 python benchmarks/xl_crash_repro.py                      # the XL-only candidates below
    MLX_ENABLE_TF32=0 python benchmarks/xl_crash_repro.py conv 1,64,64,256 1024,3,3,256 1 1 1   # one op
Ops: ``conv X W stride pad groups`` (NHWC input, OHWI weight) or ``matmul A B``. Prints each op before running it;
an illegal memory access aborts there. ``benchmarks/xl_bisect.py`` finds the failing op and prints its line.
"""
import sys
import mlx.core as mx

CANDIDATES = [  # shapes only XL has (1024 input): neck FusedMBConv x4, fused stage 3, 3x3 aggregation, stride 64
    "conv 1,64,64,256 1024,3,3,256 1 1 1", "conv 1,128,128,128 512,3,3,128 2 1 1",
    "conv 1,32,32,1536 1536,3,3,1 1 1 1536", "conv 1,16,16,3072 3072,3,3,1 1 1 3072",
    "matmul 48,1024,32 48,32,32", "matmul 1,64,4096,1024 1024,256"]
for line in [" ".join(sys.argv[1:])] if len(sys.argv) > 1 else CANDIDATES:
    op, *a = line.split()
    x, w = (mx.random.normal(tuple(int(s) for s in t.split(","))) for t in a[:2])
    print(line, flush=True)
    y = mx.conv2d(x, w, stride=int(a[2]), padding=int(a[3]), groups=int(a[4])) if op == "conv" else x @ w
    mx.eval(y)
    mx.synchronize()
    mx.eval(mx.zeros((1 << 20,)))  # the error surfaces at the next allocation
print("no crash:", mx.default_device(), "MLX", mx.__version__)
