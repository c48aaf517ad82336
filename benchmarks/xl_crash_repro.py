"""Minimal pure-MLX reproducer of the EfficientViT-SAM XL crash on CUDA with TF32 off (for reporting upstream).

    MLX_ENABLE_TF32=0 python benchmarks/xl_crash_repro.py                       # segfaults (MLX 0.32.4, H200)
    python benchmarks/xl_crash_repro.py                                         # TF32 on: runs
    MLX_ENABLE_TF32=0 python benchmarks/xl_crash_repro.py conv 1,64,64,256 512,3,3,256 1 1 1   # another op
A 3x3 float32 convolution, NHWC 1x64x64x256 -> 1024 channels (the XL neck's FusedMBConv): with TF32 off the
process dies with an illegal memory access (rc -11); 512 output channels, 128 input channels or a 32x32 map
run (benchmarks/gpu_diag.py "crash"). Ops: ``conv X W stride pad groups`` (NHWC, OHWI) or ``matmul A B``.
"""
import sys
import mlx.core as mx

line = " ".join(sys.argv[1:]) or "conv 1,64,64,256 1024,3,3,256 1 1 1"
op, *a = line.split()
x, w = (mx.random.normal(tuple(int(s) for s in t.split(","))) for t in a[:2])
print(line, mx.default_device(), "MLX", mx.__version__, flush=True)
y = mx.conv2d(x, w, stride=int(a[2]), padding=int(a[3]), groups=int(a[4])) if op == "conv" else x @ w
mx.eval(y)
mx.synchronize()
mx.eval(mx.zeros((1 << 20,)))  # an earlier fault surfaces at the next allocation
print("no crash")
