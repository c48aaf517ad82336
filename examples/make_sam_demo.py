"""Offline demo weights for ``python -m mlx_evit.sam`` and its web app, without the Hugging Face Hub.

    python examples/make_sam_demo.py sam_demo
    python -m mlx_evit.sam serve --weights sam_demo/model --images sam_demo/images --open

writes ``sam_demo/model``: an EfficientViT-SAM L0 with *random* weights, saved as an MLX model
directory (``--image-size 256`` makes a smaller, faster encoder input than the released 512),
and ``sam_demo/images`` with the example photo. The masks of random weights follow no object:
the demo shows the app, the API and the timings. For real masks drop ``--weights`` (the released
``efficientvit_sam_l0.pt`` is downloaded once and converted).
"""

import argparse
import shutil
from pathlib import Path

import mlx_evit

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="efficientvit_sam_l0", help="architecture (default efficientvit_sam_l0)")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size (default: the model's)")
    parser.add_argument("--force", action="store_true", help="make a new model even if the folder has one")
    args = parser.parse_args()
    images = args.folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for photo in sorted((HERE / "images").glob("*.jpg")):
        shutil.copyfile(photo, images / photo.name)
    model_dir = args.folder / "model"
    if (model_dir / "config.json").exists() and not args.force:  # made before: keep it (--force to remake)
        print(f"{model_dir} is there already (--force makes a new one); example photos in {images}")
        return
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    model = mlx_evit.create_model(args.model, **overrides)  # random weights
    mlx_evit.save_model(model, model_dir, force=args.force)
    print(f"wrote a random-weight {args.model} (encoder input {model.image_size}) in {model_dir} "
          f"and example photos in {images}")


if __name__ == "__main__":
    main()
