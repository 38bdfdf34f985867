// Minimal torch extension whose op throws: checks that a C++ error raised inside an extension
// op reaches Python as RuntimeError with the local toolchain (see run.sh).
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor f(const at::Tensor& x) { TORCH_CHECK(x.dim() == 5, "want dim 5, got ", x.dim()); return x; }
TORCH_LIBRARY(exc_check, m) { m.def("f(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(exc_check, CPU, m) { m.impl("f", &f); }
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "exc_check", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_exc_check(void) { return PyModule_Create(&mod); }
