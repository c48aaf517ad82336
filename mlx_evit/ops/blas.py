"""A fast BLAS for MLX's CPU backend on Linux, whatever the import order.

MLX's Linux CPU wheel (``mlx-cpu``) links its GEMMs to a bundled reference
(netlib) BLAS, 50x slower than OpenBLAS. On import, :mod:`mlx_evit` points
MLX's ``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm`` at an optimized library:

1. the library: ``MLX_EVIT_BLAS`` unset/``auto``: the system OpenBLAS
   (``apt-get install libopenblas0-pthread``; faster here once its core is
   right), else the ``scipy-openblas32`` wheel (``pip install
   "mlx_evit[blas]"``); ``system``/``pip`` for one of them; a path for any
   CBLAS library; ``0`` for MLX's own.
2. the binding: before ``mlx.core`` is imported, a library that exports
   ``cblas_sgemm`` is loaded with ``RTLD_GLOBAL`` and MLX binds to it; once
   MLX is loaded (``import mlx.core`` first, or ``scipy-openblas32``, whose
   symbols carry a ``scipy_`` prefix), the entries of ``libmlx.so``'s
   symbol table (GOT) for those three functions are rewritten to the
   library's. The library is then what MLX calls: checked by reading the
   entries back and by a GEMM through ``mx.matmul`` against numpy.
3. the kernels: a DYNAMIC_ARCH OpenBLAS that does not recognise the CPU
   (Debian's 0.3.21 takes an AVX-512 Xeon without a model name for a
   Prescott, 6x slower) is switched to the core the CPU's features call for
   (``/proc/cpuinfo`` flags: AVX-512 -> SkylakeX, AVX2+FMA -> Haswell), then
   a GEMM self-check against numpy must pass, else it goes back.
   ``MLX_EVIT_BLAS_CORETYPE=NAME`` forces a core, ``=keep`` keeps the
   library's; a set ``OPENBLAS_CORETYPE`` is always left alone.

When none of this works (no library, a check failed) a
:class:`SlowBLASWarning` says so once, with the fix. Nothing happens on
macOS (Accelerate) or with ``MLX_EVIT_BLAS=0``. :func:`blas_info` reports the
outcome. Results agree with the reference BLAS to float32 round-off.

The module runs past 500 lines because finding, checking and binding a BLAS (CPU core choice,
the dynamic linker, libmlx's GOT entries, the fallbacks) is one mechanism that only works whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

ENV = "MLX_EVIT_BLAS"
CORE_ENV = "MLX_EVIT_BLAS_CORETYPE"
SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
FIX = ('pip install "mlx_evit[blas]" (or apt-get install libopenblas0-pthread); '
       f"{ENV}=0 keeps MLX's own BLAS without this warning")

# x86 OpenBLAS cores by the widest vector unit they use (higher is faster for float32 GEMM).
_TIERS = {
    "skylakex": 3, "cooperlake": 3, "sapphirerapids": 3,
    "haswell": 2, "zen": 2, "excavator": 1, "steamroller": 1, "piledriver": 1, "bulldozer": 1, "sandybridge": 1,
}


class SlowBLASWarning(RuntimeWarning):
    """MLX's GEMMs run on its bundled reference BLAS (tens of times slower)."""


@dataclass
class BlasInfo:
    """What :func:`setup` did. ``route``: ``"preload"``, ``"got"`` or ``None`` (MLX's own BLAS)."""

    library: Optional[str] = None
    prefix: str = ""
    route: Optional[str] = None
    core: Optional[str] = None
    detected_core: Optional[str] = None
    problem: Optional[str] = None
    bound: dict = field(default_factory=dict)  # symbol -> library that libmlx calls for it

    @property
    def fast(self) -> bool:
        return self.route is not None


# ---------------------------------------------------------------- CPU and library


