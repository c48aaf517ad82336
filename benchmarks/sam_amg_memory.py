"""Peak RSS of "segment everything" (SamAutomaticMaskGenerator) on a large image, thresholds 0.

EfficientViT-SAM L0 with the synthetic weights of tests/synthetic.py (random-looking but deterministic:
with pred_iou_thresh=0 and stability_score_thresh=0 every candidate mask passes, as real masks do on a
real photo), a synthetic 4000x2660 image, the --everything library calls (generator, then one PNG per
mask encoded in turn as the command does). Run one configuration per process (peak RSS is per process):

    python benchmarks/sam_amg_memory.py --points-per-side 8 [--output-mode uncompressed_rle] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--size", default="2660x4000", help="HxW")
    parser.add_argument("--output-mode", default="uncompressed_rle", choices=("binary_mask", "uncompressed_rle"))
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args()

    import mlx.core as mx
    from PIL import Image

    import synthetic
    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model
    from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor
    from mlx_evit.tasks.mask_generator import rle_to_mask

    h, w = (int(v) for v in args.size.split("x"))
    net = build_model("efficientvit_sam_l0")
    load_state_dict(net, synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0")))
    mx.eval(net.parameters())
    image = synthetic.synthetic_image("bench/amg", h, w)
    base = peak_rss_mb()
    done = []
    gen = SamAutomaticMaskGenerator(SamPredictor(net), points_per_side=args.points_per_side,
                                    points_per_batch=args.points_per_batch, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, output_mode=args.output_mode,
                                    progress=lambda d, t: done.append((d, t)))
    start = time.perf_counter()
    records = gen.generate(image)
    seconds = time.perf_counter() - start
    after_generate = peak_rss_mb()
    png_bytes = 0
    for r in records:  # as the command: one PNG at a time
        seg = r["segmentation"]
        mask = rle_to_mask(seg) if isinstance(seg, dict) else seg
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
        png_bytes += buf.tell()
    result = {"size": [h, w], "points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch,
              "output_mode": args.output_mode, "masks": len(records), "seconds": round(seconds, 1),
              "rss_after_model_mb": round(base), "peak_rss_generate_mb": round(after_generate),
              "peak_rss_total_mb": round(peak_rss_mb()), "progress_calls": len(done),
              "rle_ints": int(sum(len(r["segmentation"]["counts"]) for r in records)) if records and
              isinstance(records[0]["segmentation"], dict) else None}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
