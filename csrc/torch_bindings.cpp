// TORCH_LIBRARY registration of the apparate_C ops: schemas and their C++ CPU kernels.
// The CUDA kernels are registered by csrc/torch_bindings_cuda.cpp in the optional extension.

#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

// An importable module, so `import apparate._C` loads the library and runs the registration.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(apparate_C, m) {
  m.def(
      "ramp_exit(Tensor hidden, Tensor weight, Tensor? bias, Tensor threshold, str pool, "
      "str metric, Tensor? mask, Tensor? alive, str? norm, Tensor? norm_weight, float norm_eps, "
      "Tensor(a!)? logits_out) -> (Tensor, Tensor, Tensor)");
  m.def(
      "compact_rows(Tensor x, Tensor keep, Tensor(a!) out, Tensor(b!) index, Tensor(c!) count) "
      "-> ()");
  m.def("compact_rows_(Tensor(a!) x, Tensor keep, Tensor(b!) index, Tensor(c!) count) -> ()");
}

TORCH_LIBRARY_IMPL(apparate_C, CPU, m) {
  m.impl("ramp_exit", &apparate::ramp_exit_cpu);
  m.impl("compact_rows", &apparate::compact_rows_cpu);
  m.impl("compact_rows_", &apparate::compact_rows_inplace_cpu);
}
