// Fused DoRA linear for CPU tensors (family "dora"; contract and PEFT's conventions in
// fastpeft/ops/dora.py):
//
//   norm = ‖W + s·B·A‖ per row (detached), g = m / norm                       (N,)
//   no dropout  y = g⊙(x·Wᵀ + s·t·Bᵀ) + b = x·(g⊙W)ᵀ + b + s·t·(g⊙B)ᵀ,     t = x·Aᵀ
//   dropout     y = x·Wᵀ + b + (g-1)⊙v + s·t·(g⊙B)ᵀ,  v = xd·Wᵀ,  t = xd·Aᵀ,  xd = drop(x)
//
// The norm never forms the N×K matrix W + s·B·A: ‖W_n‖² comes in (cached per weight version by
// the caller), the cross and low-rank terms from W·Aᵀ (N×r) and A·Aᵀ (r×r): O(N·K·r) work.
//
// Without dropout, DoRA IS a LoRA linear with the rows of W and B scaled by g, forward and
// backward (dx = (dy⊙g)·W + dt·A = dy·(g⊙W) + dt·A, dt = s·dy·(g⊙B), dB = g⊙(s·dyᵀ·t)): so
// both directions call the fused LoRA kernels (csrc/lora_cpu.cpp, through the dispatcher) on
// g⊙W / g⊙B, and the frozen GEMM's output is never re-read or rescaled. The magnitude gradient
// needs u = x·Wᵀ + s·t·Bᵀ = (y - b)/g: Σ_rows dy⊙u / norm = Σ_rows dy⊙(y - b) / m, one parallel
// pass over dy and the saved output y (rows with m = 0 recompute their column of u).
//
// With dropout (PEFT sends the dropped input through W as well: four base-size GEMMs per step),
// one parallel pass over row blocks (>= 256 rows, the block count a multiple of the thread count):
//   forward   xd_blk = drop(x_blk) (hash regenerated into per-thread scratch), t_blk = xd·Aᵀ,
//             v_blk = xd·Wᵀ, y_blk = x_blk·Wᵀ, then y_blk += b + (g-1)⊙v_blk + s·t_blk·(g⊙B)ᵀ
//             while the block is in cache.
//   backward  dt_blk = s·dy_blk·(g⊙B), partials of dyᵀ·t, dtᵀ·xd and colsum(dy⊙v);
//             dx_blk = dy·W + (mask/(1-p))⊙((dy⊙(g-1))·W + dt·A).
// v (M×N) is kept for the magnitude gradient; nothing else M×N, no M×K mask or dropped copy of
// x. The per-chunk partials are summed in chunk order: deterministic for a fixed thread count.
// The big GEMMs run on ATen (MKL) or oneDNN, chosen per shape class by timing (tune.h).
// fp32/fp64 compute natively; fp16/bf16 are upcast to fp32 and the results cast back.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "blas.h"
#include "common.h"
#include "gemm.h"
#include "rank_kernels.h"
#include "tune.h"

namespace {

using at::Tensor;
using namespace fastpeft::rk;

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }
Tensor f32(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
std::optional<Tensor> opt_f32(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) return t->to(at::kFloat);
  return t;
}
bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

uint32_t dropout_threshold(double p) {  // Python's int(round(p * 2**32)), capped at 2**32 - 1
  const double v = std::nearbyint(p * 4294967296.0);
  return v >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(v);
}

uint32_t seed_value(const std::optional<Tensor>& seed) {
  TORCH_CHECK(has(seed), "dora: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1, "dora: seed must be a single-element tensor, got ", seed->sizes());
  return static_cast<uint32_t>(seed->item<int64_t>());
}

// The fused LoRA kernels (csrc/lora_cpu.cpp), called through the dispatcher.
std::tuple<Tensor, Tensor> lora_fwd_op(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                       const Tensor& A, const Tensor& B, double s) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft_cpu::lora_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                         const Tensor&, const Tensor&, double, double,
                                                         const std::optional<Tensor>&)>();
  return op.call(x, w, b, A, B, s, 0.0, std::nullopt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_bwd_op(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                               const Tensor& A, const Tensor& B, const Tensor& t,
                                                               double s, bool need_x, bool need_w, bool need_b) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastpeft_cpu::lora_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
              const std::optional<Tensor>&, bool, bool, bool)>();
  return op.call(dy, x, w, A, B, t, s, 0.0, std::nullopt, need_x, need_w, need_b);
}

