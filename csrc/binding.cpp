// saep-kernels torch binding: the compiled kernel ops, declared once, with their CPU kernels.
// The CUDA kernels register for the same ops in binding_cuda.cpp (CUDA builds only); both
// are binding.h's templates over the device's launcher.
//
//   torch.ops.saep_C.fused_aggregate_fwd(hidden_states, weight, bias, out, argmax, height,
//       width, num_prefix_tokens, residual, pool) -> ()
//   torch.ops.saep_C.fused_aggregate_bwd(grad_out, hidden_states, weight, argmax,
//       grad_hidden_states, weight_grad_parts, bias_grad_parts, height, width,
//       num_prefix_tokens, residual, pool) -> ()
//   torch.ops.saep_C.fused_aggregate_varlen_fwd / _varlen_bwd: the same for packed images of
//       different grids (an image table instead of height, width, num_prefix_tokens)
//
// These are the kernels behind backend="cpu" / "cuda" of saep::fused_aggregate, which adds
// the argument checks users see, autograd, the fake implementation, the input layout and the
// reduction of the partial sums (saep_kernels/backends/fused.py).
#include <ATen/Parallel.h>
#include <Python.h>

#include <cstring>

#include "binding.h"
#include "cpu/fused_aggregate_cpu.h"

namespace saep {
namespace binding {
namespace {

cpu::ParallelFor aten_parallel_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(begin, end); });
  };
}

struct CpuKernels {
  static void fwd(const FwdParams& p, const at::Device&) {
    cpu::fused_aggregate_fwd(p, aten_parallel_for());
  }
  static void bwd(const BwdParams& p, const at::Device&) {
    cpu::fused_aggregate_bwd(p, aten_parallel_for());
  }
};

}  // namespace
}  // namespace binding
}  // namespace saep

TORCH_LIBRARY(saep_C, m) {
  m.def(
      "fused_aggregate_fwd(Tensor[] hidden_states, Tensor weight, Tensor? bias, Tensor(a!) out, "
      "Tensor(b!)? argmax, int height, int width, int num_prefix_tokens, bool residual, "
      "str pool) -> ()");
  m.def(
      "fused_aggregate_bwd(Tensor grad_out, Tensor[] hidden_states, Tensor weight, "
      "Tensor? argmax, Tensor(a!)[] grad_hidden_states, Tensor(b!)? weight_grad_parts, "
      "Tensor(c!)? bias_grad_parts, int height, int width, int num_prefix_tokens, "
      "bool residual, str pool) -> ()");
  // packed images of different grids (saep_kernels.fused_aggregate_varlen); the image table
  // is a host tensor for every device
  m.def(
      "fused_aggregate_varlen_fwd(Tensor[] hidden_states, Tensor weight, Tensor? bias, "
      "Tensor images, Tensor(a!) out, Tensor(b!)? argmax, bool residual, str pool) -> ()");
  m.def(
      "fused_aggregate_varlen_bwd(Tensor grad_out, Tensor[] hidden_states, Tensor weight, "
      "Tensor? argmax, Tensor images, Tensor(a!)[] grad_hidden_states, "
      "Tensor(b!)? weight_grad_parts, Tensor(c!)? bias_grad_parts, bool residual, "
      "str pool) -> ()");
}

TORCH_LIBRARY_IMPL(saep_C, CPU, m) {
  using Kernels = saep::binding::CpuKernels;
  m.impl("fused_aggregate_fwd", &saep::binding::fused_aggregate_fwd<Kernels>);
  m.impl("fused_aggregate_bwd", &saep::binding::fused_aggregate_bwd<Kernels>);
  m.impl("fused_aggregate_varlen_fwd", &saep::binding::fused_aggregate_varlen_fwd<Kernels>);
  m.impl("fused_aggregate_varlen_bwd", &saep::binding::fused_aggregate_varlen_bwd<Kernels>);
}

namespace {

using saep::cpu::CpuCapability;

// _C.cpu_capabilities() -> tuple of the names compiled here that this CPU runs, best last
PyObject* py_cpu_capabilities(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (int c = 0; c < saep::cpu::kNumCpuCapabilities; ++c) {
    const auto capability = static_cast<CpuCapability>(c);
    if (!saep::cpu::cpu_capability_supported(capability)) continue;
    PyObject* name = PyUnicode_FromString(saep::cpu::cpu_capability_name(capability));
    if (name == nullptr || PyList_Append(names, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  PyObject* tuple = PyList_AsTuple(names);
  Py_DECREF(names);
  return tuple;
}

// _C.cpu_capability() -> the name of the one in use
PyObject* py_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(saep::cpu::cpu_capability_name(saep::cpu::cpu_capability()));
}

// _C.set_cpu_capability(name) -> None; ValueError unless name is one of cpu_capabilities()
PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name != nullptr) {
    for (int c = 0; c < saep::cpu::kNumCpuCapabilities; ++c) {
      const auto capability = static_cast<CpuCapability>(c);
      if (std::strcmp(name, saep::cpu::cpu_capability_name(capability)) == 0 &&
          saep::cpu::set_cpu_capability(capability))
        Py_RETURN_NONE;
    }
  }
  PyErr_Clear();
  PyObject* supported = py_cpu_capabilities(nullptr, nullptr);
  if (supported == nullptr) return nullptr;
  PyErr_Format(PyExc_ValueError,
               "cpu capability must be one of %R (compiled here and run by this CPU), got %R",
               supported, arg);
  Py_DECREF(supported);
  return nullptr;
}

PyMethodDef methods[] = {
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS,
     "The instruction sets the CPU kernels are compiled for that this CPU runs, best last."},
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "The instruction set whose CPU kernels run now."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O,
     "Run the CPU kernels compiled for this instruction set from now on."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import saep_kernels._C` loads this library (running the registrations above) and tells
// which kernels it was built with and how many layers they take.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "saep-kernels compiled kernels (registered as torch.ops.saep_C)",
                               -1, methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "HAS_CPU", 1);
#if defined(SAEP_WITH_CUDA)
  PyModule_AddIntConstant(m, "HAS_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "HAS_CUDA", 0);
#endif
  PyModule_AddIntConstant(m, "MAX_LAYERS", saep::kMaxLayers);
  // every instruction-set name, lowest first (cpu_capabilities: those usable here)
  PyObject* names = PyTuple_New(saep::cpu::kNumCpuCapabilities);
  if (names == nullptr) return nullptr;
  for (int c = 0; c < saep::cpu::kNumCpuCapabilities; ++c)
    PyTuple_SET_ITEM(names, c, PyUnicode_FromString(saep::cpu::cpu_capability_name(
                                   static_cast<saep::cpu::CpuCapability>(c))));
  if (PyModule_AddObject(m, "CPU_CAPABILITY_NAMES", names) != 0) {
    Py_DECREF(names);
    return nullptr;
  }
  return m;
}
