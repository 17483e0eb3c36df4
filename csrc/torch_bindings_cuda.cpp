// CUDA kernels of the apparate_C ops, built into the optional extension apparate._C_cuda. The
// schemas are defined by csrc/torch_bindings.cpp (apparate._C), which must be loaded first.

#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

// An importable module, so `import apparate._C_cuda` loads the library and runs the registration.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY_IMPL(apparate_C, CUDA, m) {
  m.impl("ramp_exit", &apparate::ramp_exit_cuda);
  m.impl("compact_rows", &apparate::compact_rows_cuda);
  m.impl("compact_rows_", &apparate::compact_rows_inplace_cuda);
}
