"""Write ``mlx_evit/models/data/param_tables.json``: what each convertible architecture's parameters are.

Checkpoint identification (:mod:`mlx_evit.loading.identify`) compares a
state dict with these tables instead of building every candidate model. For
each registered architecture that declares checkpoint layouts, at its
default arguments: ``params`` maps each MLX parameter path to its element
count (layout-independent: a transpose keeps it); ``head`` maps the
classifier's parameters to ``[a, b]`` with ``numel = a * num_classes + b``
(from builds with 1 and 2 classes); ``headless`` lists the parameters a
``num_classes=0`` build lacks. ``tests/test_architecture.py`` checks the
tables against fresh builds, so a family change that forgets to rerun this
fails there.

    python tools/make_param_tables.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx.utils import tree_flatten

from mlx_evit.models.registry import build_model, get_entry, list_models

OUT = Path(__file__).resolve().parents[1] / "mlx_evit" / "models" / "data" / "param_tables.json"


def sizes(model) -> dict[str, int]:
    return {k: math.prod(v.shape) for k, v in tree_flatten(model.parameters())}


def table(arch: str) -> dict:
    full = build_model(arch)
    nc = getattr(full, "num_classes", None)
    params = sizes(full)
    entry = {"num_classes": nc, "params": params, "head": {}, "headless": []}
    if not nc:  # no classifier (SAM)
        entry["headless"] = None
        return entry
    one, two = sizes(build_model(arch, num_classes=1)), sizes(build_model(arch, num_classes=2))
    for k in params:
        if one.get(k) != two.get(k):
            a = two[k] - one[k]
            entry["head"][k] = [a, one[k] - a]
    entry["params"] = {k: v for k, v in params.items() if k not in entry["head"]}
    try:
        headless = sizes(build_model(arch, num_classes=0))
    except (TypeError, ValueError):
        headless = None
    entry["headless"] = sorted(set(sizes(full)) - set(headless)) if headless is not None else None
    return entry


def main() -> None:
    archs = [a for a in list_models() if getattr(get_entry(a).builder, "checkpoint_layouts", None)]
    tables = {a: table(a) for a in archs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(tables, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(tables)} architectures, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
