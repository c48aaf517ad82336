"""The package's structure: one-way imports by layer, module size and purpose, the load pipe running down
once, names that do not collide, metadata outside MLX's tree.

The import graph is read from the source (``ast``; function-level imports
and modules imported by name through ``importlib`` count too).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_evit
from calltrace import layer_of, trace
from mlx_evit.models.registry import build_model, list_models

PACKAGE = Path(mlx_evit.__file__).resolve().parent
SOFT_MAX_LINES = 500  # longer: the module's docstring says why, in a sentence that names its length
HARD_MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("mlx_evit",) + path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the mlx_evit modules it imports (anywhere in its code)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:  # ``from pkg import submodule`` depends on the submodule only
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in modules else base)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
                deps.add(node.value)  # importlib.import_module("mlx_evit.<module>") tables
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (as a path), or [] when the graph is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycles():
    graph = import_graph()
    assert "mlx_evit.api" in graph["mlx_evit"]  # the graph sees package imports
    assert not _cycle(graph), " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_imports_run_down_the_layers():
    """Every import, function-level ones included, goes to the same layer or one below (calltrace.LAYERS)."""
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
              for m, deps in import_graph().items() for d in sorted(deps)
              if layer_of(d) > layer_of(m) and not (m == "mlx_evit" and d.startswith("mlx_evit."))]
    assert not upward, "\n".join(upward)


def test_layer_rule_orders_the_layers():
    assert layer_of("mlx_evit.cli.sam_command") > layer_of("mlx_evit.tasks.sam_predictor") > layer_of("mlx_evit.api")
    assert layer_of("mlx_evit.loading.pipeline") > layer_of("mlx_evit.loading.hub") > layer_of("mlx_evit.models.mit")
    assert layer_of("mlx_evit.models.registry") > layer_of("mlx_evit.ops.layers") > layer_of("mlx_evit.errors")


def test_library_modules_never_import_the_command_line():
    graph = import_graph()
    shims = {f"mlx_evit.{p}.__main__" for p in ("classify", "segment", "sam", "evaluate")} | {"mlx_evit.__main__"}
    offenders = [m for m, deps in graph.items() if not m.startswith("mlx_evit.cli") and m not in shims
                 and any(d.startswith("mlx_evit.cli") for d in deps)]
    assert not offenders


def test_task_modules_never_read_checkpoints_or_the_hub():
    graph = import_graph()
    banned = ("mlx_evit.loading.hub", "mlx_evit.loading.checkpoint", "mlx_evit.loading.model_dir",
              "mlx_evit.loading.identify")
    for module, deps in graph.items():
        if module.startswith("mlx_evit.tasks"):
            assert not [d for d in deps if d.startswith(banned)], module


def test_no_public_function_shares_a_module_name():
    import importlib
    import inspect

    names = {n.rpartition(".")[2] for n in _modules()}
    clashes = []
    for module in _modules():
        if module.endswith("__main__"):
            continue
        mod = importlib.import_module(module)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr, None)
            # a function is named once, where it is defined; an alias kept for a documented name is allowed
            if inspect.isfunction(obj) and obj.__name__ in names:
                clashes.append(f"{module}.{attr}")
    assert not clashes


def test_every_module_states_its_job_and_long_ones_say_why():
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text))
        assert doc, f"{name} has no module docstring"
        lines = text.count("\n")
        assert lines <= HARD_MAX_LINES, f"{name}: {lines} lines"
        if lines > SOFT_MAX_LINES:
            # the reason names the module's length to the hundred, so it goes stale when the module grows
            assert re.search(rf"\b{lines // 100}\d\d lines\b", doc), f"{name}: {lines} lines, no reason given"


def test_param_tables_match_fresh_builds():
    """The identification tables (tools/make_param_tables.py) equal what the registry builds."""
    import math

    from mlx.utils import tree_flatten

    from mlx_evit.loading.identify import _tables

    def sizes(model):
        return {k: math.prod(v.shape) for k, v in tree_flatten(model.parameters())}

    tables = _tables()
    assert set(tables) == {a for a in list_models() if getattr(build_model(a), "checkpoint_layouts", None)}
    for arch, table in tables.items():
        full = sizes(build_model(arch))
        nc = table["num_classes"]
        expected = dict(table["params"], **{k: a * (nc or 0) + b for k, (a, b) in table["head"].items()})
        assert expected == full, arch
        if table["head"]:
            three = sizes(build_model(arch, num_classes=3))
            assert {k: a * 3 + b for k, (a, b) in table["head"].items()} == {k: three[k] for k in table["head"]}


def _runs_down_once(t) -> None:
    """No climb; each stage of the pipe (a module the pipe or the API calls) entered from at most two modules.

    Helpers that several readers share (``loading.tensor_formats``, ``errors``) are leaves, not stages.
    """
    assert not t.climbs, t.summary()
    owners = ("mlx_evit.loading.pipeline", "mlx_evit.api")
    for module, callers in t.entries.items():
        modules = {c.rpartition(".")[0] for c in callers}
        if module.startswith("mlx_evit.loading") and modules & set(owners):
            assert len(modules) <= 2, t.summary()


def test_load_and_convert_run_down_the_layers_once(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    mlx_evit.save_model(mlx_evit.create_model("efficientvit_b0", num_classes=7), tmp_path / "folder")
    state = timm.create_model("efficientvit_m0", num_classes=5).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m0.safetensors"))
    torch.save(state, tmp_path / "m0.pth")
    for src in ("folder", "m0.safetensors", "m0.pth"):
        net, t = trace(mlx_evit.load, tmp_path / src)
        _runs_down_once(t)
        assert "mlx_evit.loading.pipeline" in t.modules
        assert ("mlx_evit.loading.identify" in t.modules) == (src != "folder")
    _, t = trace(mlx_evit.convert, tmp_path / "m0.pth", tmp_path / "out")
    _runs_down_once(t)
    assert mlx_evit.load(tmp_path / "out").num_classes == 5


def test_trace_sees_a_climb():
    """The tracer reports a lower-layer module calling a higher one (so the tests above can fail)."""
    scope = {"__name__": "mlx_evit.ops.dtypes"}
    exec(compile("def climb(f):\n    return f()\n", "<lower>", "exec"), scope)  # code that runs as ops.dtypes
    _, t = trace(scope["climb"], lambda: mlx_evit.create_model("efficientvit_b0"))
    assert ("mlx_evit.ops.dtypes", "mlx_evit.api") in t.climbs


def test_hub_tag_load_runs_down_the_layers_once(monkeypatch, tmp_path):
    import timm
    from huggingface_hub import constants

    from fake_hub import FakeHub
    from reference_models import save_timm_folder

    monkeypatch.setenv("MLX_EVIT_CACHE", str(tmp_path / "mlx"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub().start()
    try:
        folder = save_timm_folder(timm.create_model("efficientvit_b0", pretrained=False).eval(), tmp_path / "b0")
        hub.publish("timm/efficientvit_b0.r224_in1k",
                    {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")})
        from mlx_evit.loading import pipeline

        path, t = trace(pipeline.pretrained_dir, "efficientvit_b0.r224_in1k", endpoint=hub.endpoint)
    finally:
        hub.stop()
    _runs_down_once(t)
    assert "mlx_evit.loading.hub" in t.modules and "mlx_evit.loading.identify" in t.modules
    assert mlx_evit.load(path).arch_name == "efficientvit_b0"


@pytest.mark.parametrize("name", list_models())
def test_model_tree_holds_only_modules_and_arrays(name):
    model = build_model(name)
    assert model.keys(), name
    def tree_node(value) -> bool:  # a sub-module, an array, or a list/dict of them (MLX's containers)
        if isinstance(value, (list, tuple)):
            return bool(value) and all(tree_node(v) for v in value)
        if isinstance(value, dict) and not isinstance(value, nn.Module):
            return bool(value) and all(tree_node(v) for v in value.values())
        return isinstance(value, (nn.Module, mx.array))

    for key, value in model.items():
        assert tree_node(value), f"{name}: model[{key!r}] is {type(value).__name__} {value!r:.80}"
    info = model.info
    assert info.architecture == model.arch_name == name
    assert dict(info.args) == model.arch_args
    cfg = model.pretrained_cfg
    if cfg is not None:  # a copy: editing it does not change the model
        cfg["tag"] = "edited"
        assert model.pretrained_cfg["tag"] != "edited"
    model.labels = [f"c{i}" for i in range(getattr(model, "num_classes", 0) or 0)]
    assert "labels" not in model and model.info.labels == tuple(model.labels)
