// The kernels._C extension module. Importing it runs the static TORCH_LIBRARY registrations of
// every csrc/*.cpp (and csrc/cuda/*.cu where built); Python then calls torch.ops.rlhf_kernels.*.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

bool cuda_built() {
#ifdef RLHF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// How many distinct threads one at::parallel_for over n single-item tasks ran on: the CPU kernels'
// threading, checked by a test (1 would mean the extension lost its OpenMP runtime).
int64_t parallel_threads(int64_t n) {
  std::vector<int> seen(static_cast<size_t>(std::max<int64_t>(at::get_num_threads(), 1)), 0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      volatile double x = 0;  // a little work per item, so one thread cannot take every task at once
      for (int k = 0; k < 200000; ++k) x = x + 1e-9 * k;
    }
    seen[static_cast<size_t>(at::get_thread_num()) % seen.size()] = 1;
  });
  return std::accumulate(seen.begin(), seen.end(), int64_t{0});
}

}  // namespace

TORCH_LIBRARY(rlhf_kernels, m) {
  // Whether the CUDA sources were compiled into this build (kernels.backends() reports it).
  m.def("cuda_built() -> bool", &cuda_built);
  m.def("parallel_threads(int n) -> int", &parallel_threads);
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rlhf_kernels C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
