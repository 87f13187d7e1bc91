// Python bindings of seg3d_fast._cuda. No torch C++ API: pointers, sizes and streams come from Python
// (see seg3d_fast/backends/cuda.py), so the extension does not depend on torch's C++ ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>

#include "common.cuh"
#include "launchers.h"

namespace py = pybind11;

namespace seg3d {

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount (no usable CUDA GPU or driver?)");
  if (count == 0) throw std::runtime_error("seg3d_fast._cuda: no CUDA GPU found");
  return count;
}

void use_device(int device) {
  device_count();  // a clear error when there is no GPU, before any other CUDA call
  SEG3D_CHECK(cudaSetDevice(device));
}

namespace {

// A device attribute, queried once per device (attributes do not change while the process runs).
template <cudaDeviceAttr ATTR>
int cached_attribute(int device, const char* what) {
#if defined(SEG3D_SIMT_CPU)  // the simulated card's values may change between tests (SEG3D_SIMT_SMS, ...): not cached
  int simulated = 0;
  check_cuda(cudaDeviceGetAttribute(&simulated, ATTR, device), what);
  return simulated;
#endif
  static std::array<std::atomic<int>, 64> values{};  // 0: not yet queried
  if (device < 0 || device >= static_cast<int>(values.size())) throw std::invalid_argument("device index");
  int value = values[device].load(std::memory_order_relaxed);
  if (value == 0) {
    check_cuda(cudaDeviceGetAttribute(&value, ATTR, device), what);
    values[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

}  // namespace

int multiprocessors(int device) {
  return cached_attribute<cudaDevAttrMultiProcessorCount>(device, "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
}

int max_shared_memory(int device) {
  return cached_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(
      device, "cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)");
}

}  // namespace seg3d

namespace {

template <class Args>
void def_offsets(py::class_<Args>& cls, const char* name, int (Args::*field)[3]) {
  cls.def_property(
      name, [field](const Args& a) { return std::array<int, 3>{(a.*field)[0], (a.*field)[1], (a.*field)[2]}; },
      [field](Args& a, const std::array<int, 3>& v) {
        for (int i = 0; i < 3; ++i) (a.*field)[i] = v[i];
      });
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  using namespace seg3d;
  m.doc() = "seg3d_fast CUDA kernels (conv3d + bias + PReLU + residual, Jaccard sums); see csrc/launchers.h";
  m.attr("MAX_CLASSES") = kMaxClasses;
  // The Python layer's contract with this module (argument structs, functions, their meaning): bump it with
  // INTERFACE_REVISION in seg3d_fast/backends/cuda.py at any change, so that a module built from another version of
  // the package (a stale build, another checkout's) is reported unusable rather than called with the wrong layout.
  m.attr("INTERFACE_REVISION") = 1;

  py::class_<ConvArgs> conv(m, "ConvArgs");
  conv.def(py::init<>())
      .def_readwrite("input", &ConvArgs::in)
      .def_readwrite("weight", &ConvArgs::weight)
      .def_readwrite("out", &ConvArgs::out)
      .def_readwrite("bias", &ConvArgs::bias)
      .def_readwrite("alpha", &ConvArgs::alpha)
      .def_readwrite("residual", &ConvArgs::residual)
      .def_readwrite("act", &ConvArgs::act)
      .def_readwrite("N", &ConvArgs::N)
      .def_readwrite("ID", &ConvArgs::ID)
      .def_readwrite("IH", &ConvArgs::IH)
      .def_readwrite("IW", &ConvArgs::IW)
      .def_readwrite("C", &ConvArgs::C)
      .def_readwrite("QD", &ConvArgs::QD)
      .def_readwrite("QH", &ConvArgs::QH)
      .def_readwrite("QW", &ConvArgs::QW)
      .def_readwrite("OD", &ConvArgs::OD)
      .def_readwrite("OH", &ConvArgs::OH)
      .def_readwrite("OW", &ConvArgs::OW)
      .def_readwrite("Cout", &ConvArgs::Cout)
      .def_readwrite("in_stride", &ConvArgs::in_stride)
      .def_readwrite("out_stride", &ConvArgs::out_stride)
      .def_readwrite("out_off_d", &ConvArgs::out_off_d)
      .def_readwrite("out_off_h", &ConvArgs::out_off_h)
      .def_readwrite("out_off_w", &ConvArgs::out_off_w)
      .def_readwrite("ntap_d", &ConvArgs::ntap_d)
      .def_readwrite("ntap_h", &ConvArgs::ntap_h)
      .def_readwrite("ntap_w", &ConvArgs::ntap_w)
      .def_readwrite("alpha_mode", &ConvArgs::alpha_mode)
      .def_readwrite("residual_first", &ConvArgs::residual_first)
      .def_readwrite("vec", &ConvArgs::vec)
      .def_readwrite("kernels", &ConvArgs::kernels);
  def_offsets(conv, "toff_d", &ConvArgs::toff_d);
  def_offsets(conv, "toff_h", &ConvArgs::toff_h);
  def_offsets(conv, "toff_w", &ConvArgs::toff_w);

  py::class_<WgradArgs>(m, "WgradArgs")
      .def(py::init<>())
      .def_readwrite("dz", &WgradArgs::dz)
      .def_readwrite("input", &WgradArgs::in)
      .def_readwrite("partial", &WgradArgs::partial)
      .def_readwrite("grad_weight", &WgradArgs::grad_weight)
      .def_readwrite("N", &WgradArgs::N)
      .def_readwrite("ID", &WgradArgs::ID)
      .def_readwrite("IH", &WgradArgs::IH)
      .def_readwrite("IW", &WgradArgs::IW)
      .def_readwrite("C", &WgradArgs::C)
      .def_readwrite("OD", &WgradArgs::OD)
      .def_readwrite("OH", &WgradArgs::OH)
      .def_readwrite("OW", &WgradArgs::OW)
      .def_readwrite("Cout", &WgradArgs::Cout)
      .def_readwrite("stride", &WgradArgs::stride)
      .def_readwrite("ksize", &WgradArgs::ksize)
      .def_readwrite("splits", &WgradArgs::splits)
      .def_readwrite("voxels_per_split", &WgradArgs::voxels_per_split)
      .def_readwrite("vec_dz", &WgradArgs::vec_dz)
      .def_readwrite("vec_in", &WgradArgs::vec_in)
      .def_readwrite("kernels", &WgradArgs::kernels);

  m.def("device_count", &device_count, "Number of CUDA GPUs; raises RuntimeError with the CUDA error when none");
  m.def("conv_gemm", &conv_gemm, py::arg("args"), py::arg("dtype"), py::arg("tf32"), py::arg("device"),
        py::arg("stream"), "Forward / dgrad implicit-GEMM conv with the fused epilogue (see ConvArgs)");
  m.def("conv_wgrad", &conv_wgrad, py::arg("args"), py::arg("dtype"), py::arg("tf32"), py::arg("device"),
        py::arg("stream"), "Weight gradient: split-voxel fp32 partials + fixed-order reduction");
  m.def("prelu_backward", &prelu_backward, py::arg("grad_out"), py::arg("saved"), py::arg("alpha"), py::arg("dz"),
        py::arg("grad_bias"), py::arg("grad_alpha"), py::arg("partial"), py::arg("rows"), py::arg("C"),
        py::arg("saved_kind"), py::arg("alpha_mode"), py::arg("row_blocks"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("jaccard_blocks", &jaccard_blocks, py::arg("S"));
  m.def("jaccard_sums", &jaccard_sums, py::arg("logits"), py::arg("target"), py::arg("partial"), py::arg("sums"),
        py::arg("N"), py::arg("C"), py::arg("S"), py::arg("label_type"), py::arg("squared"), py::arg("sigmoid"),
        py::arg("has_ignore"), py::arg("ignore_index"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("jaccard_backward", &jaccard_backward, py::arg("grad_sums"), py::arg("logits"), py::arg("target"),
        py::arg("grad_logits"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("label_type"), py::arg("squared"),
        py::arg("sigmoid"), py::arg("has_ignore"), py::arg("ignore_index"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("jaccard_loss", &jaccard_loss, py::arg("logits"), py::arg("target"), py::arg("weights"), py::arg("partial"),
        py::arg("range_partial"), py::arg("sums"), py::arg("loss"), py::arg("label_range"), py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("label_type"), py::arg("squared"), py::arg("sigmoid"), py::arg("has_ignore"),
        py::arg("ignore_index"), py::arg("smooth"), py::arg("per_sample"), py::arg("mean"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("jaccard_loss_backward", &jaccard_loss_backward, py::arg("grad_loss"), py::arg("sums"), py::arg("weights"),
        py::arg("logits"), py::arg("target"), py::arg("grad_logits"), py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("label_type"), py::arg("squared"), py::arg("sigmoid"), py::arg("has_ignore"), py::arg("ignore_index"),
        py::arg("smooth"), py::arg("per_sample"), py::arg("mean"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
}
