"""Extension modules and package layout of sgdpo_fast (metadata: pyproject.toml).

``pip install .`` (build isolation: setuptools + pybind11 only, no torch) builds:

* ``sgdpo_fast._C``: the C++ CPU epilogues (csrc/bindings.cpp, csrc/cpu/), a plain pybind11
  module over raw pointers (no torch headers, csrc/README.md says why).
* ``sgdpo_fast._C_cuda``: the CUDA epilogues, where ``nvcc`` is found (``$CUDA_HOME/bin``,
  ``$CUDA_PATH/bin`` or ``PATH``): the ``.cu`` file by nvcc, the binding by the C++
  compiler, linked by nvcc with the static CUDA runtime (no runtime library to find).
  Architectures: ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``) if set, else the
  visible GPUs' (``nvidia-smi``), else sm_90 code plus compute_75 PTX (any newer GPU
  JIT-compiles it).  Without nvcc, or if that build fails (a warning says why), it is
  left out and ``sgdpo_fast/ops/native.py`` JIT-compiles it on first CUDA use, as before.
  The sources ship in the wheel as ``sgdpo_fast/_csrc`` for that.

Environment: ``SGDPO_FAST_NO_EXT=1`` builds no extension (pure Python + Triton),
``SGDPO_FAST_NO_CUDA=1`` skips the CUDA module, ``SGDPO_FAST_PORTABLE=1`` drops
``-march=native`` (for wheels that run on other machines; a plain ``pip install .``
builds where it runs).  Development: ``pip install --no-build-isolation -e .`` or
``python setup.py build_ext --inplace`` (what ``make gpu-check`` does).
"""
import os
import shutil
import subprocess
import sysconfig
import warnings

from setuptools import Extension, find_packages, setup


def _env(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _nvcc():
    if _env("SGDPO_FAST_NO_CUDA"):
        return None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cand = os.path.join(os.environ[var], "bin", "nvcc")
            if os.access(cand, os.X_OK):
                return cand
    return shutil.which("nvcc")


def _cuda_gencode():
    """nvcc -gencode flags: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else sm_90 + PTX."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    if not archs:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            archs = ";".join(sorted({line.strip() for line in out.splitlines() if line.strip()}))
        except Exception:
            archs = ""
    if not archs:
        return ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_75,code=compute_75"]
    flags = []
    for a in filter(None, archs.split(";")):
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _extensions():
    if _env("SGDPO_FAST_NO_EXT"):
        return [], {}
    native = [] if _env("SGDPO_FAST_PORTABLE") else ["-march=native"]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + native
    cpu_src = ["csrc/bindings.cpp", "csrc/cpu/epilogue.cpp"]
    try:  # pyproject.toml's build requirement
        import pybind11
        from pybind11.setup_helpers import Pybind11Extension, build_ext
        pybind_inc = pybind11.get_include()
        exts = [Pybind11Extension("sgdpo_fast._C", cpu_src, include_dirs=["csrc"],
                                  extra_compile_args=cxx, extra_link_args=["-fopenmp"], cxx_std=17)]
    except ImportError:
        # a non-isolated build without pybind11 (e.g. `make gpu-check`'s system python):
        # torch ships pybind11's headers; plain setuptools compiles the module with them
        try:
            import torch
        except ImportError as e:
            raise RuntimeError("building sgdpo_fast's extensions needs pybind11 (`pip install "
                               "pybind11`), or SGDPO_FAST_NO_EXT=1 for a build without them") from e
        from setuptools.command.build_ext import build_ext
        pybind_inc = os.path.join(os.path.dirname(torch.__file__), "include")
        exts = [Extension("sgdpo_fast._C", cpu_src, include_dirs=["csrc", pybind_inc],
                          extra_compile_args=cxx + ["-std=c++17", "-fvisibility=hidden"],
                          extra_link_args=["-fopenmp"], language="c++")]
    nvcc = _nvcc()
    if nvcc:
        exts.append(Extension("sgdpo_fast._C_cuda", ["csrc/cuda/bindings.cpp", "csrc/cuda/epilogue.cu"],
                              include_dirs=["csrc", pybind_inc]))

    class BuildExt(build_ext):
        """pybind11's (or setuptools') build_ext, plus the CUDA module built with nvcc (optional: a failure
        warns and leaves it to the JIT build of sgdpo_fast/ops/native.py)."""

        def build_extension(self, ext):
            if ext.name != "sgdpo_fast._C_cuda":
                return super().build_extension(ext)
            try:
                self._build_cuda(ext)
            except Exception as e:  # noqa: BLE001 - optional module
                warnings.warn(f"sgdpo_fast: the CUDA module was not built ({e}); it is JIT-compiled "
                              f"on first CUDA use instead")

        def _build_cuda(self, ext):
            tmp = os.path.join(self.build_temp, "cuda")
            os.makedirs(tmp, exist_ok=True)
            incs = [f"-I{d}" for d in ext.include_dirs + [sysconfig.get_paths()["include"]]]
            binding = os.path.join(tmp, "bindings.o")
            kernel = os.path.join(tmp, "epilogue.o")
            cxx = (self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None)
                   else "c++")
            self.spawn([cxx, "-c", ext.sources[0], "-o", binding, "-O3", "-std=c++17", "-fPIC",
                        "-fvisibility=hidden"] + incs)
            self.spawn([nvcc, "-c", ext.sources[1], "-o", kernel, "-O3", "-std=c++17",
                        "-Xcompiler", "-fPIC"] + _cuda_gencode() + incs)
            out = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            self.spawn([nvcc, "-shared", "-o", out, binding, kernel, "--cudart=static",
                        "-Xcompiler", "-fPIC"])

    return exts, {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

# the native sources, shipped as package data for the CUDA module's JIT build
CSRC = {"sgdpo_fast._csrc": "csrc", "sgdpo_fast._csrc.cpu": "csrc/cpu",
        "sgdpo_fast._csrc.cuda": "csrc/cuda"}

setup(
    packages=find_packages(include=["sgdpo_fast", "sgdpo_fast.*"]) + ["sgdpo_fast.kernels"] + list(CSRC),
    package_dir={"sgdpo_fast.kernels": "kernels", **CSRC},
    package_data={"sgdpo_fast.data": ["bundled/*.jsonl"],
                  # backend="auto"'s table of measured results (python -m bench.auto_table)
                  "sgdpo_fast.ops.backends": ["auto_table.json"],
                  **{p: ["*.h", "*.cpp", "*.cu", "*.md"] for p in CSRC}},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
