// pybind11 module sgdpo_fast._C: the CPU tile epilogues.
//
// Decision (issue 4): the module takes raw data pointers and sizes, not at::Tensor, and
// does not link libtorch.  It builds in seconds with plain pybind11, works with any torch
// version (2.13 CPU here, 2.11 + CUDA 13 on the GPU machine) and keeps the .cu files free
// of torch headers, so nvcc can compile-check them anywhere.  The Python adapter
// (sgdpo_fast/ops/native.py) validates every tensor before handing its pointer over.
#include <pybind11/pybind11.h>

#include "epilogue.h"

namespace py = pybind11;
using sgdpo::Transform;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "sgdpo_fast CPU tile epilogues (raw pointers; see sgdpo_fast/ops/native.py)";
  mod.def(
      "fold_tile",
      [](uintptr_t x, int64_t n, int64_t vt, int64_t ldx, int64_t v0, uintptr_t targets,
         uintptr_t m, uintptr_t s, uintptr_t tgt, float logit_scale, float softcap,
         float inv_temp) {
        py::gil_scoped_release nogil;
        sgdpo::fold_tile_cpu(reinterpret_cast<const float*>(x), n, vt, ldx, v0,
                             reinterpret_cast<const int64_t*>(targets),
                             reinterpret_cast<float*>(m), reinterpret_cast<float*>(s),
                             reinterpret_cast<float*>(tgt),
                             Transform{logit_scale, softcap, inv_temp});
      });
  mod.def(
      "grad_tile",
      [](uintptr_t x, int64_t n, int64_t vt, int64_t ldx, int64_t v0, uintptr_t targets,
         uintptr_t lse, uintptr_t g, float logit_scale, float softcap, float inv_temp) {
        py::gil_scoped_release nogil;
        sgdpo::grad_tile_cpu(reinterpret_cast<float*>(x), n, vt, ldx, v0,
                             reinterpret_cast<const int64_t*>(targets),
                             reinterpret_cast<const float*>(lse),
                             reinterpret_cast<const float*>(g),
                             Transform{logit_scale, softcap, inv_temp});
      });
}
