// Register-blocked micro-kernels for the skinny products of PEFT ops: one operand is
// "rank-wide" (r = LoRA rank, or m = adapter bottleneck), the other a row block of x / dy.
// Shared by csrc/lora_cpu.cpp and csrc/adapter_cpu.cpp.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "blas.h"

namespace fastpeft {
namespace rk {

// Vector registers the kernels may fill with accumulators: AVX-512 has 32 (zmm or ymm), AVX2 16.
#ifdef __AVX512F__
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif
// Rows (rowvec) or columns (acct) per register block for r = NV vectors: RB·NV accumulators
// plus NV loaded vectors, leaving a few registers for addresses and broadcasts.
template <int NV>
constexpr int rank_block() {
  return kRegs == 32 ? (NV == 1 ? 16 : NV == 2 ? 12 : NV == 4 ? 6 : 3) : (NV <= 2 ? 8 : NV <= 4 ? 5 : 2);
}

// Rank-r micro-kernels. BLAS runs the k = r (= 16) GEMMs at ~45% of peak (packing dominates);
// these register-blocked loops (GCC vector extensions, FMA-contracted) make the LoRA path cost
// close to its flops. VB is the vector width in bytes: 64 (one zmm register) where the build has
// AVX-512 and r fills whole 64-byte vectors, else 32 (AVX2 / AVX-512 ymm, or two SSE/NEON
// registers on other CPUs). rowvec/acct need r = NV whole vectors (NV = 1, 2, 4 or 8); other
// ranks use BLAS. outer vectorises over columns and takes any r <= 256.
template <typename T, int VB> struct VecT { typedef T v __attribute__((vector_size(VB))); };
template <typename T, int VB> constexpr int kV = VB / sizeof(T);  // lanes per vector

template <typename T, int VB>
inline typename VecT<T, VB>::v vload(const T* p) {
  typename VecT<T, VB>::v v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int VB>
inline void vstore(T* p, typename VecT<T, VB>::v v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Loads and stores of a vector of compute type T from / to storage type S. bf16 and fp16 are
// storage only: the kernels widen them to fp32 on load and round them (to nearest even, as
// c10's conversions do; NaN stays NaN) on store, so every product and sum runs in fp32.
template <typename S, typename T, int VB>
struct Cvt {  // S == T: plain loads and stores
  using V = typename VecT<T, VB>::v;
  static V load(const S* p) { return vload<T, VB>(p); }
  static void store(S* p, V v) { vstore<T, VB>(p, v); }
};

template <int VB>
struct Cvt<c10::BFloat16, float, VB> {
  using V = typename VecT<float, VB>::v;
  using H = typename VecT<uint16_t, VB / 2>::v;
  using U = typename VecT<uint32_t, VB>::v;
  static V load(const c10::BFloat16* p) {
    H h;
    std::memcpy(&h, p, sizeof(h));
    const U u = __builtin_convertvector(h, U) << 16;  // bf16 is fp32's upper half
    V v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
  static void store(c10::BFloat16* p, V v) {
    U u;
    std::memcpy(&u, &v, sizeof(u));
    U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const U nan = reinterpret_cast<U>(v != v);  // all-ones lanes where v is NaN
    rounded = (rounded & ~nan) | (U{} + 0x7FC0u & nan);
    const H h = __builtin_convertvector(rounded, H);
    std::memcpy(p, &h, sizeof(h));
  }
};

// fp16 through the x86 conversion instructions (F16C, AVX-512), element by element elsewhere.
template <int VB>
struct Cvt<c10::Half, float, VB> {
  using V = typename VecT<float, VB>::v;
  static constexpr int W = VB / 4;
  static V load(const c10::Half* p) {
    V v;
#if defined(__AVX512F__)
    if constexpr (VB == 64) {
      const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      std::memcpy(&v, &f, sizeof(v));
      return v;
    }
#endif
#if defined(__F16C__)
    if constexpr (VB == 32) {
      const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&v, &f, sizeof(v));
      return v;
    }
#endif
    for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
  static void store(c10::Half* p, V v) {
#if defined(__AVX512F__)
    if constexpr (VB == 64) {
      __m512 f;
      std::memcpy(&f, &v, sizeof(f));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
#endif
#if defined(__F16C__)
    if constexpr (VB == 32) {
      __m256 f;
      std::memcpy(&f, &v, sizeof(f));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
#endif
    for (int i = 0; i < W; ++i) p[i] = static_cast<c10::Half>(v[i]);
  }
};

// keep[0:W] (bytes 0 / 1) as a vector of T (0 / 1): one widening instruction pair on x86
// (GCC's generic u8 -> i32 conversion goes element by element).
template <typename T, int VB>
inline typename VecT<T, VB>::v keep_vec(const uint8_t* keep) {
  using V = typename VecT<T, VB>::v;
  constexpr int W = kV<T, VB>;
  V v;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && VB == 64) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep))));
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value && VB == 32) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep))));
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
#endif
  for (int i = 0; i < W; ++i) v[i] = keep[i] ? T(1) : T(0);
  return v;
}

