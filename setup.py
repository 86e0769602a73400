"""sgdpo_fast: package, the Triton kernels (kernels/ -> sgdpo_fast.kernels) and the
native extension sgdpo_fast._C (csrc/, see _extensions()).

Install for development with ``pip install --no-build-isolation -e .`` after
torch is installed (the extension builds against the installed torch).
"""
from setuptools import find_packages, setup

NAME = "sgdpo_fast"


def _extensions():
    """The csrc/ extension(s); filled in by the csrc work.  Empty list = pure Python."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name=NAME,
    version="0.1.0",
    description="Fused, memory-lean DPO / SGDPO / SGPO preference optimization kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["sgdpo_fast", "sgdpo_fast.*"]) + ["sgdpo_fast.kernels"],
    package_dir={"sgdpo_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark"],
        "trl": ["trl>=1.16,<2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["sgdpo-fast=sgdpo_fast.cli:main"]},
)