def cpu_flags() -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def core_for(flags: set[str]) -> Optional[str]:
    """The OpenBLAS core type (x86-64) that the CPU features call for, or None."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return None


def _tier(core: Optional[str]) -> int:
    return _TIERS.get((core or "").strip().lower(), 0)


class _Library:
    """An opened (Open)BLAS with the symbol prefix its functions carry."""

    def __init__(self, path: str, mode: int):
        self.path = path
        self.lib = ctypes.CDLL(path, mode=mode)
        for prefix in ("", "scipy_"):
            if hasattr(self.lib, prefix + "cblas_sgemm"):
                self.prefix = prefix
                break
        else:
            raise OSError(f"{path}: no cblas_sgemm")

    def func(self, name: str):
        return getattr(self.lib, self.prefix + name, None)

    def address(self, name: str) -> Optional[int]:
        f = self.func(name)
        return ctypes.cast(f, ctypes.c_void_p).value if f is not None else None

    def corename(self) -> Optional[str]:
        f = self.func("openblas_get_corename")
        if f is None:
            return None
        f.restype = ctypes.c_char_p
        return (f() or b"").decode("ascii", "replace").strip() or None

    def set_core(self, core: str) -> bool:
        """Re-run OpenBLAS's DYNAMIC_ARCH core selection with ``OPENBLAS_CORETYPE=core`` (before any call)."""
        init, quit_ = self.func("gotoblas_dynamic_init"), self.func("gotoblas_dynamic_quit")
        if init is None or quit_ is None:
            return False
        old = os.environ.get("OPENBLAS_CORETYPE")
        os.environ["OPENBLAS_CORETYPE"] = core
        try:
            quit_()
            init()
        finally:
            if old is None:
                del os.environ["OPENBLAS_CORETYPE"]
            else:
                os.environ["OPENBLAS_CORETYPE"] = old
        return True


def _pip_library() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    try:
        names = sorted(n for n in os.listdir(lib_dir) if n.startswith("libscipy_openblas") and ".so" in n)
    except OSError:
        return None
    return os.path.join(lib_dir, names[0]) if names else None


def _system_libraries() -> list[str]:
    paths = [p for p in CANDIDATES if os.path.exists(p)]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def _choices(choice: str) -> list[str]:
    if choice == "pip":
        return [p for p in (_pip_library(),) if p]
    if choice == "system":
        return _system_libraries()
    if choice in ("", "1", "auto"):
        return _system_libraries() + [p for p in (_pip_library(),) if p]
    return [choice]


# ---------------------------------------------------------------- self-checks


def gemm_check(lib: _Library, sizes=((67, 45, 53), (192, 160, 256))) -> Optional[str]:
    """Run ``cblas_sgemm`` of ``lib`` against numpy (float64); returns a problem or None."""
    import numpy as np

    sgemm = lib.func("cblas_sgemm")
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    sgemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    sgemm.restype = None
    rng = np.random.default_rng(0)
    for m, n, k in sizes:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.full((m, n), np.nan, np.float32)
        # row-major (101), no transpose (111): C = A @ B
        sgemm(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        err = float(np.max(np.abs(c - ref)) / max(1.0, float(np.max(np.abs(ref)))))
        if not np.isfinite(err) or err > 1e-5:
            return f"sgemm {m}x{n}x{k} is off by {err:.1e} (relative)"
    return None


def _mlx_check() -> Optional[str]:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.standard_normal((130, 70)).astype(np.float32)
    b = rng.standard_normal((70, 90)).astype(np.float32)
    with mx.stream(mx.cpu):
        c = np.array(mx.matmul(mx.array(a), mx.array(b)))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.max(np.abs(c - ref)) / float(np.max(np.abs(ref))))
    return None if err < 1e-5 else f"mx.matmul is off by {err:.1e} (relative)"


# ---------------------------------------------------------------- libmlx's GOT


class _Dl_info(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _libdl() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def owner(address: Optional[int]) -> Optional[str]:
    """The file of the loaded library that holds ``address`` (``dladdr``)."""
    if not address:
        return None
    dladdr = _libdl().dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Dl_info)]
    out = _Dl_info()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(out)) or not out.dli_fname:
        return None
    return os.path.realpath(out.dli_fname.decode())


def _libmlx_path() -> Optional[str]:
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.endswith("/libmlx.so") or os.path.basename(path).startswith("libmlx.so."):
                    return path
    except OSError:
        pass
    return None


def _load_base(path: str) -> int:
    """The load address (``l_addr``) of an already loaded library."""
    handle = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 4) | os.RTLD_NOW)._handle
    dlinfo = _libdl().dlinfo
    dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    link_map = ctypes.c_void_p()
    if dlinfo(ctypes.c_void_p(handle), 2, ctypes.byref(link_map)) != 0:  # RTLD_DI_LINKMAP
        raise OSError("dlinfo failed")
    return ctypes.c_size_t.from_address(link_map.value).value  # struct link_map's first field: l_addr


