// C++ CPU backend of fastpeft.prefix_attention: softmax attention over [prefix ; main] keys and
// values without ever building the concatenated K/V (contract: fastpeft/ops/prefix_attention.py).
//
// Design: (b) one blocked flash-style loop that reads both key/value sources, chosen over
// (a) two ATen flash passes (at::_scaled_dot_product_flash_attention_for_cpu + its backward, one
// over the prefix, one over the main keys) merged by their log-sum-exp.
//
//   forward : one task per (b, h, query tile); the tile is as tall as a ~512 KB score tile allows
//             (<= 256 rows, >= 4 tasks per thread, rows balanced), so at L = 197 it is the whole
//             head (64-row tiles gave 64+64+64+5 rows: more, smaller GEMMs). Scores against
//             the prefix and against the main keys are written side by side into a per-thread
//             tile (rows × (P+S), L2-resident; never the K/V themselves), masked (additive
//             mask read through its strides, so stride-0 broadcast views cost nothing; causal on
//             the main part only, top-left), soft-maxed once (one max, one sum, lse = max + log
//             sum), and multiplied by pv and v with two GEMMs accumulating into the same rows.
//   backward: one task per (b, kv head) so dk/dv rows have a single writer (grouped-query heads
//             of that kv head run in the task). Per tile: p = exp(s - lse), dv += pᵀ·dO,
//             dP = dO·vᵀ, dS = p ⊙ (dP - rowsum(dO ⊙ out)), dq = dS·k, dk += dSᵀ·q - each split
//             into its prefix and main columns. A shared prefix (Bp = 1) is read with batch
//             stride 0 (never expanded) and its gradient accumulates in per-chunk buffers (one
//             fixed chunk of tasks per thread) that are summed in chunk order at the end
//             (2·nthreads·Hkv·P·D floats): bit-identical results from call to call.
//   GEMMs are the BLAS that libtorch_cpu exports (sgemm_/dgemm_, MKL here), called single-
//   threaded inside at::parallel_for; exp is a vectorised Cephes polynomial. bf16 / fp16 run
//   natively: q/k/v/dout read in place by MKL's mixed-precision GEMMs (gemm_bf16bf16f32 /
//   gemm_f16f16f32: bf16/fp16 operands, fp32 accumulation; blas.h), scores, softmax, lse and
//   all accumulators in fp32, P and dS rounded to the input dtype only as GEMM operands, each
//   output / gradient rounded once. "upcast" (fp32 copies) is a timed alternative only where
//   fastpeft::native_lowp_gemm(dtype) is false (see lowp_candidates). lse is float32 (float64
//   for float64 inputs).
//   Allocations: only the outputs plus the per-thread tiles; nothing of the concatenated size.
//
// Why (b), first measured on this shared 2-core box (load average ~8 from other jobs, so absolute
// times are inflated; ratios come from interleaved runs in one process), fp32, 2 threads,
// B=16 H=12 L=S=197 P=50 D=64, median of 12, relative to cat + SDPA (the floor):
//                          fwd+bwd (Bp=1 / Bp=B)        fwd only (Bp=1 / Bp=B)
//   (a) two ATen passes    1.18× / 1.27× slower          0.77 / 0.83 of the floor
//   (b) this file          0.56  / 0.61 of the floor     0.64 / 0.64 of the floor
// (a) loses in backward: each ATen flash backward zero-fills its own dq/dk/dv and per-thread
// buffers, the two dq partials need an extra add, its grads come out (B,S,H,D)-strided and need
// copies, and the merge is another pass over out - all fresh multi-MB buffers that page-fault
// on this box. (b) touches each output once and keeps its working set in per-thread tiles.
// `python -m fastpeft bench --op prefix --threads 2` (same shape, fwd+bwd, p50): Bp=1 136 ms vs
// cat + SDPA 236 ms (0.58×), Bp=B 350 vs 456 ms (0.77×); peak memory 37 / 42 MB vs 74 MB.
// Re-measured on a quiet box with that harness (--threads 2, p50, ratio to cat + SDPA), A/B
// runs interleaved in one session:       fwd (Bp=1 / Bp=B)       full fwd+bwd (Bp=1 / Bp=B)
//   64-row forward tiles (before)        1.05-1.14 / 1.11-1.12    1.01-1.05 / 1.00-1.05
//   whole-head forward tile (this file)  0.92-0.99 / 0.93-0.98    0.96-0.97 / 0.97-0.98
// (backward unchanged, ~0.96-1.00.) A hybrid - the forward from (a), two ATen flash passes
// merged by lse (shared prefix as a stride-0 batch view), with this backward - was tried and
// dropped: fwd 1.09-1.11 / 1.10, full 1.07 / 1.01. The two ATen passes alone (main 15.4-16.2 ms
// + prefix 5.8-6.3 ms) already exceed cat + SDPA (20.3-20.4 ms): ATen's flash has per-query-
// block costs that a 50-key pass pays again, and the cat it avoids costs only ~1 ms here.
// Limits: the score tile spans all P+S keys (no online softmax over key blocks), so very long S
// costs 2·64·(P+S) floats per thread in backward (forward: at least 16·(P+S)); backward
// parallelises over B·Hkv only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

