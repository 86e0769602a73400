// Tile epilogues of the fused log-prob op (see sgdpo_fast/ops/backends/epilogue_torch.py
// for the reference semantics).  Raw pointers, no libtorch: the Python adapter in
// sgdpo_fast/ops/native.py checks shapes, dtypes, contiguity and devices.
//
// A tile holds raw logits x[i, j] = h_i . w_{v0+j} (+ b) for n tokens and vt vocabulary
// entries, row-major with leading dimension ldx.  The transform is
//   z = softcap > 0 ? softcap * tanh(x * logit_scale / softcap) * inv_temp
//                   : x * logit_scale * inv_temp
#pragma once
#include <cstdint>

namespace sgdpo {

struct Transform {
  float logit_scale;
  float softcap;   // <= 0 means no softcap
  float inv_temp;
};

// Fold a tile into running max m[n], sum-exp s[n] (relative to m) and target logit tgt[n].
// targets[i] - v0 outside [0, vt) (ignore_index included) leaves tgt[i] untouched.
void fold_tile_cpu(const float* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, float* m, float* s, float* tgt, Transform tf);

// Overwrite a tile with dL/dx = g * (onehot - exp(z - lse)) * dz/dx.
void grad_tile_cpu(float* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, const float* lse, const float* g, Transform tf);

}  // namespace sgdpo
