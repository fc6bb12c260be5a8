// The Python module `irpe_ops._C`. Loading it registers the operators (static initialisers in
// ops.cpp, cpu/ and cuda/); the module itself only reports how the binary was built.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/output.h"

namespace py = pybind11;

namespace {

// "80-real,86-real,90-virtual" -> ["sm_80", "sm_86", "compute_90"]
py::list cuda_archs() {
  py::list archs;
#ifdef IRPE_HAVE_CUDA
  const std::string spec = IRPE_CUDA_ARCHS;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = spec.find(',', start);
    const std::string item = spec.substr(start, comma == std::string::npos ? std::string::npos
                                                                           : comma - start);
    if (!item.empty()) {
      const size_t dash = item.find('-');
      const std::string code = item.substr(0, dash);
      const std::string kind = dash == std::string::npos ? "" : item.substr(dash + 1);
      // A bare number means both SASS and PTX, as in CMake.
      if (kind.empty() || kind == "real") {
        archs.append("sm_" + code);
      }
      if (kind.empty() || kind == "virtual") {
        archs.append("compute_" + code);
      }
    }
    if (comma == std::string::npos) {
      break;
    }
    start = comma + 1;
  }
#endif
  return archs;
}

py::dict build_info() {
  py::dict info;
  info["version"] = IRPE_OPS_VERSION;
  info["torch_version"] = IRPE_TORCH_VERSION;
#ifdef IRPE_HAVE_CUDA
  info["cuda_version"] = IRPE_CUDA_VERSION;
#else
  info["cuda_version"] = py::none();
#endif
  const std::string torch_cuda = IRPE_TORCH_CUDA_VERSION;
  info["torch_cuda_version"] = torch_cuda == "None" ? py::object(py::none()) : py::str(torch_cuda);
  info["cuda_archs"] = cuda_archs();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled part of irpe_ops: loading it registers the irpe_ops operators.";
  m.def("empty_cache", &irpe_ops::cpu::release_cached_outputs,
        "Frees the cached CPU output blocks; returns the number of bytes released.");
  m.def("cached_bytes", &irpe_ops::cpu::cached_output_bytes,
        "Bytes of released CPU output blocks kept for reuse.");
  m.def("build_info", &build_info,
        "Build information: version, torch_version and torch_cuda_version (the torch built "
        "against), cuda_version (nvcc, or None without CUDA kernels), cuda_archs (e.g. "
        "['sm_80', 'compute_90']).");
}