// dst[j] = src[j] · (keep[j] ? scale : 0) (keep != nullptr) or src[j], rounded to S, j < n. A
// multiply, not a select: a dropped NaN / inf gives NaN, as in the reference.
template <typename S, typename T, int VB>
void store_rows(const T* src, S* dst, int64_t n, const uint8_t* keep = nullptr, T scale = T(1)) {
  using V = typename VecT<T, VB>::v;
  constexpr int W = kV<T, VB>;
  int64_t j = 0;
  if (keep == nullptr) {
    for (; j + W <= n; j += W) Cvt<S, T, VB>::store(dst + j, vload<T, VB>(src + j));
    for (; j < n; ++j) dst[j] = static_cast<S>(src[j]);
  } else {
    for (; j + W <= n; j += W) {
      Cvt<S, T, VB>::store(dst + j, vload<T, VB>(src + j) * (keep_vec<T, VB>(keep + j) * scale));
    }
    for (; j < n; ++j) dst[j] = static_cast<S>(src[j] * (keep[j] ? scale : T(0)));
  }
}

// dst[j] += src[j] · (keep[j] ? scale : 0) (keep != nullptr) or += src[j]·scale, j < n, with
// dst read and rounded back in S.
template <typename S, typename T, int VB>
void add_rows(const T* src, S* dst, int64_t n, const uint8_t* keep, T scale) {
  using V = typename VecT<T, VB>::v;
  using IO = Cvt<S, T, VB>;
  constexpr int W = kV<T, VB>;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V f = keep ? keep_vec<T, VB>(keep + j) * scale : V{} + scale;
    IO::store(dst + j, IO::load(dst + j) + vload<T, VB>(src + j) * f);
  }
  for (; j < n; ++j)
    dst[j] = static_cast<S>(static_cast<T>(dst[j]) + src[j] * (keep == nullptr || keep[j] ? scale : T(0)));
}

// dst (rows×cols, contiguous) = src (rows×cols, row stride lds) widened to T.
template <typename T, int VB, typename S>
void widen_rows(const S* src, int64_t lds, int64_t rows, int64_t cols, T* dst) {
  constexpr int W = kV<T, VB>;
  for (int64_t i = 0; i < rows; ++i) {
    const S* s = src + i * lds;
    T* d = dst + i * cols;
    int64_t j = 0;
    for (; j + W <= cols; j += W) vstore<T, VB>(d + j, Cvt<S, T, VB>::load(s + j));
    for (; j < cols; ++j) d[j] = static_cast<T>(s[j]);
  }
}

// C[i, 0:r] = alpha · Σ_l X[i, l] · P[l, 0:r] for i < R.  X (R×L, row stride ldx), P (L×r)
// contiguous, C (R×r, row stride ldc); r = NV vectors. Forward t = xd·Aᵀ (P = Aᵀ), backward
// dt = s·dy·B (P = B).
template <typename T, int VB, int NV, int RB, typename TX>
inline void rowvec_rows(int64_t L, const TX* X, int64_t ldx, const T* P, T alpha, T* C, int64_t ldc) {
  using V = typename VecT<T, VB>::v;
  constexpr int W = kV<T, VB>;
  V acc[RB][NV];
  for (int a = 0; a < RB; ++a)
    for (int q = 0; q < NV; ++q) acc[a][q] = V{};
  for (int64_t l = 0; l < L; ++l) {
    V p[NV];
    for (int q = 0; q < NV; ++q) p[q] = vload<T, VB>(P + l * NV * W + q * W);
    for (int a = 0; a < RB; ++a) {
      const T xs = static_cast<T>(X[a * ldx + l]);
      for (int q = 0; q < NV; ++q) acc[a][q] += p[q] * xs;
    }
  }
  for (int a = 0; a < RB; ++a)
    for (int q = 0; q < NV; ++q) vstore<T, VB>(C + a * ldc + q * W, acc[a][q] * alpha);
}