def got_slots(path: str, names=SYMBOLS) -> dict[str, int]:
    """``{symbol: r_offset}`` of the GOT relocations for ``names`` in the ELF64 file ``path`` (x86-64, AArch64).

    The file is memory-mapped and only its relocation, symbol and string tables are read
    (``.rela.plt`` first: calls through the PLT; then any other RELA section).
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise OSError(f"{path}: not a little-endian ELF64 file")
        machine, = struct.unpack_from("<H", data, 0x12)
        # GLOB_DAT and JUMP_SLOT relocation types: x86-64 (EM_X86_64 = 62) and AArch64 (EM_AARCH64 = 183)
        kinds = {62: (6, 7), 183: (1025, 1026)}.get(machine)
        if kinds is None:
            raise OSError(f"{path}: ELF machine {machine} is not supported")
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_at = sections[shstrndx][4]

        def section_name(sec) -> bytes:
            start = names_at + sec[0]
            return data[start:data.find(b"\0", start)]

        relas = [sec for sec in sections if sec[1] == 4 and sec[9]]  # SHT_RELA
        relas.sort(key=lambda sec: section_name(sec) != b".rela.plt")
        wanted, out = set(names), {}
        for _name, _kind, _fl, _addr, offset, size, link, _info, _al, entsize in relas:
            symtab = sections[link]
            strtab = sections[symtab[6]]
            for r in range(size // entsize):
                r_offset, r_info = struct.unpack_from("<QQ", data, offset + r * entsize)
                r_type, sym = r_info & 0xFFFFFFFF, r_info >> 32
                if r_type not in kinds or not sym:
                    continue
                start = strtab[4] + struct.unpack_from("<I", data, symtab[4] + sym * symtab[9])[0]
                name = data[start:data.find(b"\0", start)].decode("ascii", "replace")
                if name in wanted:
                    out.setdefault(name, r_offset)
            if wanted <= set(out):
                break
        return out


def _write_pointer(address: int, value: int) -> None:
    """Write one pointer, making its page writable for the write if RELRO made it read-only."""
    libc = _libdl()
    page = os.sysconf("SC_PAGE_SIZE")
    start = address & ~(page - 1)
    writable = _page_writable(address)
    if not writable:
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(ctypes.c_void_p(start), page, 3) != 0:  # PROT_READ | PROT_WRITE
            raise OSError("mprotect failed")
    ctypes.c_void_p.from_address(address).value = value
    if not writable:
        libc.mprotect(ctypes.c_void_p(start), page, 1)  # PROT_READ


def _page_writable(address: int) -> bool:
    with open("/proc/self/maps", encoding="ascii") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return perms[1] == "w"
    return False


class _MLXSlots:
    """The GOT entries through which libmlx calls the BLAS."""

    def __init__(self):
        path = _libmlx_path()
        if path is None:
            raise OSError("libmlx.so is not loaded")
        self.path = path
        base = _load_base(path)
        self.addresses = {name: base + off for name, off in got_slots(path).items()}

    def current(self) -> dict[str, int]:
        return {name: ctypes.c_void_p.from_address(a).value or 0 for name, a in self.addresses.items()}

    def bind(self, targets: dict[str, int]) -> None:
        for name, value in targets.items():
            if name in self.addresses and value:
                _write_pointer(self.addresses[name], value)


def _bound(slots: _MLXSlots) -> dict[str, Optional[str]]:
    return {name: owner(value) for name, value in slots.current().items()}


# ---------------------------------------------------------------- setup

_STATE: Optional[BlasInfo] = None


def info() -> BlasInfo:
    """What :func:`setup` did (runs it if it has not run)."""
    return _STATE if _STATE is not None else setup()


def setup(warn: bool = True) -> BlasInfo:
    """Point MLX's GEMMs at a fast, checked BLAS (see the module docstring); once per process."""
    global _STATE
    if _STATE is not None:
        return _STATE
    state = BlasInfo()
    _STATE = state
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("0", "off", "no", "false") or not sys.platform.startswith("linux"):
        return state
    mlx_loaded = "mlx.core" in sys.modules
    problems = []
    for path in _choices(choice):
        try:
            problem = _try(state, path, mlx_loaded)
        except Exception as e:  # never let the speed-up break the import
            problem = f"{path}: {type(e).__name__}: {e}"
        if problem is None:
            return state
        problems.append(problem)
        state.route = None
    state.library = None
    state.problem = "; ".join(problems) or "no OpenBLAS found"
    if problems:
        _restore_reference()  # a library that failed its check may have been preloaded: MLX must not call it
    if warn:
        _warn_slow(state, mlx_loaded)
    return state


