"""EfficientViT-SAM: mlx_evit against the upstream code (efficientsam 1.0.0, PyTorch eager) on this CPU.

One run measures both sides, each in its own fresh process (so peak memory is
per framework), with the same thread count and the same weights (the
deterministic synthetic checkpoint of tests/synthetic.py):

* ``set_image`` on a 480x640 photo for L0 (encoder at 512) and XL0 (1024):
  PIL resize, normalisation, padding and the image encoder;
* one point-prompt decode at batch 1: ``predict(point, multimask_output=True)``,
  prompt encoder + mask decoder + the postprocess to 480x640 + threshold;
* a 16-box batch decode (``predict_batch`` vs ``predict_torch``);
* peak resident memory of each process, and MLX's own peak allocation.

With ``--precision`` it also runs our float16 and bfloat16 predictors and
reports the mask IoU against our float32 masks (5 prompts on the photo).

    python benchmarks/sam_bench.py [--models l0 xl0] [--threads 2] [--repeats 5] [--precision] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "data" / "images" / "coffee.png"
UPSTREAM = {"l0": "efficientvit_sam_l0", "xl0": "efficientvit_sam_xl0", "l1": "efficientvit_sam_l1",
            "l2": "efficientvit_sam_l2", "xl1": "efficientvit_sam_xl1"}
POINT = ([[320.0, 200.0]], [1])


def _image():
    import numpy as np
    from PIL import Image

    img = Image.open(PHOTO).convert("RGB").resize((640, 480), Image.BILINEAR)
    return np.asarray(img)


def _state(variant: str):
    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic

    return synthetic.state_dict(synthetic.keys_file(f"efficientvit-sam-{variant}"))


def _boxes():
    import numpy as np

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (16, 2))
    return np.concatenate([xy, xy + rng.uniform(40, 200, (16, 2))], axis=1)


def _median_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), times


def worker_torch(variant: str, repeats: int, threads: int) -> dict:
    import numpy as np
    import torch
    from efficientsam.models.efficientvit import sam as upstream
    from efficientsam.models.nn.norm import set_norm_eps

    torch.set_num_threads(threads)
    state = _state(variant)
    model = getattr(upstream, UPSTREAM[variant])()
    set_norm_eps(model, 1e-6)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    predictor = upstream.EfficientViTSamPredictor(model.eval())
    image = _image()
    enc, enc_all = _median_ms(lambda: predictor.set_image(image), repeats)
    pts, labels = np.array(POINT[0]), np.array(POINT[1])
    dec, dec_all = _median_ms(lambda: predictor.predict(pts, labels, multimask_output=True), 3 * repeats, 2)
    boxes = torch.from_numpy(predictor.apply_boxes(_boxes())).float()

    def batch():
        with torch.no_grad():
            predictor.predict_torch(boxes=boxes, multimask_output=True)

    bat, _ = _median_ms(batch, repeats)
    return dict(set_image_ms=enc, set_image_all=enc_all, decode_ms=dec, decode_all=dec_all, batch16_ms=bat)


def worker_mlx(variant: str, repeats: int, threads: int, dtype: str = "float32") -> dict:
    import numpy as np

    import mlx_evit  # noqa: F401  (BLAS first)
    import mlx.core as mx
    from mlx_evit.models.registry import build_model
    from mlx_evit.sam import SamPredictor
    from mlx_evit.models.keymap import load_state_dict

    model = build_model(UPSTREAM[variant])
    load_state_dict(model, _state(variant))
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    predictor = SamPredictor(model, dtype=None if dtype == "float32" else dtype)
    image = _image()
    enc, enc_all = _median_ms(lambda: predictor.set_image(image), repeats)
    pts, labels = np.array(POINT[0]), np.array(POINT[1])
    dec, dec_all = _median_ms(lambda: predictor.predict(pts, labels, multimask_output=True), 3 * repeats, 2)
    bat, _ = _median_ms(lambda: predictor.predict_batch(boxes=_boxes(), multimask_output=True), repeats)
    out = dict(set_image_ms=enc, set_image_all=enc_all, decode_ms=dec, decode_all=dec_all, batch16_ms=bat,
               mlx_peak_mb=mx.get_peak_memory() / 2**20, compiled=predictor.compile)
    if dtype != "float32" or os.environ.get("SAM_BENCH_MASKS"):
        out["masks"] = _prompt_masks(predictor)
    return out


def _prompt_masks(predictor) -> list:
    import numpy as np

    cases = [dict(point_coords=[[320, 200]], point_labels=[1]),
             dict(point_coords=[[100, 100], [400, 300]], point_labels=[1, 0], multimask_output=False),
             dict(box=[50, 60, 500, 420], multimask_output=False),
             dict(box=[200, 100, 600, 470], point_coords=[[400, 300]], point_labels=[1]),
             dict(point_coords=[[500, 80]], point_labels=[1])]
    return [np.packbits(predictor.predict(**c)[0]).tolist() for c in cases]


def _child(args: argparse.Namespace) -> None:
    import resource

    if args.side == "torch":
        result = worker_torch(args.variant, args.repeats, args.threads)
    else:
        result = worker_mlx(args.variant, args.repeats, args.threads, args.dtype)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def _spawn(side: str, variant: str, args: argparse.Namespace, dtype: str = "float32", extra_env=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), **(extra_env or {}))
    cmd = [sys.executable, __file__, "--child", side, "--variant", variant, "--dtype", dtype,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"{side} {variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def _iou(a: list, b: list) -> float:
    import numpy as np

    x, y = np.unpackbits(np.array(a, np.uint8)).astype(bool), np.unpackbits(np.array(b, np.uint8)).astype(bool)
    union = (x | y).sum()
    return float((x & y).sum() / union) if union else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["l0", "xl0"], choices=sorted(UPSTREAM))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", action="store_true", help="also float16/bfloat16 (ours) with mask IoU vs float32")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=["torch", "mlx"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        return _child(args)
    results = {"threads": args.threads, "repeats": args.repeats, "image": "480x640", "models": {}}
    print(f"threads {args.threads}, median of {args.repeats} (decode: {3 * args.repeats}); times in ms")
    print(f"{'model':6} {'side':14} {'set_image':>10} {'decode':>8} {'16 boxes':>9} {'peak RSS MB':>12}")
    for v in args.models:
        row = {}
        env = {"SAM_BENCH_MASKS": "1"} if args.precision else None
        row["torch"] = _spawn("torch", v, args)
        row["mlx_float32"] = _spawn("mlx", v, args, extra_env=env)
        if args.precision:
            for dt in ("float16", "bfloat16"):
                r = _spawn("mlx", v, args, dt)
                r["mask_iou_vs_float32"] = [_iou(a, b) for a, b in zip(r.pop("masks"), row["mlx_float32"]["masks"])]
                row[f"mlx_{dt}"] = r
            row["mlx_float32"].pop("masks", None)
        t = row["torch"]
        for side, r in row.items():
            extra = ""
            if side != "torch":
                r["speedup_set_image"] = t["set_image_ms"] / r["set_image_ms"]
                r["speedup_decode"] = t["decode_ms"] / r["decode_ms"]
                r["speedup_batch16"] = t["batch16_ms"] / r["batch16_ms"]
                extra = (f"  x{r['speedup_set_image']:.2f} / x{r['speedup_decode']:.2f} / x{r['speedup_batch16']:.2f}"
                         f"  (MLX peak {r['mlx_peak_mb']:.0f} MB)")
                if "mask_iou_vs_float32" in r:
                    extra += f"  mask IoU vs fp32 min {min(r['mask_iou_vs_float32']):.4f}"
            print(f"{v:6} {side:14} {r['set_image_ms']:10.0f} {r['decode_ms']:8.1f} {r['batch16_ms']:9.0f} "
                  f"{r['peak_rss_mb']:12.0f}{extra}", flush=True)
        results["models"][v] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
