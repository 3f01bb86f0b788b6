// bf16 / fp16 products on oneDNN's brgemm micro-kernels, through ATen's
// at::native::cpublas::brgemm (the kernels ATen's own CPU flash attention uses): AMX tiles on
// CPUs that have them, AVX512-BF16 / VNNI code elsewhere, fp32 accumulation, fp32 C.
//
// Why: the rank-r products of a low-precision LoRA step are thin (one side r = 16), so they are
// bound by reading x / dy once. On fp32 FMA micro-kernels they were compute-bound instead: a
// bf16 frozen GEMM on AMX runs ~8x faster than fp32, and the fp32 rank work (6 products of
// M·r·K) cost more than the frozen GEMMs themselves. One brgemm call per row block (x / dy block
// still in L2) costs ~1 µs; the library chooses the ISA.
//
// B operands are in VNNI pair layout: a (K × N) matrix stored as (ceil(K/2), ld, 2), element
// (k, n) at ((k/2)·ld + n)·2 + k%2, an odd K padded with a zero row (pack_pairs below). K of every
// product must be even (AMX consumes bf16 in pairs; oneDNN's kernel for an odd K faults), so
// callers pad their A operands with a zero column too.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

namespace fastpeft {
namespace brg {

// Bits of S's exponent field (all ones: inf / NaN) and a quiet NaN, for pack_pairs' dropout.
template <typename S> struct Bits;
template <> struct Bits<c10::BFloat16> { static constexpr uint16_t exp = 0x7F80, nan = 0x7FC0; };
template <> struct Bits<c10::Half> { static constexpr uint16_t exp = 0x7C00, nan = 0x7E00; };

// v · (keep ? 1 : 0) on the bits of S, exactly as the multiply rounds: a kept value as it is, a
// dropped finite value as a zero of its sign, a dropped inf / NaN as NaN (0 · inf = NaN, as in
// the reference's x · mask).
template <typename S>
inline uint16_t masked(uint16_t v, bool keep) {
  const uint16_t dropped = (v & Bits<S>::exp) == Bits<S>::exp ? Bits<S>::nan : static_cast<uint16_t>(v & 0x8000u);
  return keep ? v : dropped;
}

// out (rows × cols, row stride ldo) = src (rows × cols, strides s0, s1) ⊙ keep (rows × cols bytes,
// or none), columns cols .. cols_pad-1 zeroed: the row-major A operand of a brgemm.
template <typename S>
void mask_rows(const S* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, int64_t cols_pad,
               const uint8_t* keep, S* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src + i * s0);
    uint16_t* o = reinterpret_cast<uint16_t*>(out + i * ldo);
    const uint8_t* k = keep ? keep + i * cols : nullptr;
    if (s1 == 1 && k) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) o[j] = masked<S>(s[j], k[j]);
    } else if (s1 == 1) {
      std::memcpy(o, s, static_cast<size_t>(cols) * sizeof(uint16_t));
    } else {
      for (int64_t j = 0; j < cols; ++j) o[j] = k ? masked<S>(s[j * s1], k[j]) : s[j * s1];
    }
    for (int64_t j = cols; j < cols_pad; ++j) o[j] = 0;
  }
}

// out = src (K × N, strides s0, s1) ⊙ keep (K × N bytes, or none) in VNNI pair layout with
// leading dimension ldo (>= N): rows 2k and 2k+1 interleaved, an odd K's last pair completed
// with zeros. The B operand of a brgemm.
template <typename S>
void pack_pairs(const S* src, int64_t s0, int64_t s1, int64_t K, int64_t N, const uint8_t* keep, S* out,
                int64_t ldo) {
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src + k * s0);
    const uint16_t* r1 = k + 1 < K ? reinterpret_cast<const uint16_t*>(src + (k + 1) * s0) : nullptr;
    const uint8_t* k0 = keep ? keep + k * N : nullptr;
    const uint8_t* k1 = keep && r1 ? keep + (k + 1) * N : nullptr;
    uint16_t* d = reinterpret_cast<uint16_t*>(out + (k / 2) * ldo * 2);
    if (r1 && s1 == 1 && keep) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = masked<S>(r0[n], k0[n]);
        d[2 * n + 1] = masked<S>(r1[n], k1[n]);
      }
    } else if (r1 && s1 == 1) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = r0[n];
        d[2 * n + 1] = r1[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = k0 ? masked<S>(r0[n * s1], k0[n]) : r0[n * s1];
        d[2 * n + 1] = r1 ? (k1 ? masked<S>(r1[n * s1], k1[n]) : r1[n * s1]) : 0;
      }
    }
  }
}

