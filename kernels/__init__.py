"""Triton kernels of sgdpo_fast, installed as ``sgdpo_fast.kernels``.

One kernel concern per file; each launcher documents shapes and dtypes.
Importing this package does not import triton: launchers import it lazily.
"""
