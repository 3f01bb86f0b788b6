// What the C++ CPU backend does on this machine, for `python -m fastpeft info` and the bench:
// which GEMM libraries can run each dtype (gemm.h) and which configuration each op chose for
// each shape class it has seen (tune.h).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "blas.h"
#include "brgemm.h"
#include "gemm.h"
#include "tune.h"

namespace {

// One line per dtype: "<dtype>: aten ok; onednn ok|<why not>".
std::vector<std::string> gemm_libs() {
  std::vector<std::string> out;
  for (auto st : {at::kFloat, at::kDouble}) {
    const std::string why = fastpeft::onednn_why_not(st);
    out.push_back(std::string(c10::toString(st)) + ": aten ok; onednn " + (why.empty() ? "ok" : why));
  }
  return out;
}

// Does this CPU run GEMMs of `dtype` natively (gemm.h native_lowp_gemm)? The bf16 / fp16 paths
// of lora, adapter and prefix_attention offer "upcast" (fp32 copies) as a timed alternative only
// where this is false.
bool native_lowp_gemm(at::ScalarType dtype) { return fastpeft::native_lowp_gemm(dtype); }

// Whether MKL's mixed-precision GEMMs (gemm_bf16bf16f32 / gemm_f16f16f32) are exported by this
// torch (blas.h; else prefix_attention's native bf16 / fp16 path widens its tiles for sgemm).
bool lowp_blas(at::ScalarType dtype) { return fastpeft::blas::lowp_blas_native(dtype == at::kHalf); }

// "" if lora's bf16 / fp16 "|brgemm" configuration can run `dtype` here (brgemm.h), else why not.
std::string brgemm_why_not(at::ScalarType dtype) { return fastpeft::brg::why_not(dtype); }

std::vector<std::string> tune_table() { return fastpeft::tune_table(); }

void tune_reset() { fastpeft::tune_reset(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("gemm_libs() -> str[]", &gemm_libs);
  m.def("tune_table() -> str[]", &tune_table);
  m.def("native_lowp_gemm(ScalarType dtype) -> bool", &native_lowp_gemm);
  m.def("lowp_blas(ScalarType dtype) -> bool", &lowp_blas);
  m.def("tune_reset() -> ()", &tune_reset);
  m.def("brgemm_why_not(ScalarType dtype) -> str", &brgemm_why_not);
}