// ‖W + s·B·A‖ per row from w_sq = ‖W_n‖², W·Aᵀ (N×r) and A·Aᵀ (r×r), in w_sq's dtype.
Tensor weight_norm(const Tensor& W, const Tensor& w_sq, const Tensor& A, const Tensor& B, double s) {
  const auto acc = w_sq.scalar_type();
  const Tensor Wa = W.to(acc), Aa = A.to(acc), Ba = B.to(acc).contiguous();
  const Tensor WA = at::mm(Wa, Aa.t()).contiguous();  // (N, r)
  const Tensor BAA = at::mm(Ba, at::mm(Aa, Aa.t()));   // (N, r) = B·(A·Aᵀ)
  const Tensor n2 = w_sq + (2.0 * s) * (Ba * WA).sum(1) + (s * s) * (BAA * Ba).sum(1);
  return n2.clamp_min(0).sqrt();
}

// Rows per block of the dropout pass: >= 256 rows where M allows (a single-threaded GEMM on
// fewer rows runs slower), the block count a multiple of the thread count, balanced.
int64_t block_rows(int64_t M) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nob = std::max<int64_t>(1, M / 256 / nth) * nth;
  return std::max<int64_t>(1, (M + nob - 1) / nob);
}

// Rows of a rank-pass sub-block: its x / dy rows (width elements each) should stay in L2 (~256 KiB).
// FASTPEFT_LORA_BR overrides (tests use tiny sub-blocks to cover the tails).
int64_t sub_rows(int64_t width, int64_t elem) {
  if (const char* e = std::getenv("FASTPEFT_LORA_BR")) return std::max<int64_t>(1, std::atoll(e));
  return std::min<int64_t>(256, std::max<int64_t>(8, 256 * 1024 / std::max<int64_t>(1, width * elem)));
}

// Columns of y per tile of the forward's GEMMs and epilogue (the tile stays in L2).
constexpr int64_t kColTile = 512;

#ifdef __AVX512F__
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#endif
// xd[i, :] = x[row0+i, :] · (keep ? scale : 0) for `rows` rows (x through its strides), and
// keep bytes when `keep` is given; the mask is fastpeft._dropout's hash of (row0+i)·K + j.
template <typename T>
void drop_rows(uint32_t seed, uint32_t thr, T scale, int64_t row0, int64_t rows, int64_t K, const T* x, int64_t sx0,
               int64_t sx1, T* xd, uint8_t* keep) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t base = (row0 + i) * K;
    const T* xr = x + i * sx0;
    T* xo = xd + i * K;
    uint8_t* kr = keep ? keep + i * K : nullptr;
    const uint64_t hi0 = static_cast<uint64_t>(base) >> 32, hi1 = static_cast<uint64_t>(base + K - 1) >> 32;
    if (hi0 == hi1 && sx1 == 1) {
      const uint32_t key = fastpeft::dropout_key(seed, static_cast<uint32_t>(hi0));
      const uint32_t lo = static_cast<uint32_t>(base & 0xffffffffLL);
#pragma omp simd
      for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
        const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
        xo[j] = xr[j] * (k ? scale : T(0));
        if (kr) kr[j] = k;
      }
    } else {
      for (int64_t j = 0; j < K; ++j) {
        const bool k = fastpeft::dropout_keep(seed, thr, base + j);
        xo[j] = xr[j * sx1] * (k ? scale : T(0));
        if (kr) kr[j] = k;
      }
    }
  }
}
#ifdef __AVX512F__
#pragma GCC pop_options
#endif

// Forward configurations: the GEMM library; the forward always runs its GEMMs per row block
// ("+blocked": drop(x) exists only as per-thread block scratch).
std::vector<std::string> fwd_names(const std::vector<fastpeft::Lib>& libs) {
  std::vector<std::string> n;
  for (auto l : libs) n.push_back(std::string(fastpeft::lib_name(l)) + "+blocked");
  return n;
}

