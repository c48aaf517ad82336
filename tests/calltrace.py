"""Trace which mlx_evit modules a call runs through, and whether it ever climbs back up the layers.

Used by ``tests/test_architecture.py`` (the load pipe runs down once) and as
a tool: ``python tests/calltrace.py MODEL_DIR_OR_CHECKPOINT`` prints the
trace of ``mlx_evit.load`` on it.

Layers, lowest first: base utilities (errors, version, outputs), ``ops``,
``models``, ``loading`` readers (checkpoint, identify, model_dir, hub), the
loading pipe, the public API, ``tasks``, ``cli``, the ``python -m`` shims.
A *climb* is a call from a module into a function of a higher layer (any
depth of the call tree); methods of objects handed down (a model's ``fuse``)
are polymorphic dispatch, not climbs. A module's *entries* are the distinct functions of other
modules that call into it, counted only above the models layer: calls made
inside ops and models (building a model enters ``ops.layers`` from every
block class) are the work of one step, not the pipe's route.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field

LAYERS = (
    ("mlx_evit.errors", "mlx_evit.version", "mlx_evit.outputs"),
    ("mlx_evit.ops",),
    ("mlx_evit.models",),
    ("mlx_evit.loading",),  # the readers and sources: checkpoint, identify, model_dir, hub, arch_schema, ...
    ("mlx_evit.loading.pipeline",),
    ("mlx_evit.api", "mlx_evit"),
    ("mlx_evit.tasks",),
    ("mlx_evit.cli", "mlx_evit.webapp"),  # the command line and the web app, both on top of the tasks
    ("mlx_evit.classify", "mlx_evit.segment", "mlx_evit.sam", "mlx_evit.evaluate", "mlx_evit.__main__"),
)


def layer_of(module: str) -> int:
    """The layer index of an ``mlx_evit`` module (the longest matching prefix wins)."""
    best, rank = -1, 0
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


@dataclass
class Trace:
    modules: list = field(default_factory=list)  # in order of first entry
    climbs: list = field(default_factory=list)  # (caller, callee) pairs that go up a layer
    entries: dict = field(default_factory=dict)  # module -> set of calling functions (other modules)

    def max_entries(self) -> int:
        return max((len(v) for v in self.entries.values()), default=0)

    def summary(self) -> str:
        lines = [f"{len(self.modules)} modules: " + " -> ".join(m.removeprefix("mlx_evit.") for m in self.modules),
                 f"climbs: {len(self.climbs)}" + "".join(f"\n  {a} -> {b}" for a, b in self.climbs[:10])]
        for m, callers in self.entries.items():
            lines.append(f"  {m.removeprefix('mlx_evit.')}: entered from {len(callers)}: "
                         + ", ".join(sorted(c.removeprefix('mlx_evit.') for c in callers)))
        return "\n".join(lines)


def trace(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under a profiler; returns ``(result, Trace)``."""
    out = Trace()
    seen = OrderedDict()
    module_layer = layer_of("mlx_evit.models")

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("mlx_evit"):
            return
        caller_frame = frame.f_back
        while caller_frame is not None and not caller_frame.f_globals.get("__name__", "").startswith("mlx_evit"):
            caller_frame = caller_frame.f_back  # through numpy/mlx/stdlib frames to the mlx_evit caller
        seen.setdefault(callee, None)
        if caller_frame is None:
            return
        caller = caller_frame.f_globals["__name__"]
        if caller == callee:
            return
        code = frame.f_code
        method = code.co_argcount > 0 and code.co_varnames[0] in ("self", "cls")
        if layer_of(callee) > layer_of(caller) and not method:  # a model's own method (fuse) is no climb
            out.climbs.append((caller, callee))
        if layer_of(caller) > module_layer:
            out.entries.setdefault(callee, set()).add(f"{caller}.{caller_frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    out.modules = list(seen)
    return result, out


if __name__ == "__main__":
    import mlx_evit

    _, t = trace(mlx_evit.load, sys.argv[1])
    print(t.summary())