#include "blas.h"
#include "common.h"
#include "rank_kernels.h"
#include "tune.h"


namespace {

using at::Tensor;

// Row-major BLAS products on raw pointers (csrc/blas.h), single-threaded inside the parallel loop.
using fastpeft::blas::mm_ab;
using fastpeft::blas::mm_abT;
using fastpeft::blas::mm_aTb;

// exp for softmax rows: Cephes-style range reduction + degree-6 polynomial (rel. err ~2e-7),
// written so `#pragma omp simd` vectorises it; exact 0 below -87 (masked = -inf scores).
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double fast_exp(double x) { return std::exp(x); }

// s[j] = exp(s[j] - sub) for j < n; returns the sum.
template <typename T>
inline T exp_sum(T* s, int64_t n, T sub) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(s[j] - sub);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// A (B, heads, rows, D) tensor with unit stride along D, addressed by row.
template <typename T>
struct Rows {
  const T* p;
  int64_t sb, sh, sr;
  const T* at(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sr; }
};
template <typename T>
Rows<T> rows(const Tensor& t) {
  // a shared prefix (size-1 batch) reads batch 0 for every b
  return {t.data_ptr<T>(), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

struct Dims {
  int64_t B, H, Hkv, G, L, S, P, D;
  bool causal;
};

constexpr int64_t kBlockM = 64;  // query rows per tile: the score tile BM×(P+S) stays in L2

// Storage type S (q, k, v, outputs, gradients) and compute type Acc<S> (scores, softmax, lse,
// accumulators): bf16 / fp16 are read in place by the mixed-precision GEMMs of blas.h (fp32
// accumulation), every score and probability is fp32, and the probability / dS tiles are
// rounded to S only as the operand of the next GEMM (as flash attention does in bf16).
template <typename S>
using Acc = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

// n values rounded (or copied) from T to S.
template <typename S, typename T>
inline void store(const T* src, S* dst, int64_t n) {
  if constexpr (std::is_same<S, T>::value) {
    std::copy(src, src + n, dst);
  } else {
    fastpeft::rk::store_rows<S, T, fastpeft::rk::kOuterVB>(src, dst, n);
  }
}

// The GEMM operand view of a compute-type tile: itself when S == T, else rounded into buf.
template <typename S, typename T>
inline const S* operand(const T* src, S* buf, int64_t rows, int64_t cols, int64_t ld) {
  if constexpr (std::is_same<S, T>::value) {
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) store<S, T>(src + r * ld, buf + r * ld, cols);
    return buf;
  }
}

// Scaled, masked scores of query rows [i0, i0+Mq) of head (b, h) against [prefix ; main keys
// 0..Nm) into s (ld = P + S). Returns Nm, the number of main keys the tile can see.
template <typename S, typename M, typename T = Acc<S>>
int64_t scores(const Dims& d, const Rows<S>& q, const Rows<S>& k, const Rows<S>& pk, const M* mask,
               const int64_t* ms, int64_t b, int64_t h, int64_t i0, int64_t Mq, T scale, T* s) {
  const int64_t ld = d.P + d.S, hk = h / d.G;
  const int64_t Nm = d.causal ? std::min(d.S, i0 + Mq) : d.S;
  mm_abT(Mq, d.P, d.D, scale, q.at(b, h, i0), q.sr, pk.at(b, hk, 0), pk.sr, T(0), s, ld);
  mm_abT(Mq, Nm, d.D, scale, q.at(b, h, i0), q.sr, k.at(b, hk, 0), k.sr, T(0), s + d.P, ld);
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < Mq; ++r) {
    const int64_t i = i0 + r;
    T* sm = s + r * ld + d.P;
    const int64_t vis = d.causal ? std::min(Nm, i + 1) : Nm;  // causal: main keys j <= i
    if (mask) {
      const M* mr = mask + b * ms[0] + h * ms[1] + i * ms[2];
      if (ms[3] == 1) {
        for (int64_t j = 0; j < vis; ++j) sm[j] += static_cast<T>(mr[j]);
      } else {
        for (int64_t j = 0; j < vis; ++j) sm[j] += static_cast<T>(mr[j * ms[3]]);
      }
    }
    for (int64_t j = vis; j < Nm; ++j) sm[j] = ninf;
  }
  return Nm;
}

template <typename S, typename M>
void fwd_impl(const Dims& d, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& pk_,
              const Tensor& pv_, const Tensor* mask_t, Acc<S> scale, Tensor& out, Tensor& lse) {
  using T = Acc<S>;
  constexpr bool lowp = !std::is_same<S, T>::value;
  const Rows<S> q = rows<S>(q_), k = rows<S>(k_), v = rows<S>(v_), pk = rows<S>(pk_), pv = rows<S>(pv_);
  const M* mask = mask_t ? mask_t->data_ptr<M>() : nullptr;
  int64_t ms[4] = {0, 0, 0, 0};
  if (mask_t)
    for (int i = 0; i < 4; ++i) ms[i] = mask_t->stride(i);
  const int64_t ld = d.P + d.S, nt = at::get_num_threads();
  // Query tile height: as tall as a ~512 KB score tile allows (fewer, larger GEMMs; at L = 197 one
  // tile per head instead of 64+64+64+5 rows), kept to >= 4 tasks per thread, then balanced.
  const int64_t cap = std::max<int64_t>(16, std::min<int64_t>(256, (512 << 10) / (sizeof(T) * ld)));
  const int64_t want = std::max<int64_t>((d.L + cap - 1) / cap, (4 * nt + d.B * d.H - 1) / (d.B * d.H));
  const int64_t nb0 = std::min<int64_t>(want, d.L);
  const int64_t BM = (d.L + nb0 - 1) / nb0, nblk = (d.L + BM - 1) / BM;
  std::vector<T> scratch(static_cast<size_t>(nt) * BM * (ld + (lowp ? d.D : 0)));
  std::vector<S> pbuf(lowp ? static_cast<size_t>(nt) * BM * ld : 0);  // P rounded to S
  S* o = out.data_ptr<S>();
  T* l = lse.data_ptr<T>();
  fastpeft::parallel_items(d.B * d.H * nblk, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    T* s = scratch.data() + tid * BM * (ld + (lowp ? d.D : 0));
    T* otile = s + BM * ld;  // lowp: the fp32 output tile
    S* pb = lowp ? pbuf.data() + tid * BM * ld : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (d.H * nblk), h = (t / nblk) % d.H, i0 = (t % nblk) * BM;
      const int64_t Mq = std::min(BM, d.L - i0), hk = h / d.G;
      const int64_t Nm = scores<S, M>(d, q, k, pk, mask, ms, b, h, i0, Mq, scale, s);
      const int64_t N = d.P + Nm;
      T* lrow = l + (b * d.H + h) * d.L + i0;
      for (int64_t r = 0; r < Mq; ++r) {
        T* sr = s + r * ld;
        T mx = sr[0];  // prefix scores are always finite, so the row max is too
        for (int64_t j = 1; j < N; ++j) mx = std::max(mx, sr[j]);
        const T sum = exp_sum<T>(sr, N, mx);
        lrow[r] = mx + std::log(sum);
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) sr[j] *= inv;
      }
      S* orow = o + ((b * d.H + h) * d.L + i0) * d.D;
      T* oacc = lowp ? otile : reinterpret_cast<T*>(orow);
      const S* pp = operand<S, T>(s, pb, Mq, N, ld);
      mm_ab(Mq, d.D, d.P, T(1), pp, ld, pv.at(b, hk, 0), pv.sr, T(0), oacc, d.D);
      mm_ab(Mq, d.D, Nm, T(1), pp + d.P, ld, v.at(b, hk, 0), v.sr, T(1), oacc, d.D);
      if constexpr (lowp) store<S, T>(otile, orow, Mq * d.D);
    }
  });
}

