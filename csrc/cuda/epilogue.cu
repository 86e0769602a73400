// CUDA tile epilogues: one thread block per token row, strided (coalesced) loops over the
// tile's vocabulary entries, block reductions through warp shuffles and shared memory.
// 64-bit row offsets (i * ldx).  Tiles fp32 / bf16 / fp16, all arithmetic in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "epilogue_cuda.h"

namespace sgdpo {
namespace {

constexpr int kThreads = 256;  // threads per row (block size)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float transform(float x, const Transform& tf) {
  return tf.softcap > 0.f ? tanhf(x * (tf.logit_scale / tf.softcap)) * (tf.softcap * tf.inv_temp)
                          : x * (tf.logit_scale * tf.inv_temp);
}

__device__ __forceinline__ float transform_grad(float x, const Transform& tf, float* dzdx) {
  if (tf.softcap > 0.f) {
    const float t = tanhf(x * (tf.logit_scale / tf.softcap));
    *dzdx = (1.f - t * t) * (tf.logit_scale * tf.inv_temp);
    return t * (tf.softcap * tf.inv_temp);
  }
  *dzdx = tf.logit_scale * tf.inv_temp;
  return x * *dzdx;
}

template <bool kMax>
__device__ float block_reduce(float v, float* smem) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? smem[lane] : (kMax ? -FLT_MAX : 0.f);
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = kMax ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  v = smem[0];
  __syncthreads();
  return v;
}

// One pass over the row: every thread keeps its own online (max, sum-exp) pair, started at
// -FLT_MAX rather than -inf so that -inf logits (masked vocabulary) add exp(-inf) = 0 instead
// of exp(-inf - -inf) = NaN; the pairs are then combined across the block.
template <typename T>
__global__ void fold_tile_kernel(const T* __restrict__ x, int64_t vt, int64_t ldx, int64_t v0,
                                 const int64_t* __restrict__ targets, float* m, float* s,
                                 float* tgt, Transform tf) {
  __shared__ float smem[kThreads / 32];
  const int64_t i = blockIdx.x;
  const T* xr = x + i * ldx;
  float mt = -FLT_MAX, st = 0.f;
  for (int64_t j = threadIdx.x; j < vt; j += kThreads) {
    const float z = transform(to_f32(xr[j]), tf);
    if (z > mt) {
      st = st * __expf(mt - z) + 1.f;
      mt = z;
    } else {
      st += __expf(z - mt);
    }
  }
  const float mx = block_reduce<true>(mt, smem);
  const float sx = block_reduce<false>(st * __expf(mt - mx), smem);
  if (threadIdx.x == 0) {
    const float m_old = m[i];
    const float m_new = fmaxf(m_old, mx);
    // m_old = -inf on the first tile: exp(-inf) = 0 and s[i] = 0
    s[i] = s[i] * __expf(m_old - m_new) + sx * __expf(mx - m_new);
    m[i] = m_new;
    const int64_t local = targets[i] - v0;
    if (local >= 0 && local < vt) tgt[i] = transform(to_f32(xr[local]), tf);
  }
}

template <typename T>
__global__ void grad_tile_kernel(T* __restrict__ x, int64_t vt, int64_t ldx, int64_t v0,
                                 const int64_t* __restrict__ targets, const float* lse,
                                 const float* g, Transform tf) {
  const int64_t i = blockIdx.x;
  T* xr = x + i * ldx;
  const float gi = g[i], l = lse[i];
  const int64_t local = targets[i] - v0;
  for (int64_t j = threadIdx.x; j < vt; j += kThreads) {
    float dzdx;
    const float z = transform_grad(to_f32(xr[j]), tf, &dzdx);
    const float onehot = (j == local) ? 1.f : 0.f;
    // g = 0 with a finite lse (every logit of the row finite) is exactly 0; a non-finite
    // row computes, giving NaN as IEEE 0 * NaN and the other backends do
    xr[j] = from_f32<T>((gi == 0.f && isfinite(l)) ? 0.f : gi * (onehot - __expf(z - l)) * dzdx);
  }
}

}  // namespace

int fold_tile_cuda(int dtype, const void* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, float* m, float* s, float* tgt, Transform tf,
                   uintptr_t stream) {
  if (n == 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      fold_tile_kernel<float><<<n, kThreads, 0, st>>>(static_cast<const float*>(x), vt, ldx, v0,
                                                      targets, m, s, tgt, tf);
      break;
    case kBFloat16:
      fold_tile_kernel<__nv_bfloat16><<<n, kThreads, 0, st>>>(
          static_cast<const __nv_bfloat16*>(x), vt, ldx, v0, targets, m, s, tgt, tf);
      break;
    case kFloat16:
      fold_tile_kernel<__half><<<n, kThreads, 0, st>>>(static_cast<const __half*>(x), vt, ldx,
                                                       v0, targets, m, s, tgt, tf);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int grad_tile_cuda(int dtype, void* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, const float* lse, const float* g, Transform tf,
                   uintptr_t stream) {
  if (n == 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      grad_tile_kernel<float><<<n, kThreads, 0, st>>>(static_cast<float*>(x), vt, ldx, v0,
                                                      targets, lse, g, tf);
      break;
    case kBFloat16:
      grad_tile_kernel<__nv_bfloat16><<<n, kThreads, 0, st>>>(static_cast<__nv_bfloat16*>(x), vt,
                                                              ldx, v0, targets, lse, g, tf);
      break;
    case kFloat16:
      grad_tile_kernel<__half><<<n, kThreads, 0, st>>>(static_cast<__half*>(x), vt, ldx, v0,
                                                       targets, lse, g, tf);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // namespace sgdpo
