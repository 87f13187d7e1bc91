"""Builds the CUDA C++ sources of csrc/ with the host compiler into a Python extension that runs every CUDA thread
as a CPU fiber (tests/cuda_sim/include/: simt_cpu.h and stand-ins for the toolkit headers; see simt_cpu.h).

    module = build()              # csrc/bindings.cpp, conv3d_prelu.cu, jaccard.cu + the simulator runtime -> `_cuda`
    module = build(csrc_dir=...)  # another checkout's csrc/ (e.g. a `git worktree`; or $SEG3D_SIMT_CSRC)

The result has the same Python API as seg3d_fast._cuda and works on CPU memory (tensor.data_ptr() of CPU tensors);
tests/cuda_emulator.emulated(extension=module) puts it behind seg3d_fast.backends.cuda.

Objects and the linked module are cached under a directory keyed by a hash of every source and header, the
compiler and the flags (default: $SEG3D_SIMT_CACHE, else <tmp>/seg3d_simt_<uid>); only translation units whose
inputs changed are recompiled, in parallel. Files are written under temporary names and renamed, so concurrent
builds are safe. A failed compile raises BuildError with the compiler's output.

Run as a script to build and print the module path and the time taken: python tests/cuda_sim/build.py [csrc_dir]
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
RUNTIME = INCLUDE / "simt_runtime.cpp"
REPO = HERE.parent.parent
CSRC = REPO / "csrc"
CSRC_SOURCES = ("bindings.cpp", "conv3d_prelu.cu", "jaccard.cu")

CXX = os.environ.get("CXX", "g++")
# -O1 for csrc/: a cold build of 7 s instead of 9.5 s at -O2 (2 cores), and the time that goes into the kernels'
# own code is small next to the simulator's (compiled at -O2, RUNTIME_FLAGS: its mma arithmetic vectorises).
# -fno-strict-aliasing: the kernels pun uint4 / float4 / __half as device code may. -ffp-contract=off: the same
# results on every host. -Dseg3d=seg3d_simt: the C++ types get names of their own, so that pybind11 does not see them
# as the real extension's (both modules register ConvArgs / WgradArgs in pybind11's process-wide type registry).
FLAGS = ("-std=c++20", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
         "-DSEG3D_SIMT_CPU", "-Dseg3d=seg3d_simt", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function")
RUNTIME_FLAGS = ("-O2",)  # the simulator itself (small, built once): its mma loops vectorise
LINK_FLAGS = ("-shared",)
HEADER_SUFFIXES = (".h", ".cuh", ".hpp")

_loaded: dict[str, object] = {}
last_build: dict = {}  # what the latest build() did: path, seconds, compiled (translation units recompiled)


class BuildError(RuntimeError):
    """The simulation build failed; the message carries the command and the compiler's output."""


def _default_cache() -> Path:
    env = os.environ.get("SEG3D_SIMT_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"seg3d_simt_{os.getuid()}"


def _include_flags(csrc_dir: Path) -> list[str]:
    try:
        import pybind11
    except ImportError as e:  # a declared build dependency (pyproject.toml): its absence is an error, not a skip
        raise BuildError(f"pybind11 is needed to build the CUDA simulation: {e}") from e
    paths = sysconfig.get_paths()
    includes = [INCLUDE, csrc_dir, Path(pybind11.get_include()), Path(paths["include"]), Path(paths["platinclude"])]
    flags = []
    for p in dict.fromkeys(str(p) for p in includes):
        flags += ["-I", p]
    return flags


def _compiler_id() -> str:
    try:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"no working C++ compiler {CXX!r}: {e}") from e
    return out.splitlines()[0] if out else CXX


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _compile(src: Path, obj: Path, flags: list[str]) -> None:
    tmp = _atomic_target(obj)
    try:
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        _run([CXX, *flags, *lang, "-c", str(src), "-o", str(tmp)], f"compiling {src}")
        os.replace(tmp, obj)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike, name: str):
    """The extension module at `path`, initialised as `name` (not inserted into sys.modules); once per process."""
    key = os.fspath(path)
    if key not in _loaded:
        loader = importlib.machinery.ExtensionFileLoader(name, key)
        spec = importlib.util.spec_from_file_location(name, key, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _loaded[key] = module
    return _loaded[key]


def build_library(sources, module_name: str, csrc_dir=CSRC, cache_dir=None, extra_flags=(), jobs=None) -> Path:
    """Compiles `sources` (+ the runtime) into the extension `module_name`; returns its path (cached)."""
    start = time.perf_counter()
    csrc_dir = Path(csrc_dir).resolve()
    cache = Path(cache_dir) if cache_dir else _default_cache()
    sources = [Path(s).resolve() for s in sources] + [RUNTIME]
    for s in sources:
        if not s.is_file():
            raise BuildError(f"missing source {s}")
    flags = [*FLAGS, *extra_flags, *_include_flags(csrc_dir)]
    headers = sorted(p for d in (INCLUDE, csrc_dir) for p in d.iterdir() if p.suffix in HEADER_SUFFIXES)
    common = _digest(_compiler_id(), sys.version, " ".join(flags + list(RUNTIME_FLAGS)), *(p.name + "\n" + p.read_text() for p in headers))
    objects, todo = [], []
    for src in sources:
        obj = cache / "obj" / f"{src.stem}-{_digest(common, src.read_bytes())}.o"
        objects.append(obj)
        if not obj.exists():
            todo.append((src, obj))
    if todo:
        workers = jobs or min(len(todo), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(_compile, src, obj, flags + list(RUNTIME_FLAGS if src == RUNTIME else ()))
                      for src, obj in todo]:
                f.result()  # the first failure raises (the others finish first)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    lib = cache / f"{module_name}-{_digest(*(o.name for o in objects), *LINK_FLAGS)}" / f"{module_name}{suffix}"
    if not lib.exists():
        tmp = _atomic_target(lib)
        try:
            _run([CXX, *LINK_FLAGS, *(str(o) for o in objects), "-o", str(tmp)], f"linking {lib.name}")
            os.replace(tmp, lib)
        finally:
            tmp.unlink(missing_ok=True)
    last_build.clear()
    last_build.update(path=lib, seconds=time.perf_counter() - start, compiled=[str(s.name) for s, _ in todo])
    return lib


def build(csrc_dir=None, cache_dir=None, extra_flags=()):
    """csrc/ compiled for the CPU simulation, loaded as the module `_cuda` (seg3d_fast._cuda's API). csrc_dir:
    default $SEG3D_SIMT_CSRC, else this checkout's csrc/."""
    csrc_dir = Path(csrc_dir or os.environ.get("SEG3D_SIMT_CSRC") or CSRC)
    lib = build_library([csrc_dir / s for s in CSRC_SOURCES], "_cuda", csrc_dir, cache_dir, extra_flags)
    return load(lib, "_cuda")


def build_test_module(csrc_dir=None, cache_dir=None):
    """tests/cuda_sim/sim_test.cu (kernels that exercise the simulator's primitives through csrc/common.cuh), loaded
    as the module `_simt_test`."""
    csrc_dir = Path(csrc_dir or os.environ.get("SEG3D_SIMT_CSRC") or CSRC)
    return load(build_library([HERE / "sim_test.cu"], "_simt_test", csrc_dir, cache_dir), "_simt_test")


if __name__ == "__main__":
    module = build(*sys.argv[1:2])
    print(f"{module.__file__}: {last_build['seconds']:.1f} s (compiled: {', '.join(last_build['compiled']) or 'none'})")
