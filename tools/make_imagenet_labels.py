"""Regenerate mlx_evit/data/imagenet1k_labels.tsv from timm's ImageNet info files.

The table lists the 1000 ImageNet-1k classes in training-index order (the
order of the sorted WordNet ids, as every ImageNet-1k classifier uses):

    index  wnid  name  description  definition

``description`` is the WordNet lemma list (``"tabby, tabby cat"``, what timm
shows), ``name`` its first lemma (``"tabby"``, the usual short ImageNet
label), ``definition`` the WordNet gloss. Usage (with timm installed):

    python tools/make_imagenet_labels.py            # rewrite the table
    python tools/make_imagenet_labels.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "mlx_evit" / "data" / "imagenet1k_labels.tsv"
HEADER = ("index", "wnid", "name", "description", "definition")


def timm_info_dir() -> Path:
    """timm's data/_info folder, found without importing timm (and torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("timm is not installed; pass --info-dir")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def _read_table(path: Path) -> dict[str, str]:
    """``wnid<TAB>text`` lines -> {wnid: text}."""
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        wnid, sep, text = line.partition("\t")
        if not sep:
            sys.exit(f"{path}:{number}: expected 'wnid<TAB>text'")
        table[wnid] = text.strip()
    return table


def build_table(info_dir: Path) -> str:
    """The TSV text for the classes listed in ``imagenet_synsets.txt``."""
    wnids = (info_dir / "imagenet_synsets.txt").read_text(encoding="utf-8").split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        sys.exit(f"{info_dir}/imagenet_synsets.txt: expected 1000 sorted WordNet ids, got {len(wnids)}")
    lemmas = _read_table(info_dir / "imagenet_synset_to_lemma.txt")
    definitions = _read_table(info_dir / "imagenet_synset_to_definition.txt")
    lines = ["\t".join(HEADER)]
    for index, wnid in enumerate(wnids):
        description = lemmas[wnid]
        name = description.split(",")[0].strip()
        fields = (str(index), wnid, name, description, definitions[wnid])
        if any("\t" in f or "\n" in f or not f for f in fields):
            sys.exit(f"{wnid}: empty field or field with a tab/newline: {fields}")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--info-dir", type=Path, default=None, help="timm's data/_info folder")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    args = parser.parse_args(argv)
    text = build_table(args.info_dir or timm_info_dir())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({text.count(chr(10)) - 1} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
