// GEMMs of the C++ CPU backend: out = beta·out + alpha·(a·b), written in place, through one of
// two libraries that libtorch_cpu carries:
//
//   Lib::Aten    at::addmm_out: MKL's sgemm in x86 wheels (OpenBLAS / others elsewhere).
//   Lib::OneDnn  oneDNN's matmul primitive (at::native::mkldnn_matmul, exported by libtorch_cpu
//                and looked up at run time, so a torch without it degrades instead of failing to
//                load). It writes into `out` through its strides (a row or column slice of a
//                bigger tensor) and beta = 1 accumulates with a fused sum post-op.
//
// Which one is faster depends on the CPU, not on the code: on an AMD EPYC (AVX-512) oneDNN's JIT
// kernels ran ~2x faster than MKL's sgemm (MKL takes slower code paths on non-Intel CPUs); on an
// Intel Xeon with AMX, MKL was 4-15% faster than oneDNN. So nothing here hard-wires a library:
// the ops time their candidate configurations on the first call of each shape class and keep the
// fastest (tune.h); FASTPEFT_CPU_GEMM=aten|onednn restricts the choice to one library.
//
// oneDNN is only a candidate where it can run: a torch built with it, the symbol found,
// torch.backends.mkldnn enabled (read per call, so `torch.backends.mkldnn.flags(enabled=False)`
// takes effect), and a one-time probe call that succeeded (oneDNN's fp32 matmul in torch refuses
// CPUs without AVX-512 BW/VL/DQ, e.g. AVX2-only x86 or ONEDNN_MAX_CPU_ISA=AVX2, and non-x86).
// onednn_why_not() says why not, for `python -m fastpeft info`.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace fastpeft {

enum class Lib : int { Aten = 0, OneDnn = 1 };

inline const char* lib_name(Lib l) { return l == Lib::OneDnn ? "onednn" : "aten"; }

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

// One small oneDNN call per dtype, once per process: "" if it ran and matched ATen, else why not.
inline const std::string& onednn_probe(at::ScalarType st) {
  static std::mutex mu;
  static std::string result[2];
  static bool done[2] = {false, false};
  const int i = st == at::kFloat ? 0 : 1;
  std::lock_guard<std::mutex> lock(mu);
  if (!done[i]) {
    done[i] = true;
    try {
      at::Tensor a = at::arange(12, at::TensorOptions().dtype(at::kFloat)).reshape({3, 4}).to(st);
      at::Tensor b = at::arange(8, at::TensorOptions().dtype(at::kFloat)).reshape({4, 2}).to(st);
      at::Tensor out = at::zeros({3, 2}, a.options());
      mkldnn_matmul_fn()(a, b, out, 0.0f, 1.0f);
      if (!at::allclose(out.to(at::kFloat), at::mm(a.to(at::kFloat), b.to(at::kFloat))))
        result[i] = "oneDNN's matmul gave a wrong result in the start-up probe";
    } catch (const std::exception& e) {
      std::string msg = e.what();
      const auto nl = msg.find('\n');
      result[i] = "oneDNN's matmul refused this CPU (" + msg.substr(0, nl) + ")";
    }
  }
  return result[i];
}

// "" if gemm(..., Lib::OneDnn) can run tensors of dtype st right now, else the reason.
inline std::string onednn_why_not(at::ScalarType st) {
  if (st != at::kFloat) return std::string("oneDNN GEMMs are used for float32 only, not ") + c10::toString(st);
  if (!at::hasMKLDNN()) return "this torch was built without oneDNN (MKLDNN)";
  if (mkldnn_matmul_fn() == nullptr) return "at::native::mkldnn_matmul is not exported by this torch";
  if (!at::globalContext().userEnabledMkldnn()) return "torch.backends.mkldnn is disabled";
  return onednn_probe(st);
}

inline bool onednn_ok(at::ScalarType st) { return onednn_why_not(st).empty(); }

// Libraries an op may choose from for dtype st: FASTPEFT_CPU_GEMM=aten|onednn (read per call:
// tests cover both in one process) restricts the choice; asking for oneDNN where it cannot run
// is an error, not a silent fallback.
struct LibChoice {
  bool aten, onednn;
};

inline LibChoice allowed_libs(at::ScalarType st) {
  const char* e = std::getenv("FASTPEFT_CPU_GEMM");
  const bool dnn = onednn_ok(st);
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return {true, dnn};
  if (std::strcmp(e, "aten") == 0) return {true, false};
  if (std::strcmp(e, "onednn") == 0) {
    // fp64 (and other dtypes oneDNN is not used for) keep ATen under any setting.
    if (st != at::kFloat) return {true, false};
    TORCH_CHECK(dnn, "FASTPEFT_CPU_GEMM=onednn, but oneDNN cannot run here: ", onednn_why_not(st));
    return {false, true};
  }
  TORCH_CHECK(false, "FASTPEFT_CPU_GEMM: expected 'aten', 'onednn' or 'auto', got '", e, "'");
}

// The libraries allowed for dtype st (allowed_libs), as the list an op times: ATen first (the
// untuned default), then oneDNN.
inline std::vector<Lib> allowed_lib_list(at::ScalarType st) {
  const auto l = allowed_libs(st);
  std::vector<Lib> out;
  if (l.aten) out.push_back(Lib::Aten);
  if (l.onednn) out.push_back(Lib::OneDnn);
  return out;
}

// out (n, o) = beta·out + alpha·a (n, k) · b (k, o). beta = 0 ignores out's contents (NaN too).
// Called inside a parallel region it runs on the calling thread only.
inline void gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, double beta = 0.0,
                 double alpha = 1.0, Lib lib = Lib::Aten) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {  // empty reduction: only the beta term is left
    if (beta == 0.0) out.zero_(); else if (beta != 1.0) out.mul_(beta);
    return;
  }
  if (lib == Lib::OneDnn && out.scalar_type() == at::kFloat) {
    mkldnn_matmul_fn()(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
    return;
  }
  at::Tensor o = out;  // addmm_out takes a non-const reference
  at::addmm_out(o, o, a, b, beta, alpha);
}

// Does this CPU run GEMMs of dtype st natively (faster than fp32)? bf16: AVX512-BF16 or
// AMX-BF16; fp16: AMX-FP16 (AVX512-FP16 alone measured slower than fp32 on an Intel Xeon with
// AMX-BF16). Ops with a bf16 / fp16 path offer "upcast" (fp32 copies, fp32 GEMMs) as a timed
// alternative only where this is false.
inline bool native_lowp_gemm(at::ScalarType st) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [&](const char* k) {
    auto it = caps.find(k);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  if (st == at::kBFloat16) return has("avx512_bf16") || has("amx_bf16");
  if (st == at::kHalf) return has("amx_fp16");
  return false;
}

}  // namespace fastpeft