std::string key_of(const char* op, const Tensor& x, int64_t M, int64_t K, int64_t N, int64_t r,
                   const std::vector<fastpeft::Lib>& libs) {
  std::string k = std::string(op) + " " + c10::toString(x.scalar_type()) + " M~" +
                  std::to_string(fastpeft::row_class(M)) + " K=" + std::to_string(K) + " N=" + std::to_string(N) +
                  " r=" + std::to_string(r) + " threads=" + std::to_string(at::get_num_threads());
  for (auto l : libs) k += std::string(" ") + fastpeft::lib_name(l);
  return k;
}

// ---- dropout forward: one pass over row blocks -------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor, Tensor> fwd_drop(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                                            const Tensor& A, const Tensor& Bg, const Tensor& gm1, double s, double p,
                                            uint32_t sd, fastpeft::Lib lib) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), r = A.size(0);
  const auto opts = x.options();
  Tensor y = at::empty({M, N}, opts), t = at::empty({M, r}, opts), v = at::empty({M, N}, opts);
  if (M == 0) return {y, t, v};
  const uint32_t thr = dropout_threshold(p);
  const T dscale = static_cast<T>(1.0 / (1.0 - p));
  const Tensor Wt = W.t();
  const Tensor Ac = A.contiguous(), ATc = A.t().contiguous(), BgT = Bg.t().contiguous(), gc = gm1.contiguous();
  const Tensor bc = has(bias) ? bias->contiguous() : Tensor();
  const int vb = rank_vb<T>(r);
  const int64_t gb = block_rows(M), nblk = (M + gb - 1) / gb;
  const int64_t br = sub_rows(std::max(K, N), sizeof(T));
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nblk, at::get_num_threads()));
  const T* xp = x.data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // per-thread dispatch TLS
    Tensor xd = at::empty({gb, K}, opts);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
        const int64_t o0 = ob * gb, rows = std::min(gb, M - o0);
        // xd and t sub-block by sub-block (the hashed rows still in L1/L2 for the rank product)
        for (int64_t i0 = 0; i0 < rows; i0 += br) {
          const int64_t sr = std::min(br, rows - i0);
          T* xs = xd.data_ptr<T>() + i0 * K;
          drop_rows<T>(sd, thr, dscale, o0 + i0, sr, K, xp + (o0 + i0) * sx0, sx0, sx1, xs, nullptr);
          T* tb = t.data_ptr<T>() + (o0 + i0) * r;
          if (vb) {  // t = xd·Aᵀ on the register-blocked rank kernels (r of whole vectors)
            FASTPEFT_RANK_SWITCH(T, vb, r, rowvec<T, VB, NV>(sr, K, xs, K, ATc.data_ptr<T>(), T(1), tb, r));
          } else {
            fastpeft::blas::mm_abT<T>(sr, r, K, T(1), xs, K, Ac.data_ptr<T>(), K, T(0), tb, r);
          }
        }
        const Tensor xdb = xd.narrow(0, 0, rows), xb = x.narrow(0, o0, rows);
        const T* tb = t.data_ptr<T>() + o0 * r;
        const T* g1 = gc.data_ptr<T>();
        const T* bp = bc.defined() ? bc.data_ptr<T>() : nullptr;
        // per column tile (in L2): v = xd·Wᵀ, y = x·Wᵀ, then y += b + (g-1)⊙v + s·t·(g⊙B)ᵀ
        for (int64_t j0 = 0; j0 < N; j0 += kColTile) {
          const int64_t cols = std::min<int64_t>(kColTile, N - j0);
          fastpeft::gemm(xdb, Wt.narrow(1, j0, cols), v.narrow(0, o0, rows).narrow(1, j0, cols), 0.0, 1.0, lib);
          fastpeft::gemm(xb, Wt.narrow(1, j0, cols), y.narrow(0, o0, rows).narrow(1, j0, cols), 0.0, 1.0, lib);
          T* yb = y.data_ptr<T>() + o0 * N + j0;
          const T* vr0 = v.data_ptr<T>() + o0 * N + j0;
          for (int64_t i = 0; i < rows; ++i) {
            T* yr = yb + i * N;
            const T* vr = vr0 + i * N;
            if (bp) {
#pragma omp simd
              for (int64_t j = 0; j < cols; ++j) yr[j] += bp[j0 + j] + g1[j0 + j] * vr[j];
            } else {
#pragma omp simd
              for (int64_t j = 0; j < cols; ++j) yr[j] += g1[j0 + j] * vr[j];
            }
          }
          if (r <= kOuterMaxRank) {
            outer<T, kOuterVB>(rows, cols, r, tb, r, static_cast<T>(s), BgT.data_ptr<T>() + j0, N, nullptr, yb, N,
                               yb, N);
          } else {
            fastpeft::blas::mm_ab<T>(rows, cols, r, static_cast<T>(s), tb, r, BgT.data_ptr<T>() + j0, N, T(1), yb, N);
          }
        }
      }
    }
  });
  return {y, t, v};
}

