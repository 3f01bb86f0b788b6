// Row-major GEMMs on raw pointers through the Fortran BLAS that libtorch_cpu exports (sgemm_ /
// dgemm_: MKL in x86 wheels, OpenBLAS elsewhere; LP64). For the small per-block products of
// the fused ops, called inside at::parallel_for where the BLAS runs single-threaded (nested
// parallelism is off): no tensor objects, no dispatcher, ~1 µs a call.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace fastpeft {
namespace blas {

inline void fortran(char ta, char tb, const int* m, const int* n, const int* k, const float* alpha, const float* a,
                    const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(&ta, &tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void fortran(char ta, char tb, const int* m, const int* n, const int* k, const double* alpha,
                    const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                    const int* ldc) {
  dgemm_(&ta, &tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Column-major C (m×n) = alpha·op(A)·op(B) + beta·C; the helpers below express row-major
// products through it. Leading dimensions are clamped to BLAS's minimum (an empty operand's
// stride may be 0), and k = 0 only scales C, exactly.
template <typename T>
inline void colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                     int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == T(0) ? T(0) : beta * c[j * ldc + i];
    return;
  }
  auto clamp = [](int64_t ld, int64_t rows) { return static_cast<int>(ld < rows ? (rows < 1 ? 1 : rows) : ld); };
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LA = clamp(lda, ta == 'N' ? m : k), LB = clamp(ldb, tb == 'N' ? k : n), LC = clamp(ldc, m);
  fortran(ta, tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

// Row-major: C(M×N) = alpha·A(M×K)·B(N×K)ᵀ + beta·C
template <typename T>
inline void mm_abT(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                   T beta, T* c, int64_t ldc) {
  colmajor<T>('T', 'N', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);
}
// Row-major: C(M×N) = alpha·A(M×K)·B(K×N) + beta·C
template <typename T>
inline void mm_ab(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                  T beta, T* c, int64_t ldc) {
  colmajor<T>('N', 'N', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);
}
// Row-major: C(M×N) = alpha·A(K×M)ᵀ·B(K×N) + beta·C
template <typename T>
inline void mm_aTb(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                   T beta, T* c, int64_t ldc) {
  colmajor<T>('N', 'T', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------
// Mixed precision: C (fp32) = alpha·op(A)·op(B) + beta·C with A, B in bf16 / fp16 and fp32
// accumulation, through MKL's gemm_bf16bf16f32_ / gemm_f16f16f32_ (Fortran interface, same
// arguments as sgemm_) where this torch's libtorch_cpu exports them (x86 wheels: AMX /
// AVX512-BF16 kernels where the CPU has them). Looked up at run time, so a torch built on another
// BLAS still loads; there (or with FASTPEFT_LOWP_BLAS=0) the operands are widened into
// thread-local fp32 buffers and sgemm_ runs (lowp_blas_native() says which).
using LowpGemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                            const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                            const int*);

inline LowpGemmFn lowp_gemm_fn(bool half) {
  auto find = [](const char* sym) -> LowpGemmFn {
    void* p = nullptr;
    if (void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) p = dlsym(h, sym);
    if (p == nullptr) p = dlsym(RTLD_DEFAULT, sym);
    return reinterpret_cast<LowpGemmFn>(p);
  };
  static const LowpGemmFn bf = find("gemm_bf16bf16f32_");
  static const LowpGemmFn hf = find("gemm_f16f16f32_");
  // FASTPEFT_LOWP_BLAS=0 takes the widening fallback (read per call: tests cover both paths).
  const char* e = std::getenv("FASTPEFT_LOWP_BLAS");
  if (e != nullptr && e[0] == '0') return nullptr;
  return half ? hf : bf;
}

inline bool lowp_blas_native(bool half) { return lowp_gemm_fn(half) != nullptr; }

// Column-major (rows × cols, leading dimension ld) block of S widened into dst (ld = rows).
template <typename S>
inline void widen_cm(const S* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = static_cast<float>(src[j * ld + i]);
}

template <typename S>
inline void colmajor_lp(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const S* a, int64_t lda,
                        const S* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.0f ? 0.0f : beta * c[j * ldc + i];
    return;
  }
  auto clamp = [](int64_t ld, int64_t rows) { return static_cast<int>(ld < rows ? (rows < 1 ? 1 : rows) : ld); };
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LA = clamp(lda, ta == 'N' ? m : k), LB = clamp(ldb, tb == 'N' ? k : n), LC = clamp(ldc, m);
  if (LowpGemmFn fn = lowp_gemm_fn(std::is_same<S, c10::Half>::value)) {
    fn(&ta, &tb, &M, &N, &K, &alpha, reinterpret_cast<const uint16_t*>(a), &LA,
       reinterpret_cast<const uint16_t*>(b), &LB, &beta, c, &LC);
    return;
  }
  thread_local std::vector<float> wa, wb;
  const int64_t ar = ta == 'N' ? m : k, ac = ta == 'N' ? k : m, br = tb == 'N' ? k : n, bc = tb == 'N' ? n : k;
  widen_cm<S>(a, ar, ac, LA, wa);
  widen_cm<S>(b, br, bc, LB, wb);
  const int WA = static_cast<int>(ar), WB = static_cast<int>(br);
  fortran(ta, tb, &M, &N, &K, &alpha, wa.data(), &WA, wb.data(), &WB, &beta, c, &LC);
}

// Row-major overloads of mm_abT / mm_ab / mm_aTb for bf16 / fp16 operands and an fp32 C.
#define FASTPEFT_LOWP_MM(S)                                                                              \
  inline void mm_abT(int64_t M, int64_t N, int64_t K, float alpha, const S* a, int64_t lda, const S* b,  \
                     int64_t ldb, float beta, float* c, int64_t ldc) {                                   \
    colmajor_lp<S>('T', 'N', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);                              \
  }                                                                                                      \
  inline void mm_ab(int64_t M, int64_t N, int64_t K, float alpha, const S* a, int64_t lda, const S* b,   \
                    int64_t ldb, float beta, float* c, int64_t ldc) {                                    \
    colmajor_lp<S>('N', 'N', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);                              \
  }                                                                                                      \
  inline void mm_aTb(int64_t M, int64_t N, int64_t K, float alpha, const S* a, int64_t lda, const S* b,  \
                     int64_t ldb, float beta, float* c, int64_t ldc) {                                   \
    colmajor_lp<S>('N', 'T', N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);                              \
  }
FASTPEFT_LOWP_MM(c10::BFloat16)
FASTPEFT_LOWP_MM(c10::Half)
#undef FASTPEFT_LOWP_MM

}  // namespace blas
}  // namespace fastpeft
