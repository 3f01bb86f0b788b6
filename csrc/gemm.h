// GEMMs of the C++ CPU backend: out = beta·out + alpha·(a·b), written in place.
//
// fp32 goes through oneDNN's matmul primitive (at::native::mkldnn_matmul, which libtorch_cpu
// exports; it writes into `out` through its strides, so `out` may be a row or column slice of a
// bigger tensor, and beta = 1 accumulates with a fused sum post-op). On the AVX-512 machine this
// project is measured on (AMD EPYC), its JIT kernels run about 2x faster than the MKL sgemm
// behind at::mm / nn.Linear, for the same fp32 results (it honours
// torch.set_float32_matmul_precision like at::mm does).
// Everything else uses ATen's addmm: fp64, a torch without oneDNN or without that symbol (looked
// up at run time, so a different torch build degrades instead of failing to load), and
// FASTPEFT_CPU_GEMM=aten (read per call: tests cover both paths in one process).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace fastpeft {

using MkldnnMatmulFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

inline MkldnnMatmulFn mkldnn_matmul_fn() {
  static const MkldnnMatmulFn fn = []() -> MkldnnMatmulFn {
    if (!at::hasMKLDNN()) return nullptr;
    // at::native::mkldnn_matmul(const Tensor&, const Tensor&, const Tensor&, float, float), from the
    // already-loaded libtorch_cpu (Python may have loaded it RTLD_LOCAL, out of RTLD_DEFAULT's reach).
    const char* sym = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";
    void* p = nullptr;
    if (void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) p = dlsym(h, sym);
    if (p == nullptr) p = dlsym(RTLD_DEFAULT, sym);
    return reinterpret_cast<MkldnnMatmulFn>(p);
  }();
  return fn;
}

// Whether gemm() runs a tensor of this dtype through oneDNN.
inline bool onednn_gemm(at::ScalarType st) {
  if (st != at::kFloat || mkldnn_matmul_fn() == nullptr) return false;
  const char* e = std::getenv("FASTPEFT_CPU_GEMM");
  return !(e && std::strcmp(e, "aten") == 0);
}

// out (n, o) = beta·out + alpha·a (n, k) · b (k, o). beta = 0 ignores out's contents (NaN too).
// Called inside a parallel region it runs on the calling thread only.
inline void gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, double beta = 0.0,
                 double alpha = 1.0) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {  // empty reduction: only the beta term is left
    if (beta == 0.0) out.zero_(); else if (beta != 1.0) out.mul_(beta);
    return;
  }
  if (onednn_gemm(out.scalar_type())) {
    mkldnn_matmul_fn()(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
    return;
  }
  at::Tensor o = out;  // addmm_out takes a non-const reference
  at::addmm_out(o, o, a, b, beta, alpha);
}

}  // namespace fastpeft