// X may be stored narrower than T (bf16 / fp16 x or dy read in place).
// Rows per rowvec register block. One vector (NV = 1) would leave room for 16 rows, but 16 row
// pointers do not fit the 16 general registers (spilled to vector registers, reloaded per
// step): 8 rows ran 1.1-1.3x faster on an AMD EPYC (Zen 5), measured per kernel in L2.
template <int NV>
constexpr int rowvec_block() {
  return kRegs == 32 && NV == 1 ? 8 : rank_block<NV>();
}

template <typename T, int VB, int NV, typename TX>
void rowvec(int64_t R, int64_t L, const TX* X, int64_t ldx, const T* P, T alpha, T* C, int64_t ldc) {
  constexpr int RB = rowvec_block<NV>();
  int64_t i = 0;
  for (; i + RB <= R; i += RB) rowvec_rows<T, VB, NV, RB>(L, X + i * ldx, ldx, P, alpha, C + i * ldc, ldc);
  for (; i < R; ++i) rowvec_rows<T, VB, NV, 1>(L, X + i * ldx, ldx, P, alpha, C + i * ldc, ldc);
}

// C[i, 0:W] = bias[0:W] (or 0) + S[i, 0:W] (or 0) + Σ_k Ts[i, k] · Q[k, 0:W] for i < R, with
// Ts = alpha·T. T (R×r, stride ldt), Q (r×Wd, stride ldq), C (R×Wd, stride ldc), S (R×Wd,
// stride lds; a residual, may alias C). LoRA forward y_blk = b + s·t·Bᵀ (Q = Bᵀ), backward
// dx_blk = dt·A (Q = A); adapter y_blk = x_blk + c + h·Wusᵀ. Each output is written exactly once.
template <typename T, int VB, int RB, int CV, typename TO>
inline void outer_tile(int64_t r, const T* Ts, const T* Q, int64_t ldq, const T* bias, TO* C, int64_t ldc,
                       const TO* S, int64_t lds) {
  using V = typename VecT<T, VB>::v;
  using IO = Cvt<TO, T, VB>;
  constexpr int W = kV<T, VB>;
  V acc[RB][CV];
  for (int c = 0; c < CV; ++c) {
    const V b0 = bias ? vload<T, VB>(bias + c * W) : V{};
    for (int a = 0; a < RB; ++a) acc[a][c] = S ? b0 + IO::load(S + a * lds + c * W) : b0;
  }
  for (int64_t k = 0; k < r; ++k) {
    V q[CV];
    for (int c = 0; c < CV; ++c) q[c] = vload<T, VB>(Q + k * ldq + c * W);
    for (int a = 0; a < RB; ++a) {
      const T ts = Ts[a * r + k];
      for (int c = 0; c < CV; ++c) acc[a][c] += q[c] * ts;
    }
  }
  for (int a = 0; a < RB; ++a)
    for (int c = 0; c < CV; ++c) IO::store(C + a * ldc + c * W, acc[a][c]);
}

