"""The timm side of the cold-start benchmark: classify one image with local weights, as a timm user would.

    python benchmarks/timm_classify.py IMAGE --weights model.safetensors --model efficientvit_b0 [--threads N]

Same job as ``python -m mlx_evit.classify IMAGE --weights FILE --model NAME``:
build the model, load a timm-layout checkpoint, apply the model's eval
transform (timm's own), run it, print the top-5 classes.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--weights", required=True, help="timm state dict (.safetensors, .pth)")
    parser.add_argument("--model", required=True, help="timm model name")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    import timm
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False)
    if args.weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(args.weights)
    else:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    x = transform(Image.open(args.image).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(args.top_k)
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{i}\t{p:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