// ---- dropout backward: one pass over row blocks ------------------------------------------------
// dx = dy·W + mask/(1-p) ⊙ (dy·((g-1)⊙W) + dt·A): (dy⊙(g-1))·W is written as dy times the row-scaled
// copy (g-1)⊙W (N×K), so no M×N temporary exists. Where the two big GEMMs run is a run-time
// choice (tune.h), as in the LoRA kernels: per row block inside the pass ("blocked", single-threaded
// GEMMs on the block while it is in cache), or as multi-threaded GEMMs before (dy·((g-1)⊙W)) and
// after (+= dy·W) the pass. Returns dx (or empty), dA (r×K), s·dyᵀ·t (N×r), colsum(dy⊙v) (N).
// The rank-r products run on the register-blocked kernels of rank_kernels.h where r fills whole
// vectors, else on BLAS.
struct BwdCfg {
  fastpeft::Lib lib;
  bool blocked;
  std::string name() const { return std::string(fastpeft::lib_name(lib)) + (blocked ? "+blocked" : ""); }
};

std::vector<BwdCfg> bwd_candidates(at::ScalarType st) {
  std::vector<BwdCfg> out;
  for (auto lib : fastpeft::allowed_lib_list(st))
    for (bool blocked : {false, true}) out.push_back({lib, blocked});
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_drop(const Tensor& dy, const Tensor& x, const Tensor& W,
                                                    const Tensor& A, const Tensor& Bg, const Tensor& gm1,
                                                    const Tensor& t, const Tensor& v, double s, double p, uint32_t sd,
                                                    bool need_x, bool need_mag, const BwdCfg& cfg) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), r = A.size(0);
  const auto opts = x.options();
  Tensor dx = need_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  const int64_t gb = block_rows(std::max<int64_t>(M, 1)), nblk = (M + gb - 1) / gb;
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nblk, at::get_num_threads()));
  // dAᵀ (K×r) is accumulated, so both rank reductions have the acct form.
  Tensor dA_part = at::zeros({nch, K, r}, opts), dtB_part = at::zeros({nch, N, r}, opts);
  Tensor dmv_part = at::zeros({nch, N}, opts);
  const bool blocked = cfg.blocked;
  const Tensor Wg1 = need_x ? (W * gm1.unsqueeze(1)) : Tensor();  // (g-1)⊙W, N×K
  if (need_x && !blocked && M > 0) fastpeft::gemm(dy, Wg1, dx, 0.0, 1.0, cfg.lib);  // dx = dy·((g-1)⊙W)
  if (M > 0) {
    const uint32_t thr = dropout_threshold(p);
    const T dscale = static_cast<T>(1.0 / (1.0 - p));
    const Tensor Ac = A.contiguous(), Bgc = Bg.contiguous();
    const int vb = rank_vb<T>(r);
    const T* xp = x.data_ptr<T>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    const T* dyp = dy.data_ptr<T>();
    const T* tp = t.data_ptr<T>();
    const T* vp = need_mag ? v.data_ptr<T>() : nullptr;
    const int64_t br = std::min(gb, sub_rows(std::max(K, N), sizeof(T)));
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = at::empty({br, K}, opts);
      Tensor dt = at::empty({br, r}, opts);
      std::vector<uint8_t> keep(need_x ? static_cast<size_t>(br * K) : 0);
      for (int64_t c = c0; c < c1; ++c) {
        T* dAp = dA_part[c].data_ptr<T>();
        T* dtBp = dtB_part[c].data_ptr<T>();
        T* dmp = dmv_part[c].data_ptr<T>();
        for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
          const int64_t o0 = ob * gb, rows = std::min(gb, M - o0);
          Tensor dxb = need_x ? dx.narrow(0, o0, rows) : Tensor();
          if (need_x && blocked) fastpeft::gemm(dy.narrow(0, o0, rows), Wg1, dxb, 0.0, 1.0, cfg.lib);
          // rank pass sub-block by sub-block: the dy rows stay in L2 for its three reads
          for (int64_t i0 = o0; i0 < o0 + rows; i0 += br) {
            const int64_t sr = std::min(br, o0 + rows - i0);
            const T* dyb = dyp + i0 * N;
            drop_rows<T>(sd, thr, dscale, i0, sr, K, xp + i0 * sx0, sx0, sx1, xd.data_ptr<T>(),
                         need_x ? keep.data() : nullptr);
            T* dtp = dt.data_ptr<T>();
            const T* tb = tp + i0 * r;
            if (vb) {
              FASTPEFT_RANK_SWITCH(T, vb, r, {
                rowvec<T, VB, NV>(sr, N, dyb, N, Bgc.data_ptr<T>(), static_cast<T>(s), dtp, r);  // dt = s·dy·(g⊙B)
                acct<T, VB, NV>(sr, N, dyb, N, tb, dtBp);                                        // dyᵀ·t
                acct<T, VB, NV>(sr, K, xd.data_ptr<T>(), K, dtp, dAp);                           // dAᵀ += xdᵀ·dt
              });
            } else {
              fastpeft::blas::mm_ab<T>(sr, r, N, static_cast<T>(s), dyb, N, Bgc.data_ptr<T>(), r, T(0), dtp, r);
              acct_blas<T>(sr, N, r, dyb, N, tb, dtBp);
              acct_blas<T>(sr, K, r, xd.data_ptr<T>(), K, dtp, dAp);
            }
            if (vp) {  // the magnitude's Σ_rows dy⊙v
              for (int64_t i = 0; i < sr; ++i) {
                const T* a = dyb + i * N;
                const T* b = vp + (i0 + i) * N;
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) dmp[j] += a[j] * b[j];
              }
            }
            if (need_x) {
              // dx_sub = (dy·((g-1)⊙W) + dt·A) ⊙ mask/(1-p)
              T* dxp = dx.data_ptr<T>() + i0 * K;
              if (r <= kOuterMaxRank) {
                outer<T, kOuterVB>(sr, K, r, dtp, r, T(1), Ac.data_ptr<T>(), K, nullptr, dxp, K, dxp, K);
              } else {
                fastpeft::blas::mm_ab<T>(sr, K, r, T(1), dtp, r, Ac.data_ptr<T>(), K, T(1), dxp, K);
              }
              const uint8_t* kp = keep.data();
              const int64_t n = sr * K;
#pragma omp simd
              for (int64_t j = 0; j < n; ++j) dxp[j] = dxp[j] * (kp[j] ? dscale : T(0));
            }
          }
          if (need_x && blocked) fastpeft::gemm(dy.narrow(0, o0, rows), W, dxb, 1.0, 1.0, cfg.lib);  // += dy·W
        }
      }
    });
  }
  if (need_x && !blocked && M > 0) fastpeft::gemm(dy, W, dx, 1.0, 1.0, cfg.lib);  // dx += dy·W
  Tensor dA = fastpeft::sum_parts(dA_part, true, r, x.scalar_type());
  Tensor dtB = fastpeft::sum_parts(dtB_part, false, r, x.scalar_type()) * s;  // s·dyᵀ·t
  Tensor dmv = nch == 1 ? dmv_part[0] : dmv_part.sum(0);
  return {dx, dA, dtB, dmv};
}