template <typename T, int VB, int RB, typename TO>
inline void outer_rows(int64_t Wd, int64_t r, const T* Ts, const T* Q, int64_t ldq, const T* bias, TO* C,
                       int64_t ldc, const TO* S, int64_t lds) {
  constexpr int W = kV<T, VB>;
  // RB·CV accumulators + CV loads: 8×2 with 32 vector registers, 4×3 with 16
  constexpr int CV = RB == 1 ? 4 : (kRegs == 32 ? 16 : 12) / RB;
  int64_t j = 0;
  for (; j + CV * W <= Wd; j += CV * W)
    outer_tile<T, VB, RB, CV>(r, Ts, Q + j, ldq, bias ? bias + j : nullptr, C + j, ldc, S ? S + j : nullptr, lds);
  for (; j + W <= Wd; j += W)
    outer_tile<T, VB, RB, 1>(r, Ts, Q + j, ldq, bias ? bias + j : nullptr, C + j, ldc, S ? S + j : nullptr, lds);
  for (; j < Wd; ++j)
    for (int a = 0; a < RB; ++a) {
      T acc = (bias ? bias[j] : T(0)) + (S ? static_cast<T>(S[a * lds + j]) : T(0));
      for (int64_t k = 0; k < r; ++k) acc += Ts[a * r + k] * Q[k * ldq + j];
      C[a * ldc + j] = static_cast<TO>(acc);
    }
}

constexpr int64_t kOuterMaxRank = 256;

// C and S may be stored narrower than T (bf16 / fp16 outputs and residuals, rounded once).
template <typename T, int VB, typename TO>
void outer(int64_t R, int64_t Wd, int64_t r, const T* Tm, int64_t ldt, T alpha, const T* Q, int64_t ldq,
           const T* bias, TO* C, int64_t ldc, const TO* S = nullptr, int64_t lds = 0) {
  // Rows per register block: each tile of Q (r × CV vectors) is reused for RB rows. With 32 vector
  // registers, 8 rows × 2 vectors ran 2.5x faster than 4 × 3 on an AMD EPYC (Zen 5: 115-125 vs
  // 45 GMAC/s per core, any r, in L2); with 16 (AVX2) 4 × 3 is at the FMA peak.
  constexpr int RB = kRegs == 32 ? 8 : 4;
  T ts[RB * kOuterMaxRank];  // alpha·T for RB rows (r <= kOuterMaxRank on this path)
  int64_t i = 0;
  for (; i < R; i += RB) {
    const int rb = static_cast<int>(std::min<int64_t>(RB, R - i));
    for (int a = 0; a < rb; ++a)
      for (int64_t k = 0; k < r; ++k) ts[a * r + k] = alpha * Tm[(i + a) * ldt + k];
    const TO* Si = S ? S + i * lds : nullptr;
    if (rb == RB) outer_rows<T, VB, RB>(Wd, r, ts, Q, ldq, bias, C + i * ldc, ldc, Si, lds);
    else
      for (int a = 0; a < rb; ++a)
        outer_rows<T, VB, 1>(Wd, r, ts + a * r, Q, ldq, bias, C + (i + a) * ldc, ldc, Si ? Si + a * lds : nullptr, lds);
  }
}

// D[w, 0:r] += Σ_i X[i, w] · T[i, 0:r] for w < Wd.  X (R×Wd, stride ldx), T (R×r) contiguous,
// D (Wd×r) contiguous; r = NV vectors. Backward dB += dyᵀ·(s·t) and dAᵀ += drop(x)ᵀ·dt.
template <typename T, int VB, int NV, int WB, typename TX>
inline void acct_cols(int64_t R, const TX* X, int64_t ldx, const T* Tm, T* D) {
  using V = typename VecT<T, VB>::v;
  constexpr int W = kV<T, VB>;
  V acc[WB][NV];
  for (int b = 0; b < WB; ++b)
    for (int q = 0; q < NV; ++q) acc[b][q] = vload<T, VB>(D + b * NV * W + q * W);
  for (int64_t i = 0; i < R; ++i) {
    V tv[NV];
    for (int q = 0; q < NV; ++q) tv[q] = vload<T, VB>(Tm + i * NV * W + q * W);
    for (int b = 0; b < WB; ++b) {
      const T xs = static_cast<T>(X[i * ldx + b]);
      for (int q = 0; q < NV; ++q) acc[b][q] += tv[q] * xs;
    }
  }
  for (int b = 0; b < WB; ++b)
    for (int q = 0; q < NV; ++q) vstore<T, VB>(D + b * NV * W + q * W, acc[b][q]);
}

template <typename T, int VB, int NV, typename TX>
void acct(int64_t R, int64_t Wd, const TX* X, int64_t ldx, const T* Tm, T* D) {
  constexpr int WB = rank_block<NV>();
  constexpr int r = NV * kV<T, VB>;
  int64_t w = 0;
  for (; w + WB <= Wd; w += WB) acct_cols<T, VB, NV, WB>(R, X + w, ldx, Tm, D + w * r);
  for (; w < Wd; ++w) acct_cols<T, VB, NV, 1>(R, X + w, ldx, Tm, D + w * r);
}

