"""Loader and adapters for the compiled epilogues in csrc/.

``sgdpo_fast._C`` (C++ CPU epilogues) is built by ``pip install -e .`` /
``python setup.py build_ext --inplace``.  ``sgdpo_fast._C_cuda`` (CUDA
epilogues) is built there too when nvcc and a CUDA-enabled torch exist; if it is
missing on a CUDA machine it is JIT-compiled on first use with
``torch.utils.cpp_extension.load`` (ninja + nvcc, no network).

Both modules take raw data pointers (see csrc/bindings.cpp), so the adapters
below check every tensor first.  Without any extension the package runs on the
``torch`` backend and says so once.

Adapters expose ``fold_tile_(x, v0, targets, m, s, tgt, tf)`` and
``grad_tile_(x, v0, targets, lse, g, tf)`` with the semantics of
``backends/epilogue_torch.py``.
"""
from __future__ import annotations

import os
import warnings

import torch

_STATE: dict = {}


def _csrc_dir() -> str:
    """The native sources: ``csrc/`` of a source tree (editable install), else the copy an
    installed wheel ships as ``sgdpo_fast/_csrc``."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(os.path.dirname(pkg), "csrc"), os.path.join(pkg, "_csrc")):
        if os.path.isfile(os.path.join(d, "cuda", "epilogue.cu")):
            return d
    raise ImportError("the native sources (csrc/) are neither in the source tree nor in the "
                      "installed package")
_TILE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check_tile(x, targets, stats, device_type, tile_dtypes):
    if x.dim() != 2 or x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        raise ValueError(f"x must be a 2-D tile with unit column stride and non-overlapping rows, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in tile_dtypes:
        raise ValueError(f"x dtype must be one of {tile_dtypes}, got {x.dtype}")
    n = x.shape[0]
    if targets.dtype != torch.int64 or targets.shape != (n,) or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 tensor of shape ({n},)")
    for name, t in stats.items():
        if t.dtype != torch.float32 or t.shape != (n,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({n},)")
    for name, t in dict(stats, x=x, targets=targets).items():
        if t.device.type != device_type:
            raise ValueError(f"{name} must be on {device_type}, got {t.device}")


def _tf_args(tf):
    return float(tf.logit_scale), float(tf.softcap or 0.0), 1.0 / float(tf.temperature)


class _CpuEpilogue:
    def __init__(self, mod):
        self._m = mod

    def fold_tile_(self, x, v0, targets, m, s, tgt, tf):
        _check_tile(x, targets, dict(m=m, s=s, tgt=tgt), "cpu", (torch.float32,))
        self._m.fold_tile(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), int(v0),
                          targets.data_ptr(), m.data_ptr(), s.data_ptr(), tgt.data_ptr(),
                          *_tf_args(tf))

    def grad_tile_(self, x, v0, targets, lse, g, tf):
        _check_tile(x, targets, dict(lse=lse, g=g), "cpu", (torch.float32,))
        self._m.grad_tile(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), int(v0),
                          targets.data_ptr(), lse.data_ptr(), g.data_ptr(), *_tf_args(tf))


def _same_cuda_device(x, others):
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the tile x is on {x.device}")


class _CudaEpilogue:
    """Launches on PyTorch's current stream of the tile's device (with that device made
    current for the launch), so the kernels order with the cuBLAS tile GEMMs."""

    def __init__(self, mod):
        self._m = mod

    def fold_tile_(self, x, v0, targets, m, s, tgt, tf):
        _check_tile(x, targets, dict(m=m, s=s, tgt=tgt), "cuda", tuple(_TILE_DTYPES))
        _same_cuda_device(x, dict(targets=targets, m=m, s=s, tgt=tgt))
        with torch.cuda.device(x.device):
            self._m.fold_tile(_TILE_DTYPES[x.dtype], x.data_ptr(), x.shape[0], x.shape[1],
                              x.stride(0), int(v0), targets.data_ptr(), m.data_ptr(),
                              s.data_ptr(), tgt.data_ptr(), *_tf_args(tf),
                              torch.cuda.current_stream(x.device).cuda_stream)

    def grad_tile_(self, x, v0, targets, lse, g, tf):
        _check_tile(x, targets, dict(lse=lse, g=g), "cuda", tuple(_TILE_DTYPES))
        _same_cuda_device(x, dict(targets=targets, lse=lse, g=g))
        with torch.cuda.device(x.device):
            self._m.grad_tile(_TILE_DTYPES[x.dtype], x.data_ptr(), x.shape[0], x.shape[1],
                              x.stride(0), int(v0), targets.data_ptr(), lse.data_ptr(),
                              g.data_ptr(), *_tf_args(tf),
                              torch.cuda.current_stream(x.device).cuda_stream)


def cpu_epilogue():
    """The C++ CPU epilogue, or None (with a one-time warning) if ``_C`` is not built."""
    if "cpu" not in _STATE:
        try:
            from .. import _C  # type: ignore[attr-defined]
            _STATE["cpu"] = _CpuEpilogue(_C)
        except ImportError as e:
            _STATE["cpu"] = None
            _STATE["cpu_why"] = f"sgdpo_fast._C is not built ({e}); run `pip install -e .`"
            warnings.warn("sgdpo_fast: C++ extension not available, CPU runs use the torch "
                          "backend: " + _STATE["cpu_why"], RuntimeWarning, stacklevel=3)
    return _STATE["cpu"]


def _jit_cuda():
    """Build _C_cuda from the source tree (ninja + nvcc, cached by torch in
    TORCH_EXTENSIONS_DIR / ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import load
    try:
        import pybind11
        inc = [pybind11.get_include()]
    except ImportError:  # torch's include path carries pybind11's headers too
        inc = []
    csrc = _csrc_dir()
    return load(name="_C_cuda",
                sources=[os.path.join(csrc, "cuda", "bindings.cpp"),
                         os.path.join(csrc, "cuda", "epilogue.cu")],
                extra_include_paths=[csrc] + inc,
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)


def cuda_epilogue():
    """The CUDA epilogue (built, else JIT-compiled once), or None where CUDA is unavailable."""
    if "cuda" not in _STATE:
        _STATE["cuda"] = None
        if not torch.cuda.is_available():
            _STATE["cuda_why"] = "no CUDA device"
        else:
            try:
                from .. import _C_cuda  # type: ignore[attr-defined]
                _STATE["cuda"] = _CudaEpilogue(_C_cuda)
            except ImportError:
                try:
                    _STATE["cuda"] = _CudaEpilogue(_jit_cuda())
                except Exception as e:  # compiler missing or failing: report, fall back
                    _STATE["cuda_why"] = f"CUDA extension neither built nor JIT-compiled: {e}"
                    warnings.warn("sgdpo_fast: " + _STATE["cuda_why"], RuntimeWarning,
                                  stacklevel=3)
    return _STATE["cuda"]


def why_missing() -> str:
    return "; ".join(v for k, v in _STATE.items() if k.endswith("_why")) or "unknown"