// C (M × N, row stride ldc) = [C +] A (M × K, row stride lda) · B (K × N, VNNI pairs with leading
// dimension ldb). K even. N is run in slices of 64 columns (one call per slice).
template <typename S>
inline void mm(int64_t M, int64_t N, int64_t K, const S* a, int64_t lda, const S* bv, int64_t ldb, float* c,
               int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.0f);
    return;
  }
  for (int64_t j = 0; j < N; j += 64)
    at::native::cpublas::brgemm(M, std::min<int64_t>(64, N - j), K, lda, ldb, ldc, add, a, bv + j * 2, c + j);
}

// Ends a thread's run of brgemm calls (releases the AMX tile configuration).
inline void release() { at::native::cpublas::brgemm_release(); }

// One small product per dtype, once per process: "" if it ran and matched, else why not.
inline const std::string& probe(at::ScalarType st) {
  static std::mutex mu;
  static std::string result[2];
  static bool done[2] = {false, false};
  const int i = st == at::kBFloat16 ? 0 : 1;
  std::lock_guard<std::mutex> lock(mu);
  if (!done[i]) {
    done[i] = true;
    try {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "brgemm_probe", [&] {
        const int64_t M = 3, K = 6, N = 5;
        at::Tensor a = (at::arange(M * K, at::TensorOptions().dtype(at::kFloat)).reshape({M, K}) - 7).to(st);
        at::Tensor b = (at::arange(K * N, at::TensorOptions().dtype(at::kFloat)).reshape({K, N}) - 11).to(st);
        at::Tensor bv = at::empty({K / 2, N, 2}, a.options());
        pack_pairs<scalar_t>(b.data_ptr<scalar_t>(), N, 1, K, N, nullptr, bv.data_ptr<scalar_t>(), N);
        at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
        mm<scalar_t>(M, N, K, a.data_ptr<scalar_t>(), K, bv.data_ptr<scalar_t>(), N, c.data_ptr<float>(), N, false);
        release();
        if (!at::equal(c, at::mm(a.to(at::kFloat), b.to(at::kFloat))))
          result[i] = "oneDNN's brgemm gave a wrong result in the start-up probe";
      });
    } catch (const std::exception& e) {
      std::string msg = e.what();
      result[i] = "oneDNN's brgemm refused this CPU (" + msg.substr(0, msg.find('\n')) + ")";
    }
  }
  return result[i];
}

// "" if mm() can run dtype st here, else the reason (for `python -m fastpeft info`).
inline std::string why_not(at::ScalarType st) {
  if (st != at::kBFloat16 && st != at::kHalf)
    return std::string("brgemm products are used for bfloat16 / float16 only, not ") + c10::toString(st);
  if (!at::hasMKLDNN()) return "this torch was built without oneDNN (MKLDNN)";
  if (!at::globalContext().userEnabledMkldnn()) return "torch.backends.mkldnn is disabled";
  // could_pack: ATen's test for oneDNN micro-kernels with a VNNI layout for this dtype (AMX or
  // AVX512 bf16 / fp16 instructions); without them brgemm has only a slow reference path.
  if (!at::native::cpublas::could_pack(st))
    return std::string("oneDNN has no brgemm kernels for ") + c10::toString(st) + " on this CPU";
  return probe(st);
}

inline bool ok(at::ScalarType st) { return why_not(st).empty(); }

}  // namespace brg
}  // namespace fastpeft