template <typename S, typename M>
void bwd_impl(const Dims& d, const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
              const Tensor& pk_, const Tensor& pv_, const Tensor* mask_t, const Tensor& out_, const Tensor& lse_,
              Acc<S> scale, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dpk, Tensor& dpv) {
  using T = Acc<S>;
  constexpr bool lowp = !std::is_same<S, T>::value;
  const Rows<S> q = rows<S>(q_), k = rows<S>(k_), v = rows<S>(v_), pk = rows<S>(pk_), pv = rows<S>(pv_);
  const Rows<S> dout = rows<S>(dout_), out = rows<S>(out_);
  const T* lse = lse_.data_ptr<T>();  // contiguous (B, H, L)
  const M* mask = mask_t ? mask_t->data_ptr<M>() : nullptr;
  int64_t ms[4] = {0, 0, 0, 0};
  if (mask_t)
    for (int i = 0; i < 4; ++i) ms[i] = mask_t->stride(i);
  const bool shared = pk_.size(0) == 1 && d.B > 1;
  const int64_t ld = d.P + d.S, nblk = (d.L + kBlockM - 1) / kBlockM, PD = d.P * d.D, SD = d.S * d.D;
  // The B·Hkv tasks are split into nch fixed contiguous chunks (chunk c = tasks
  // [ntask·c/nch, ntask·(c+1)/nch), run in order by one thread).
  const int64_t ntask = d.B * d.Hkv;
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
  // per chunk: score/probability tile, dP tile, delta; a shared prefix's gradient accumulates per
  // chunk (tasks of different b hit the same prefix rows) and the chunk partials are summed in
  // chunk order after the loop, so the result does not depend on thread scheduling.
  // bf16 / fp16 also keep per chunk: the fp32 dq tile, the task's fp32 dk / dv (and, unshared,
  // prefix) accumulators, rounded to S once at the end of the task, and the S-rounded P / dS tile.
  const int64_t per = 2 * kBlockM * ld + kBlockM + (lowp ? kBlockM * d.D + 2 * SD + 2 * PD : 0);
  std::vector<T> scratch(static_cast<size_t>(nch) * per);
  std::vector<S> pbuf(lowp ? static_cast<size_t>(nch) * kBlockM * ld : 0);
  std::vector<T> pacc(shared ? static_cast<size_t>(nch) * 2 * d.Hkv * PD : 0, T(0));
  S *gq = dq.data_ptr<S>(), *gk = dk.data_ptr<S>(), *gv = dv.data_ptr<S>();
  S *gpk = dpk.data_ptr<S>(), *gpv = dpv.data_ptr<S>();
  // one task per (b, kv head): it owns dk/dv rows and (Bp = B) the prefix rows, so no races
  fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      T* s = scratch.data() + ch * per;
      T* dp = s + kBlockM * ld;
      T* delta = dp + kBlockM * ld;
      T* dqt = delta + kBlockM;  // lowp only: dq tile, then dk, dv, dpk, dpv accumulators
      S* pb = lowp ? pbuf.data() + ch * kBlockM * ld : nullptr;
      for (int64_t t = ntask * ch / nch; t < ntask * (ch + 1) / nch; ++t) {
        const int64_t b = t / d.Hkv, hk = t % d.Hkv;
        T* dk_t = lowp ? dqt + kBlockM * d.D : reinterpret_cast<T*>(gk + t * SD);
        T* dv_t = lowp ? dk_t + SD : reinterpret_cast<T*>(gv + t * SD);
        std::fill(dk_t, dk_t + SD, T(0));
        std::fill(dv_t, dv_t + SD, T(0));
        T *dpk_t, *dpv_t;
        if (shared) {
          dpk_t = pacc.data() + (ch * 2 * d.Hkv + hk) * PD;
          dpv_t = dpk_t + d.Hkv * PD;
        } else {
          dpk_t = lowp ? dv_t + SD : reinterpret_cast<T*>(gpk + t * PD);
          dpv_t = lowp ? dpk_t + PD : reinterpret_cast<T*>(gpv + t * PD);
          std::fill(dpk_t, dpk_t + PD, T(0));
          std::fill(dpv_t, dpv_t + PD, T(0));
        }
        for (int64_t g = 0; g < d.G; ++g) {
          const int64_t h = hk * d.G + g;
          for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t i0 = blk * kBlockM, Mq = std::min(kBlockM, d.L - i0);
            const int64_t Nm = scores<S, M>(d, q, k, pk, mask, ms, b, h, i0, Mq, scale, s);
            const int64_t N = d.P + Nm;
            const T* lrow = lse + (b * d.H + h) * d.L + i0;
            const S* dor = dout.at(b, h, i0);
            for (int64_t r = 0; r < Mq; ++r) {
              exp_sum<T>(s + r * ld, N, lrow[r]);  // p = exp(s - lse): this tile's share of the joint softmax
              const S* o_r = out.at(b, h, i0 + r);
              const S* do_r = dor + r * dout.sr;
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t c = 0; c < d.D; ++c) acc += static_cast<T>(do_r[c]) * static_cast<T>(o_r[c]);
              delta[r] = acc;
            }
            // dV += Pᵀ·dO (both sources)
            const S* pp = operand<S, T>(s, pb, Mq, N, ld);
            mm_aTb(d.P, d.D, Mq, T(1), pp, ld, dor, dout.sr, T(1), dpv_t, d.D);
            mm_aTb(Nm, d.D, Mq, T(1), pp + d.P, ld, dor, dout.sr, T(1), dv_t, d.D);
            // dP = dO·Vᵀ
            mm_abT(Mq, d.P, d.D, T(1), dor, dout.sr, pv.at(b, hk, 0), pv.sr, T(0), dp, ld);
            mm_abT(Mq, Nm, d.D, T(1), dor, dout.sr, v.at(b, hk, 0), v.sr, T(0), dp + d.P, ld);
            // dS = P ⊙ (dP - delta), in place of P
            for (int64_t r = 0; r < Mq; ++r) {
              T* sr = s + r * ld;
              const T* dpr = dp + r * ld;
              const T dl = delta[r];
#pragma omp simd
              for (int64_t j = 0; j < N; ++j) sr[j] = sr[j] * (dpr[j] - dl);
            }
            // dQ = scale·dS·K ; dK += scale·dSᵀ·Q
            const S* ds = operand<S, T>(s, pb, Mq, N, ld);
            S* dqr = gq + ((b * d.H + h) * d.L + i0) * d.D;
            T* dqa = lowp ? dqt : reinterpret_cast<T*>(dqr);
            mm_ab(Mq, d.D, d.P, scale, ds, ld, pk.at(b, hk, 0), pk.sr, T(0), dqa, d.D);
            mm_ab(Mq, d.D, Nm, scale, ds + d.P, ld, k.at(b, hk, 0), k.sr, T(1), dqa, d.D);
            if constexpr (lowp) store<S, T>(dqt, dqr, Mq * d.D);
            mm_aTb(d.P, d.D, Mq, scale, ds, ld, q.at(b, h, i0), q.sr, T(1), dpk_t, d.D);
            mm_aTb(Nm, d.D, Mq, scale, ds + d.P, ld, q.at(b, h, i0), q.sr, T(1), dk_t, d.D);
          }
        }
        if constexpr (lowp) {  // the task's gradients, accumulated in fp32, rounded once
          store<S, T>(dk_t, gk + t * SD, SD);
          store<S, T>(dv_t, gv + t * SD, SD);
          if (!shared) {
            store<S, T>(dpk_t, gpk + t * PD, PD);
            store<S, T>(dpv_t, gpv + t * PD, PD);
          }
        }
      }
    }
  });
  if (shared) {  // sum the per-chunk prefix gradients, in chunk order (in T), then store once
    std::vector<T> sk(static_cast<size_t>(d.Hkv * PD), T(0)), sv(static_cast<size_t>(d.Hkv * PD), T(0));
    for (int64_t t = 0; t < nch; ++t) {
      const T* a = pacc.data() + t * 2 * d.Hkv * PD;
      for (int64_t x = 0; x < d.Hkv * PD; ++x) {
        sk[x] += a[x];
        sv[x] += a[d.Hkv * PD + x];
      }
    }
    store<S, T>(sk.data(), gpk, d.Hkv * PD);
    store<S, T>(sv.data(), gpv, d.Hkv * PD);
  }
}