// Σ_rows dy⊙(y - b) (N), per-chunk partials summed in chunk order.
template <typename T>
Tensor colsum_dy_yb(const Tensor& dy, const Tensor& y, const std::optional<Tensor>& bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = dy.size(0), N = dy.size(1);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nth, M));
  Tensor part = at::zeros({nch, N}, dy.options());
  const Tensor bc = has(bias) ? bias->contiguous() : Tensor();
  const T* bp = bc.defined() ? bc.data_ptr<T>() : nullptr;
  const T* dyp = dy.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  const int64_t ldy = dy.stride(0), lyy = y.stride(0);
  fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* acc = part.data_ptr<T>() + c * N;
      for (int64_t i = M * c / nch; i < M * (c + 1) / nch; ++i) {
        const T* a = dyp + i * ldy;
        const T* b = yp + i * lyy;
        if (bp) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) acc[j] += a[j] * (b[j] - bp[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) acc[j] += a[j] * b[j];
        }
      }
    }
  });
  return nch == 1 ? part[0] : part.sum(0);
}

void check_2d(const char* name, const Tensor& t) { TORCH_CHECK(t.dim() == 2, "dora: ", name, " must be 2-D, got ", t.sizes()); }

// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> dora_fwd(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                    const Tensor& lora_B, const Tensor& magnitude, const Tensor& w_sq,
                                                    double scaling, double dropout_p, const std::optional<Tensor>& seed) {
  check_2d("x", x);
  check_2d("weight", weight);
  check_2d("lora_A", lora_A);
  check_2d("lora_B", lora_B);
  TORCH_CHECK(x.device().is_cpu(), "dora_fwd (C++ backend): expected CPU tensors, got ", x.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dora_fwd: dropout_p must be in [0, 1), got ", dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool drop = dropout_p > 0.0 && has(seed);
  if (is_half(x)) {
    auto [y, t, norm, v] = dora_fwd(f32(x), f32(weight), opt_f32(bias), f32(lora_A), f32(lora_B), f32(magnitude),
                                    w_sq.to(at::kFloat), scaling, dropout_p, seed);
    const auto st = x.scalar_type();
    return {y.to(st), t.to(st), norm, v.to(st)};
  }
  const Tensor norm = weight_norm(weight, w_sq, lora_A, lora_B, scaling);
  const Tensor g = (magnitude.to(norm.scalar_type()) / norm).to(x.scalar_type());
  const Tensor Bg = lora_B * g.unsqueeze(1);
  if (!drop) {
    // y = x·(g⊙W)ᵀ + b + s·(x·Aᵀ)·(g⊙B)ᵀ: the fused LoRA forward on rescaled rows.
    auto [y, t] = lora_fwd_op(x, weight * g.unsqueeze(1), bias, lora_A, Bg, scaling);
    return {y, t, norm, at::empty({0}, x.options())};
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const uint32_t sd = seed_value(seed);
  const Tensor gm1 = g - 1;
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dora_fwd", [&] {
    const auto libs = fastpeft::allowed_lib_list(x.scalar_type());
    auto run = [&](int i) { return fwd_drop<scalar_t>(x, weight, bias, lora_A, Bg, gm1, scaling, dropout_p, sd, libs[i]); };
    const int pick = fastpeft::tuned_choice(key_of("dora_fwd drop", x, M, K, N, r, libs), fwd_names(libs),
                                            2.0 * M * K * N, [&](int i) { run(i); });
    auto [y, t, v] = run(pick);
    out = {y, t, norm, v};
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_bwd(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude, const Tensor& t_in, const Tensor& norm,
    const Tensor& yv_in, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias, bool need_mag) {
  check_2d("dy", dy_in);
  check_2d("x", x);
  check_2d("weight", weight);
  check_2d("lora_A", lora_A);
  check_2d("lora_B", lora_B);
  check_2d("t", t_in);
  TORCH_CHECK(x.device().is_cpu(), "dora_bwd (C++ backend): expected CPU tensors, got ", x.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dora_bwd: dropout_p must be in [0, 1), got ", dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto st = x.scalar_type();
  if (is_half(x)) {
    auto [dx, dW, db, dA, dB, dm] =
        dora_bwd(f32(dy_in), f32(x), f32(weight), opt_f32(bias), f32(lora_A), f32(lora_B), f32(magnitude), f32(t_in),
                 norm.to(at::kFloat), f32(yv_in), scaling, dropout_p, seed, need_x, need_weight, need_bias, need_mag);
    return {dx.to(st), dW.to(st), db.to(st), dA.to(st), dB.to(st), dm.to(st)};
  }
  const bool drop = dropout_p > 0.0 && has(seed);
  const Tensor dy = dy_in.contiguous(), t = t_in.contiguous();
  const Tensor g = (magnitude.to(norm.scalar_type()) / norm).to(st);
  const Tensor Bg = lora_B * g.unsqueeze(1);
  // Separate empty tensors: outputs of a custom op may not alias each other.
  auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor dx = empty(), dW = empty(), db = need_bias ? dy.sum(0) : empty(), dA, dB, dm = empty();
  if (!drop) {
    // LoRA backward on g⊙W, g⊙B: dx = dy·(g⊙W) + dt·A, dt = s·dy·(g⊙B), dB' = s·dyᵀ·t, dW' = dyᵀ·x.
    auto res = lora_bwd_op(dy, x, weight * g.unsqueeze(1), lora_A, Bg, t, scaling, need_x, need_weight, false);
    dx = std::get<0>(res);
    dA = std::get<3>(res);
    dB = std::get<4>(res) * g.unsqueeze(1);
    if (need_weight) dW = std::get<1>(res) * g.unsqueeze(1);
    if (need_mag) {
      const Tensor y = yv_in.stride(1) == 1 ? yv_in : yv_in.contiguous();
      AT_DISPATCH_FLOATING_TYPES(st, "dora_bwd_dm", [&] { dm = colsum_dy_yb<scalar_t>(dy, y, bias); });
      dm = dm / magnitude;
      // m_n = 0: u = (y - b)/g is lost there; recompute that column of u = x·Wᵀ + s·t·Bᵀ.
      const Tensor zero = (magnitude == 0).nonzero().flatten();
      if (zero.numel() > 0) {
        const Tensor u = at::mm(x, weight.index_select(0, zero).t()) +
                         scaling * at::mm(t, lora_B.index_select(0, zero).t());
        dm.index_copy_(0, zero, (dy.index_select(1, zero) * u).sum(0) / norm.index_select(0, zero).to(st));
      }
    }
    return {dx, dW, db, dA, dB, dm};
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const uint32_t sd = seed_value(seed);
  const Tensor gm1 = g - 1;
  const Tensor v = need_mag ? yv_in.contiguous() : yv_in;
  AT_DISPATCH_FLOATING_TYPES(st, "dora_bwd", [&] {
    const auto libs = fastpeft::allowed_lib_list(st);
    const auto cands = bwd_candidates(st);
    std::vector<std::string> names;
    for (const auto& c : cands) names.push_back(c.name());
    auto run = [&](int i) {
      return bwd_drop<scalar_t>(dy, x, weight, lora_A, Bg, gm1, t, v, scaling, dropout_p, sd, need_x, need_mag,
                                cands[i]);
    };
    const int pick = fastpeft::tuned_choice(
        key_of("dora_bwd drop", x, M, K, N, r, libs) + (need_x ? " dx" : "") + (need_mag ? " dm" : ""),
        names, need_x ? 2.0 * M * K * N : 0.0, [&](int i) { run(i); });
    auto [dx_, dA_, dtB, dmv] = run(pick);
    dx = dx_;
    dA = dA_;
    dB = dtB * g.unsqueeze(1);
    if (need_mag) dm = (dmv + (lora_B * dtB).sum(1)) / norm.to(st);
  });
  if (need_weight) {
    // dW = dyᵀ·x + (dy⊙(g-1))ᵀ·drop(x) (full fine-tuning of W only: materialises drop(x)).
    Tensor xd = at::empty({M, K}, x.options());
    AT_DISPATCH_FLOATING_TYPES(st, "dora_bwd_dw", [&] {
      const auto thr = dropout_threshold(dropout_p);
      const auto sc = static_cast<scalar_t>(1.0 / (1.0 - dropout_p));
      drop_rows<scalar_t>(sd, thr, sc, 0, M, K, x.data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                          xd.data_ptr<scalar_t>(), nullptr);
    });
    dW = at::mm(dy.t(), x) + at::mm((dy * gm1).t(), xd);
  }
  return {dx, dW, db, dA, dB, dm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("dora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "Tensor w_sq, float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)",
        &dora_fwd);
  m.def("dora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor magnitude, Tensor t, Tensor norm, Tensor yv, float scaling, float dropout_p, Tensor? seed, "
        "bool need_x, bool need_weight, bool need_bias, bool need_mag) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &dora_bwd);
}
