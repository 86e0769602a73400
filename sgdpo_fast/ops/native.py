"""Loader for the compiled extension ``sgdpo_fast._C`` (csrc/).

STUB until csrc lands: reports the extension as missing.
Interface used by the backends:
    cpu_epilogue()  -> object with fold_tile_/grad_tile_ (see epilogue_torch) or None
    cuda_epilogue() -> same for CUDA tiles, or None
    why_missing()   -> str
"""
from __future__ import annotations


def cpu_epilogue():
    return None


def cuda_epilogue():
    return None


def why_missing() -> str:
    return "csrc is not built yet"