// Rows are BLAS operands: unit stride along D and a row stride >= D (an expanded, stride-0 row
// axis - e.g. dout of out.sum() - is copied); batch/head strides may be anything, even 0.
// Converted to st first when it is given ("upcast").
Tensor prep(const Tensor& t, at::ScalarType st) {
  Tensor x = t.scalar_type() == st ? t : t.to(st);
  return (x.stride(-1) == 1 && x.stride(-2) >= x.size(-1)) ? x : x.contiguous();
}
c10::optional<Tensor> prep_mask(const c10::optional<Tensor>& m) {
  if (!m.has_value() || !m->defined()) return c10::nullopt;
  return *m;  // read in its own dtype and strides (stride-0 broadcast views are never copied)
}

Dims dims(const Tensor& q, const Tensor& k, const Tensor& pk, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && pk.dim() == 4, "prefix_attention: expected 4-D q, k, prefix_k");
  TORCH_CHECK(q.size(1) >= 1 && k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && q.size(3) >= 1 && pk.size(2) >= 1,
              "prefix_attention: bad shapes q ", q.sizes(), ", k ", k.sizes(), ", prefix_k ", pk.sizes(),
              " (expected H, Hkv, D, P >= 1 and H % Hkv == 0)");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), pk.size(2), q.size(3),
         causal};
  return d;
}

