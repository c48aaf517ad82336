#!/usr/bin/env python
"""MLX on its GPU device beside PyTorch on CUDA: same weights, same inputs, one run.

    python benchmarks/gpu_bench.py                      # on a machine with mlx[cuda] and a CUDA torch
    python benchmarks/gpu_bench.py --device cpu --models efficientvit_b0 --batch-sizes 1   # smoke run

The closest thing to the Apple GPU that a Linux machine offers is MLX's CUDA backend: the same
built-in ops (``MLX_EVIT_KERNELS=native``, which ``auto`` picks on a GPU device) run there. For each
(model, batch) both runtimes get timm's random weights; logits are compared first (max abs
difference, printed), then each runtime times ``--repeats`` bursts in alternation and the median
images/s and the ratio mlx/torch are reported. torch runs eager under ``inference_mode`` on
``cuda`` (or the CPU with ``--device cpu``); MLX runs ``mlx_evit.tasks.inference.prepare(model)``
(BatchNorm folded, compiled). Results go to stdout and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx_evit  # noqa: F401  (before mlx.core: BLAS preload on Linux)
import mlx.core as mx
import numpy as np

DEFAULT_MODELS = ("efficientvit_b0", "efficientvit_b1", "efficientvit_l1", "efficientvit_m0", "efficientvit_m4")


def _timm_weights(name: str, res: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"img_size": res} if "_m" in name else {}))
    with torch.no_grad():  # non-trivial BatchNorm statistics so the comparison means something
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _burst(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (at least 3 calls)."""
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def run_case(name: str, res: int, batch: int, device: str, repeats: int, burst: float) -> dict:
    import torch
    from safetensors.torch import save_file
    import tempfile, os

    from mlx_evit.tasks.inference import prepare

    tdev = torch.device("cuda" if device == "gpu" else "cpu")
    tm = _timm_weights(name, res)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
        extra = {"img_size": res} if "_m" in name else {}
        model = mlx_evit.create_model(name, pretrained=path, **extra)
    predictor = prepare(model, compile=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, res, res, 3)).astype(np.float32)
    xm = mx.array(x)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(tdev)
    tm = tm.to(tdev)

    def mlx_call():
        mx.eval(predictor(xm))

    def torch_call():
        with torch.inference_mode():
            out = tm(xt)
        if tdev.type == "cuda":
            torch.cuda.synchronize()
        return out

    ours = np.array(predictor(xm).astype(mx.float32))
    ref = torch_call().float().cpu().numpy()
    diff = float(np.abs(ours - ref).max())
    for _ in range(3):
        mlx_call()
        torch_call()
    rates = {"mlx": [], "torch": []}
    for i in range(repeats):
        order = (("mlx", mlx_call), ("torch", torch_call)) if i % 2 == 0 else (("torch", torch_call), ("mlx", mlx_call))
        for key, fn in order:
            rates[key].append(_burst(fn, burst) * batch)
    mlx_ips, torch_ips = statistics.median(rates["mlx"]), statistics.median(rates["torch"])
    return {"model": name, "res": res, "batch": batch, "device": device, "max_abs_logit_diff": diff,
            "mlx_img_s": mlx_ips, "torch_img_s": torch_ips, "ratio": mlx_ips / torch_ips}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--burst", type=float, default=0.5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device == "gpu":
        import torch

        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            print("gpu_bench: needs MLX's GPU device (mlx[cuda]) and a CUDA torch", file=sys.stderr)
            return 2
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = run_case(name, args.res, batch, args.device, args.repeats, args.burst)
            rows.append(row)
            print(f"{name:18s} b{batch:<3d} {args.device}: mlx {row['mlx_img_s']:8.1f} img/s, torch "
                  f"{row['torch_img_s']:8.1f} img/s, ratio {row['ratio']:.2f}, max |dlogit| "
                  f"{row['max_abs_logit_diff']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
