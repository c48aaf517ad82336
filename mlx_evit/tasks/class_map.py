"""Class folders to model classes for the evaluation: a class map file, WordNet ids, label names, synonyms.

A class folder maps to one of the model's classes by a class map entry, else
by WordNet id (``n01440764``), else by label name (case, underscores and
spaces do not matter: ``great_white_shark`` is "great white shark"), else by
one of the label's WordNet synonyms; a name that fits several classes
("crane") must be given by id or map. Split from
:mod:`mlx_evit.tasks.evaluation`, which re-exports both functions.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Optional, Union

from mlx_evit.errors import EvaluationError
from mlx_evit.tasks.labels import Label

__all__ = ["read_class_map", "map_classes"]


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def read_class_map(path: Union[str, os.PathLike]) -> dict[str, Union[int, str]]:
    """``folder -> class`` from a file: a JSON object, or lines ``FOLDER<TAB>CLASS`` (``.csv``: two columns).

    A class is a logit index (int, or digits), a WordNet id or a label name.
    Blank lines and lines starting with ``#`` are skipped. Raises
    :class:`EvaluationError` naming the file and line.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise EvaluationError(f"class map {name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"class map {name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    mapping: dict[str, Union[int, str]] = {}
    if name.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"class map {name}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise EvaluationError(f"class map {name}: expected a JSON object {{folder: class}}")
        for folder, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise EvaluationError(f"class map {name}: {folder!r}: expected an index or a class name")
            mapping[folder] = value
        return mapping
    rows = csv.reader(io.StringIO(text)) if name.lower().endswith(".csv") else (
        line.split("\t") for line in text.splitlines())
    for number, row in enumerate(rows, 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            sep = "," if name.lower().endswith(".csv") else "a tab"
            raise EvaluationError(f"class map {name}:{number}: expected FOLDER and CLASS separated by {sep}")
        mapping[row[0].strip()] = row[1].strip()
    if not mapping:
        raise EvaluationError(f"class map {name}: no entries")
    return mapping


def map_classes(
    folders: Sequence[str],
    labels: Sequence[Label],
    class_map: Optional[Mapping[str, Union[int, str]]] = None,
) -> tuple[int, ...]:
    """The model class index of each folder (see the module docstring for the rules).

    Raises :class:`EvaluationError` listing every folder that maps to no
    class or to several, and classes claimed by two folders.
    """
    by_wnid: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    by_synonym: dict[str, list[int]] = {}
    for label in labels:
        if label.wnid:
            by_wnid.setdefault(label.wnid.lower(), []).append(label.index)
        by_name.setdefault(_norm(label.name), []).append(label.index)
        for synonym in (label.description or "").split(","):
            if synonym.strip():
                by_synonym.setdefault(_norm(synonym), []).append(label.index)

    def lookup(key: str) -> list[int]:
        for table in (by_wnid, by_name, by_synonym):
            found = table.get(key.lower() if table is by_wnid else _norm(key))
            if found:
                return sorted(set(found))
        return []

    unmapped, ambiguous, bad_map = [], [], []
    indices: list[int] = []
    for folder in folders:
        target = class_map.get(folder) if class_map else None
        if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
            index = int(target)
            if not 0 <= index < len(labels):
                bad_map.append(f"{folder} -> {index} (the model has classes 0..{len(labels) - 1})")
                index = -1
            indices.append(index)
            continue
        found = lookup(target if target is not None else folder)
        if target is not None and not found:
            bad_map.append(f"{folder} -> {target!r} (no such class)")
        elif not found:
            unmapped.append(folder)
        elif len(found) > 1:
            ambiguous.append(f"{folder} ({', '.join(f'{i} {labels[i].name}' for i in found)})")
        indices.append(found[0] if len(found) == 1 else -1)
    problems = []
    if unmapped:
        problems.append(
            f"{len(unmapped)} class folder{'s' if len(unmapped) > 1 else ''} match none of the model's "
            f"{len(labels)} classes: {', '.join(unmapped)}"
        )
    if ambiguous:
        problems.append(f"folders matching several classes: {'; '.join(ambiguous)}")
    if bad_map:
        problems.append(f"class map entries naming no class: {'; '.join(bad_map)}")
    claimed: dict[int, list[str]] = {}
    for folder, index in zip(folders, indices):
        if index >= 0:
            claimed.setdefault(index, []).append(folder)
    shared = [f"{', '.join(names)} -> {i} {labels[i].name}" for i, names in claimed.items() if len(names) > 1]
    if shared:
        problems.append(f"folders mapped to the same class: {'; '.join(shared)}")
    if problems:
        example = next((label.wnid for label in labels if label.wnid), None)
        how = f"WordNet id ({example}), " if example else ""
        raise EvaluationError(
            "; ".join(problems) + f" (folders match by {how}label name, or through a class map)"
        )
    return tuple(indices)