// f(S(), M()) for storage dtype st and mask dtype (fp64 masks with fp64 inputs only).
template <typename F>
void dispatch(at::ScalarType st, const c10::optional<Tensor>& mask, F&& f) {
  const at::ScalarType mt = mask ? mask->scalar_type() : (st == at::kDouble ? at::kDouble : at::kFloat);
  if (st == at::kDouble) {
    TORCH_CHECK(mt == at::kDouble, "prefix_attention: attn_mask must have q's dtype, got ", mt);
    f(double(), double());
    return;
  }
  auto with_mask = [&](auto s) {
    if (mt == at::kFloat) f(s, float());
    else if (mt == at::kHalf) f(s, at::Half());
    else if (mt == at::kBFloat16) f(s, at::BFloat16());
    else TORCH_CHECK(false, "prefix_attention: unsupported attn_mask dtype ", mt);
  };
  if (st == at::kFloat) with_mask(float());
  else if (st == at::kBFloat16) with_mask(at::BFloat16());
  else if (st == at::kHalf) with_mask(at::Half());
  else TORCH_CHECK(false, "prefix_attention: q must be a floating tensor, got ", st);
}

// bf16 / fp16 configurations (tune.h names): "native" runs the kernels above on the bf16 / fp16
// tensors in place (mixed-precision GEMMs, fp32 softmax and accumulators, no copy of q/k/v);
// "upcast" runs them in fp32 on fp32 copies (the pre-native path), a timed candidate only where
// fastpeft::native_lowp_gemm(dtype) is false. fp32 / fp64 have one configuration.
std::vector<std::string> lowp_candidates(at::ScalarType st) {
  if (st != at::kBFloat16 && st != at::kHalf) return {"native"};
  if (fastpeft::native_lowp_gemm(st)) return {"native"};
  return {"native", "upcast"};
}

