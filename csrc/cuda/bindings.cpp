// pybind11 module sgdpo_fast._C_cuda: the CUDA tile epilogues (raw pointers + stream handle,
// no libtorch; see ../bindings.cpp for the reasoning).  Built by setup.py where nvcc and a
// CUDA-enabled torch exist, or JIT-compiled on first use by sgdpo_fast/ops/native.py.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "epilogue_cuda.h"

namespace py = pybind11;
using sgdpo::Transform;

static void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string(what) + ": CUDA error " + std::to_string(err) + " (" +
                             sgdpo::cuda_error_string(err) + ")");
}

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "sgdpo_fast CUDA tile epilogues (raw pointers; see sgdpo_fast/ops/native.py)";
  mod.def("fold_tile", [](int dtype, uintptr_t x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                          uintptr_t targets, uintptr_t m, uintptr_t s, uintptr_t tgt,
                          float logit_scale, float softcap, float inv_temp, uintptr_t stream) {
    check(sgdpo::fold_tile_cuda(dtype, reinterpret_cast<const void*>(x), n, vt, ldx, v0,
                                reinterpret_cast<const int64_t*>(targets),
                                reinterpret_cast<float*>(m), reinterpret_cast<float*>(s),
                                reinterpret_cast<float*>(tgt),
                                Transform{logit_scale, softcap, inv_temp}, stream),
          "fold_tile");
  });
  mod.def("grad_tile", [](int dtype, uintptr_t x, int64_t n, int64_t vt, int64_t ldx, int64_t v0,
                          uintptr_t targets, uintptr_t lse, uintptr_t g, float logit_scale,
                          float softcap, float inv_temp, uintptr_t stream) {
    check(sgdpo::grad_tile_cuda(dtype, reinterpret_cast<void*>(x), n, vt, ldx, v0,
                                reinterpret_cast<const int64_t*>(targets),
                                reinterpret_cast<const float*>(lse),
                                reinterpret_cast<const float*>(g),
                                Transform{logit_scale, softcap, inv_temp}, stream),
          "grad_tile");
  });
}
