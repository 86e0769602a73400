// CPU tile epilogues: OpenMP across tokens (rows); the inner loops over a row are plain
// arithmetic that gcc vectorizes at -O3 (#pragma omp simd).  exp and tanh use the
// branch-free approximations below instead of libm, whose scalar calls would not
// vectorize without -ffast-math (and -ffast-math would break the -inf handling).
#include "../epilogue.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sgdpo {

namespace {

// exp(x) for float, about 2 ulp on [-87, 88]; inputs below -87.3 give ~1e-38 instead of 0
// (harmless: it is added to sums >= 1 or multiplies a gradient).  Cody-Waite range
// reduction x = n ln2 + r, a degree-6 polynomial for exp(r), then 2^n via the exponent bits.
#pragma omp declare simd
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // round to nearest through the 1.5 * 2^23 magic constant (no libm call, vectorizes)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// tanh(y) = sign(y) * (1 - e) / (1 + e) with e = exp(-2|y|): no overflow.  That form loses
// relative precision as |y| -> 0 (1 - e cancels), so below |y| = 0.125 the odd Taylor series
// to y^7 takes over (truncation < 3e-9 relative there).  Relative error ~1e-6 everywhere.
#pragma omp declare simd
inline float fast_tanh(float y) {
  const float ay = y < 0.0f ? -y : y;
  const float e = fast_exp(-2.0f * ay);
  const float t = (1.0f - e) / (1.0f + e);
  const float y2 = ay * ay;
  const float p = ay * (1.0f + y2 * (-1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f))));
  const float r = ay < 0.125f ? p : t;
  return y < 0.0f ? -r : r;
}

// softcapped z for one row into zr (a thread-local buffer).
inline void transform_row(const float* xr, float* zr, int64_t vt, const Transform& tf) {
  const float a = tf.logit_scale / tf.softcap, c = tf.softcap * tf.inv_temp;
#pragma omp simd
  for (int64_t j = 0; j < vt; ++j) zr[j] = fast_tanh(xr[j] * a) * c;
}

}  // namespace

void fold_tile_cpu(const float* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, float* m, float* s, float* tgt, Transform tf) {
  const bool cap = tf.softcap > 0.f;
#pragma omp parallel
  {
    // softcap rows are transformed once into a thread-local buffer; plain rows are read
    // in place with the scale folded into the exponent (two passes, no extra stores)
    float* zr = cap ? new float[vt] : nullptr;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* xr = x + i * ldx;
      const float* row = xr;
      float a = tf.logit_scale * tf.inv_temp;
      if (cap) {
        transform_row(xr, zr, vt, tf);
        row = zr;
        a = 1.f;
      }
      float rmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : rmax)
      for (int64_t j = 0; j < vt; ++j) rmax = row[j] > rmax ? row[j] : rmax;
      const float tmax = a * rmax;  // a > 0
      const float m_new = m[i] > tmax ? m[i] : tmax;
      const int64_t local = targets[i] - v0;
      if (m_new == -std::numeric_limits<float>::infinity()) {
        // every logit so far is -inf (masked vocabulary): nothing to add, and
        // exp(-inf - -inf) would be NaN
        if (local >= 0 && local < vt) tgt[i] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < vt; ++j) acc += fast_exp(row[j] * a - m_new);
      s[i] = s[i] * std::exp(m[i] - m_new) + acc;
      m[i] = m_new;
      if (local >= 0 && local < vt) tgt[i] = row[local] * a;
    }
    delete[] zr;
  }
}

void grad_tile_cpu(float* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, const float* lse, const float* g, Transform tf) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* xr = x + i * ldx;
    const float gi = g[i];
    const float l = lse[i];
    if (gi == 0.f && std::isfinite(l)) {
      // a finite lse means every logit of the row is finite (a NaN or +inf logit makes the
      // row's lse NaN/inf): 0 * (onehot - p) * dz/dx is exactly 0.  Otherwise compute, so a
      // non-finite row gives NaN as the other backends (and IEEE 0 * NaN) do.
      std::fill(xr, xr + vt, 0.f);
      continue;
    }
    const int64_t local = targets[i] - v0;
    const bool has_target = local >= 0 && local < vt;
    float dzdx_target = 0.f;
    if (tf.softcap > 0.f) {
      const float a = tf.logit_scale / tf.softcap, c = tf.softcap * tf.inv_temp;
      const float d = tf.logit_scale * tf.inv_temp;
      if (has_target) {
        const float t = std::tanh(xr[local] * a);
        dzdx_target = (1.f - t * t) * d;
      }
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const float t = fast_tanh(xr[j] * a);
        xr[j] = -gi * fast_exp(t * c - l) * (1.f - t * t) * d;
      }
    } else {
      const float a = tf.logit_scale * tf.inv_temp;
      dzdx_target = a;
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) xr[j] = -gi * fast_exp(xr[j] * a - l) * a;
    }
    if (has_target) xr[local] += gi * dzdx_target;
  }
}

}  // namespace sgdpo