std::string tune_key(const char* op, const Tensor& q, const Dims& d, const std::vector<std::string>& c) {
  std::string k = std::string(op) + " " + c10::toString(q.scalar_type()) + " B=" + std::to_string(d.B) +
                  " H=" + std::to_string(d.H) + "/" + std::to_string(d.Hkv) + " L~" +
                  std::to_string(fastpeft::row_class(d.L)) + " S~" + std::to_string(fastpeft::row_class(d.S)) +
                  " P=" + std::to_string(d.P) + " D=" + std::to_string(d.D) + (d.causal ? " causal" : "") +
                  " threads=" + std::to_string(at::get_num_threads()) + " [";
  for (size_t i = 0; i < c.size(); ++i) k += (i ? "," : "") + c[i];
  return k + "]";
}

double work_of(const Dims& d) { return 2.0 * d.B * d.H * d.L * (d.P + d.S) * d.D; }

std::tuple<Tensor, Tensor> fwd_run(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& prefix_k,
                                   const Tensor& prefix_v, const c10::optional<Tensor>& mask, bool is_causal,
                                   double scale, at::ScalarType st) {
  const Tensor q = prep(q_, st), k = prep(k_, st), v = prep(v_, st), pk = prep(prefix_k, st),
               pv = prep(prefix_v, st);
  const Dims d = dims(q, k, pk, is_causal);
  Tensor out = at::empty({d.B, d.H, d.L, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.H, d.L}, q.options().dtype(st == at::kDouble ? at::kDouble : at::kFloat));
  if (d.B * d.L == 0) return {out, lse};  // no queries: empty outputs
  dispatch(st, mask, [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    fwd_impl<S, M>(d, q, k, v, pk, pv, mask ? &*mask : nullptr, static_cast<Acc<S>>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> prefix_attention_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                const Tensor& prefix_k, const Tensor& prefix_v,
                                                const c10::optional<Tensor>& attn_mask, bool is_causal,
                                                double scale) {
  const auto st = q_.scalar_type();
  const auto mask = prep_mask(attn_mask);
  const auto cands = lowp_candidates(st);
  auto run = [&](int i) -> std::tuple<Tensor, Tensor> {
    if (cands[i] == "upcast") {
      auto [o, l] = fwd_run(q_, k_, v_, prefix_k, prefix_v, mask, is_causal, scale, at::kFloat);
      return {o.to(st), l};
    }
    return fwd_run(q_, k_, v_, prefix_k, prefix_v, mask, is_causal, scale, st);
  };
  if (st != at::kBFloat16 && st != at::kHalf) return run(0);  // one configuration, nothing to force
  const Dims d = dims(q_, k_, prefix_k, is_causal);
  return run(fastpeft::tuned_choice(tune_key("prefix_attention_fwd", q_, d, cands), cands, work_of(d),
                                    [&](int i) { run(i); }));
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut bwd_run(const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& prefix_k,
               const Tensor& prefix_v, const c10::optional<Tensor>& mask, const Tensor& out_, const Tensor& lse_,
               bool is_causal, double scale, at::ScalarType st) {
  const Tensor q = prep(q_, st), k = prep(k_, st), v = prep(v_, st), pk = prep(prefix_k, st),
               pv = prep(prefix_v, st), dout = prep(dout_, st), out = prep(out_, st);
  const Tensor lse = lse_.to(st == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const Dims d = dims(q, k, pk, is_causal);
  Tensor dq = at::empty({d.B, d.H, d.L, d.D}, q.options());
  Tensor dk = at::empty({d.B, d.Hkv, d.S, d.D}, q.options());
  Tensor dv = at::empty({d.B, d.Hkv, d.S, d.D}, q.options());
  Tensor dpk = at::empty({prefix_k.size(0), d.Hkv, d.P, d.D}, q.options());
  Tensor dpv = at::empty({prefix_k.size(0), d.Hkv, d.P, d.D}, q.options());
  if (d.B * d.L == 0) {  // no queries: nothing reaches the keys, values or prefixes
    for (Tensor* g : {&dk, &dv, &dpk, &dpv}) g->zero_();
  } else {
    dispatch(st, mask, [&](auto s, auto m) {
      using S = decltype(s);
      using M = decltype(m);
      bwd_impl<S, M>(d, dout, q, k, v, pk, pv, mask ? &*mask : nullptr, out, lse, static_cast<Acc<S>>(scale), dq,
                     dk, dv, dpk, dpv);
    });
  }
  return {dq, dk, dv, dpk, dpv};
}

BwdOut prefix_attention_bwd(const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                            const Tensor& prefix_k, const Tensor& prefix_v, const c10::optional<Tensor>& attn_mask,
                            const Tensor& out_, const Tensor& lse_, bool is_causal, double scale) {
  const auto st = q_.scalar_type();
  const auto mask = prep_mask(attn_mask);
  const auto cands = lowp_candidates(st);
  auto run = [&](int i) -> BwdOut {
    if (cands[i] == "upcast") {
      auto [dq, dk, dv, dpk, dpv] =
          bwd_run(dout_, q_, k_, v_, prefix_k, prefix_v, mask, out_, lse_, is_causal, scale, at::kFloat);
      return {dq.to(st), dk.to(st), dv.to(st), dpk.to(st), dpv.to(st)};
    }
    return bwd_run(dout_, q_, k_, v_, prefix_k, prefix_v, mask, out_, lse_, is_causal, scale, st);
  };
  if (st != at::kBFloat16 && st != at::kHalf) return run(0);  // one configuration, nothing to force
  const Dims d = dims(q_, k_, prefix_k, is_causal);
  return run(fastpeft::tuned_choice(tune_key("prefix_attention_bwd", q_, d, cands), cands, 2.0 * work_of(d),
                                    [&](int i) { run(i); }));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor)",
        &prefix_attention_fwd);
  m.def("prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? attn_mask, Tensor out, Tensor lse, bool is_causal, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &prefix_attention_bwd);
}
