"""Triton helpers for the logit transform (see sgdpo_fast/ops/transform.py).

``z = softcap * tanh(x * logit_scale / softcap) / temperature`` when HAS_SOFTCAP,
else ``z = x * logit_scale / temperature``; ``dz/dx`` alongside.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh via exp, stable for large |x| (tl has no tanh on every backend); (1 - e) cancels
    # as |x| -> 0, so below |x| = 0.125 the odd Taylor series to x^7 (truncation < 3e-9
    # relative there) keeps the relative precision
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    p = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    r = tl.where(a < 0.125, p, t)
    return tl.where(x >= 0, r, -r)


@triton.jit
def transform_logits(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """x fp32 tile -> z fp32 tile."""
    if HAS_SOFTCAP:
        z = _tanh(x * (logit_scale / softcap)) * (softcap * inv_temperature)
    else:
        z = x * (logit_scale * inv_temperature)
    return z


@triton.jit
def transform_logits_with_grad(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """x fp32 tile -> (z, dz/dx) fp32 tiles."""
    if HAS_SOFTCAP:
        t = _tanh(x * (logit_scale / softcap))
        z = t * (softcap * inv_temperature)
        dzdx = (1.0 - t * t) * (logit_scale * inv_temperature)
    else:
        z = x * (logit_scale * inv_temperature)
        dzdx = tl.full(x.shape, 1.0, tl.float32) * (logit_scale * inv_temperature)
    return z, dzdx
