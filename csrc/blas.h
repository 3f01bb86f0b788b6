// Row-major GEMMs on raw pointers through the Fortran BLAS that libtorch_cpu exports (sgemm_ /
// dgemm_: MKL in x86 wheels, OpenBLAS elsewhere; LP64). For the small per-block products of
// the fused ops, called inside at::parallel_for where the BLAS runs single-threaded (nested
// parallelism is off): no tensor objects, no dispatcher, ~1 µs a call.
#pragma once
#include <cstdint>

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

}  // namespace blas
}  // namespace fastpeft
