"""Mask agreement of half-precision EfficientViT-SAM with float32 (same weights, same photo and prompts).

    python benchmarks/sam_precision.py [--model l0] [--json out.json]

Runs our predictor in float32, float16 and bfloat16 (attention cores and LayerNorms stay float32)
on the 480x640 photo of sam_bench.py with five prompts (points, a box, box + point), and reports
the IoU of each half-precision mask with the float32 mask, the largest low-res logit difference
and the predicted-IoU difference. (Timing half precision is for the Apple GPU: MLX's CPU backend
has no half-precision GEMM.)
"""

import argparse
import json
import time

import numpy as np

import sam_bench

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="l0", choices=sorted(sam_bench.UPSTREAM))
parser.add_argument("--json")
args = parser.parse_args()

import mlx_evit  # noqa: E402,F401  (BLAS first)
from mlx_evit.models.registry import build_model  # noqa: E402
from mlx_evit.sam import SamPredictor  # noqa: E402
from mlx_evit.models.keymap import load_state_dict  # noqa: E402

CASES = [dict(point_coords=[[320, 200]], point_labels=[1]),
         dict(point_coords=[[100, 100], [400, 300]], point_labels=[1, 0], multimask_output=False),
         dict(box=[50, 60, 500, 420], multimask_output=False),
         dict(box=[200, 100, 600, 470], point_coords=[[400, 300]], point_labels=[1]),
         dict(point_coords=[[500, 80]], point_labels=[1])]
state = sam_bench._state(args.model)
image = sam_bench._image()
outputs, report = {}, {"model": args.model, "prompts": len(CASES)}
for dtype in ("float32", "float16", "bfloat16"):
    model = build_model(sam_bench.UPSTREAM[args.model])
    load_state_dict(model, state)
    p = SamPredictor(model, dtype=None if dtype == "float32" else dtype, compile=False)
    t = time.perf_counter()
    p.set_image(image)
    outputs[dtype] = [p.predict(**c) for c in CASES]
    report[f"{dtype}_seconds"] = round(time.perf_counter() - t, 1)
for dtype in ("float16", "bfloat16"):
    ious, low_diff, iou_diff = [], 0.0, 0.0
    for (m, i, low), (m32, i32, low32) in zip(outputs[dtype], outputs["float32"]):
        for a, b in zip(m, m32):
            union = (a | b).sum()
            ious.append(float((a & b).sum() / union) if union else 1.0)
        low_diff = max(low_diff, float(np.abs(low - low32).max() / np.abs(low32).max()))
        iou_diff = max(iou_diff, float(np.abs(i - i32).max()))
    report[dtype] = dict(mask_iou_min=min(ious), mask_iou_mean=float(np.mean(ious)), masks=len(ious),
                         lowres_max_rel_diff=low_diff, predicted_iou_max_abs_diff=iou_diff)
    print(f"{dtype}: mask IoU vs float32 min {min(ious):.4f} mean {np.mean(ious):.4f} over {len(ious)} masks; "
          f"low-res logits max diff {low_diff:.2e} of max; predicted IoU max diff {iou_diff:.4f}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
