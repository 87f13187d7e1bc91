"""Build of seg3d_fast: a pure-Python package plus, when nvcc is found, the CUDA extension seg3d_fast._cuda
(csrc/, built by CMake; no torch at build time). Metadata lives in pyproject.toml.

SEG3D_FAST_BUILD_CUDA=1 requires the extension (fails loudly when it cannot be built), =0 skips it; unset: build
it when nvcc is found. CMAKE_CUDA_ARCHITECTURES, CMAKE_BUILD_PARALLEL_LEVEL and SEG3D_PTXAS_VERBOSE=1 pass through.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ENV = "SEG3D_FAST_BUILD_CUDA"


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_tool(name):
    """System tool first, then the pip-installed one (cmake / ninja wheels)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        module = __import__(name)
        return os.path.join(module.BIN_DIR if name == "ninja" else module.CMAKE_BIN_DIR, name)
    except (ImportError, AttributeError):
        return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        nvcc = find_nvcc()
        cmake = find_tool("cmake")
        if nvcc is None or cmake is None:
            raise RuntimeError(f"{ENV}=1 but {'nvcc' if nvcc is None else 'cmake'} was not found")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSEG3D_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        if os.environ.get("SEG3D_PTXAS_VERBOSE") == "1":
            args.append("-DSEG3D_PTXAS_VERBOSE=ON")
        ninja = find_tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        log_path = build_dir / "build.log"
        with open(log_path, "w") as log:
            for cmd in (args, [cmake, "--build", str(build_dir), "--parallel", jobs]):
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
                if result.returncode != 0:
                    sys.stderr.write(log_path.read_text())
                    raise RuntimeError(
                        f"building seg3d_fast._cuda failed (log above, also in {log_path}); "
                        f"set {ENV}=0 to install without the CUDA extension")
        print(f"built seg3d_fast._cuda into {out_dir} (log: {log_path})")


def want_cuda():
    flag = os.environ.get(ENV)
    if flag not in (None, "", "0", "1"):
        raise RuntimeError(f"{ENV} must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    found = find_nvcc() is not None
    if flag == "1":
        return True  # build_extension reports what is missing
    if not found:
        print("seg3d_fast: nvcc not found, installing without the CUDA extension", file=sys.stderr)
    return found


setup(
    ext_modules=[CMakeExtension("seg3d_fast._cuda")] if want_cuda() else [],
    cmdclass={"build_ext": CMakeBuild},
)
