// Python entry point of fastpeft._C. Every op lives in its own file and registers
// itself under torch.ops.fastpeft_cpu with TORCH_LIBRARY_FRAGMENT, so files are
// independent and this module only has to exist for `import fastpeft._C` to load them.
#include <Python.h>

static struct PyModuleDef fastpeft_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastpeft_c_module); }