// Vector width (bytes) of the micro-kernels for rank r, or 0: use BLAS.
template <typename T>
int rank_vb(int64_t r) {
  auto whole = [r](int64_t lanes) {
    const int64_t nv = r / lanes;
    return r % lanes == 0 && nv >= 1 && nv <= 8 && (nv & (nv - 1)) == 0;
  };
#ifdef __AVX512F__
  if (whole(64 / static_cast<int64_t>(sizeof(T)))) return 64;
#endif
  if (whole(32 / static_cast<int64_t>(sizeof(T)))) return 32;
  return 0;
}

// bf16 / fp16 paths run the micro-kernels in fp32 at a zero-padded rank: the smallest
// rp >= r they take (whole vectors), or 0 (r > 128).
inline int64_t padded_rank(int64_t r) {
  for (int64_t rp : {8, 16, 32, 64, 128})
    if (rp >= r && rank_vb<float>(rp) != 0) return rp;
  return 0;
}

#define FASTPEFT_NV_CASES(T, VBV, R, ...)                                            \
  switch ((R) / kV<T, VBV>) {                                                        \
    case 1: { constexpr int VB = VBV, NV = 1; __VA_ARGS__; } break;                  \
    case 2: { constexpr int VB = VBV, NV = 2; __VA_ARGS__; } break;                  \
    case 4: { constexpr int VB = VBV, NV = 4; __VA_ARGS__; } break;                  \
    default: { constexpr int VB = VBV, NV = 8; __VA_ARGS__; } break;                 \
  }
#ifdef __AVX512F__
#define FASTPEFT_RANK_SWITCH(T, VBSEL, R, ...)                                       \
  if ((VBSEL) == 64) { FASTPEFT_NV_CASES(T, 64, R, __VA_ARGS__) }                    \
  else { FASTPEFT_NV_CASES(T, 32, R, __VA_ARGS__) }
#else
#define FASTPEFT_RANK_SWITCH(T, VBSEL, R, ...) FASTPEFT_NV_CASES(T, 32, R, __VA_ARGS__)
#endif
// outer() works at any vector width; the widest the build has.
#ifdef __AVX512F__
constexpr int kOuterVB = 64;
#else
constexpr int kOuterVB = 32;
#endif

// The same three products through BLAS (any r; on some CPUs faster than the kernels above,
// on others slower: the ops choose by timing). Same operand layouts as their namesakes.
// C (R×r) = alpha·X (R×L)·P (L×r)
template <typename T>
void rowvec_blas(int64_t R, int64_t L, int64_t r, const T* X, int64_t ldx, const T* P, T alpha, T* C, int64_t ldc) {
  blas::mm_ab<T>(R, r, L, alpha, X, ldx, P, r, T(0), C, ldc);
}

// C (R×Wd) = bias + S + alpha·T (R×r)·Q (r×Wd)
template <typename T>
void outer_blas(int64_t R, int64_t Wd, int64_t r, const T* Tm, int64_t ldt, T alpha, const T* Q, int64_t ldq,
                const T* bias, T* C, int64_t ldc, const T* S = nullptr, int64_t lds = 0) {
  if (bias || S) {
    for (int64_t i = 0; i < R; ++i) {
      T* c = C + i * ldc;
      const T* s = S ? S + i * lds : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < Wd; ++j) c[j] = (bias ? bias[j] : T(0)) + (s ? s[j] : T(0));
    }
  }
  blas::mm_ab<T>(R, Wd, r, alpha, Tm, ldt, Q, ldq, (bias || S) ? T(1) : T(0), C, ldc);
}

// D (Wd×r) += X (R×Wd)ᵀ · T (R×r)
template <typename T>
void acct_blas(int64_t R, int64_t Wd, int64_t r, const T* X, int64_t ldx, const T* Tm, T* D) {
  blas::mm_aTb<T>(Wd, r, R, T(1), X, ldx, Tm, r, T(1), D, r);
}

}  // namespace rk
}  // namespace fastpeft