def _try(state: BlasInfo, path: str, mlx_loaded: bool) -> Optional[str]:
    preload = not mlx_loaded
    try:
        lib = _Library(path, ctypes.RTLD_GLOBAL if preload else ctypes.RTLD_LOCAL)
    except OSError as e:
        return f"{path}: {e}"
    if lib.prefix:  # MLX cannot bind to prefixed names by itself
        preload = False
    state.library, state.prefix = os.path.realpath(path), lib.prefix
    state.detected_core = state.core = lib.corename()
    _fix_core(state, lib)
    problem = gemm_check(lib)
    if problem is not None and state.core != state.detected_core and state.detected_core:
        lib.set_core(state.detected_core)  # the switched core computes wrongly: back to the library's own
        state.core = lib.corename()
        problem = gemm_check(lib)
    if problem is not None:
        return f"{path}: {problem}"

    import mlx.core  # noqa: F401  (binds libmlx; to the preloaded library when preload)

    try:
        slots = _MLXSlots()
    except OSError as e:
        if preload:
            state.route = "preload"
            return None  # cannot read the binding back; trust the dynamic linker
        return f"cannot rebind MLX's BLAS ({e})"
    targets = {name: lib.address(name) for name in slots.addresses}
    if any(owner(v) != state.library for v in slots.current().values() if v):
        slots.bind({k: v for k, v in targets.items() if v})
        state.route = "got"
    else:
        state.route = "preload"
    state.bound = _bound(slots)
    problem = _mlx_check()
    if problem is not None or state.bound.get("cblas_sgemm") != state.library:
        return f"{path}: after binding, {problem or 'MLX still calls ' + str(state.bound.get('cblas_sgemm'))}"
    return None


def _fix_core(state: BlasInfo, lib: _Library) -> None:
    wanted = os.environ.get(CORE_ENV, "auto").strip()
    if wanted.lower() in ("keep", "0", "off") or "OPENBLAS_CORETYPE" in os.environ:
        return
    if wanted.lower() in ("", "auto"):
        if platform.machine() not in ("x86_64", "AMD64"):
            return
        wanted = core_for(cpu_flags()) or ""
        if not wanted or _tier(state.detected_core) >= _tier(wanted):
            return
    if lib.set_core(wanted):
        state.core = lib.corename()


def _warn_slow(state: BlasInfo, mlx_loaded: bool) -> None:
    if not _bundled_reference_blas():
        return  # MLX does not use its reference BLAS here (e.g. another backend): nothing to say
    cause = "mlx.core was imported before mlx_evit and " if mlx_loaded else ""
    warnings.warn(
        f"mlx_evit: {cause}MLX runs its GEMMs on its bundled reference BLAS, ~50x slower "
        f"({state.problem}); fix: {FIX}",
        SlowBLASWarning,
        stacklevel=3,
    )


def _reference_library(slots: "_MLXSlots") -> Optional[str]:
    """The reference BLAS that the mlx-cpu wheel bundles beside libmlx (``mlx_cpu.libs/libblas-*.so*``)."""
    import glob

    here = os.path.dirname(os.path.realpath(slots.path))
    found = sorted(glob.glob(os.path.join(here, "..", "..", "mlx_cpu.libs", "libblas*.so*")))
    return os.path.realpath(found[0]) if found else None


def _restore_reference() -> None:
    try:
        import mlx.core  # noqa: F401

        slots = _MLXSlots()
        path = _reference_library(slots)
        if path is None:
            return
        ref = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        slots.bind({name: ctypes.cast(getattr(ref, name), ctypes.c_void_p).value
                    for name in slots.addresses if hasattr(ref, name)})
    except Exception:
        pass


def _bundled_reference_blas() -> bool:
    try:
        import mlx.core  # noqa: F401

        bound = _bound(_MLXSlots()).get("cblas_sgemm") or ""
    except Exception:
        return False
    return "mlx_cpu.libs" in bound or os.path.basename(bound).startswith("libblas")


def blas_info() -> BlasInfo:
    """What mlx_evit did about MLX's CPU BLAS: the library MLX's GEMMs call (``library``, its symbol
    ``prefix``), how it was bound (``route``), the OpenBLAS core, and the problem if it fell back."""
    return info()
