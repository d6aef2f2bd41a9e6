// The kernels._C extension module. Importing it runs the static TORCH_LIBRARY registrations of
// every csrc/*.cpp (and csrc/cuda/*.cu where built); Python then calls torch.ops.rlhf_kernels.*.
#include <Python.h>
#include <torch/library.h>

namespace {

bool cuda_built() {
#ifdef RLHF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(rlhf_kernels, m) {
  // Whether the CUDA sources were compiled into this build (kernels.backends() reports it).
  m.def("cuda_built() -> bool", &cuda_built);
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rlhf_kernels C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
