// CUDA tile epilogues (host launchers).  Same semantics as the CPU ones in ../epilogue.h;
// tiles may be fp32, bf16 or fp16, statistics are fp32.  Launched on the given stream
// (PyTorch's current stream, passed as an integer handle).
#pragma once
#include <cstdint>

#include "../epilogue.h"

namespace sgdpo {

enum TileDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Returns 0 on success, else a cudaError_t value.
int fold_tile_cuda(int dtype, const void* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, float* m, float* s, float* tgt, Transform tf,
                   uintptr_t stream);

int grad_tile_cuda(int dtype, void* x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                   const int64_t* targets, const float* lse, const float* g, Transform tf,
                   uintptr_t stream);

// cudaGetErrorString for the codes above (the bindings do not include the CUDA runtime).
const char* cuda_error_string(int err);

}  // namespace sgdpo
