// Fused LoRA linear for CPU tensors (family "lora"; contract in fastpeft/ops/lora.py):
//
//   t = drop(x)·Aᵀ                      (M, r), returned and saved for backward
//   y = x·Wᵀ + b + s·t·Bᵀ               (M, N)
//
// The frozen linear's own cost is two big GEMMs (x·Wᵀ forward, dy·W backward). Everything
// LoRA adds is rank-r work, so it is done row block by row block (BR rows, in L2) in ONE
// parallel pass over x (forward) or over dy and x (backward), and the big GEMMs accumulate on
// top of it in place (beta = 1, csrc/gemm.h):
//
//   forward   per block: xd = drop(x_blk) (hash regenerated, BR×K scratch), t_blk = xd·Aᵀ,
//                        y_blk = b + s·t_blk·Bᵀ (replaces the bias broadcast the frozen
//                        linear also writes), then y_blk += x_blk·Wᵀ.
//   backward  per block: dt_blk = s·dy_blk·B, dB_c += s·dy_blkᵀ·t_blk, keep mask (bytes) +
//                        xd, dA_c += dt_blkᵀ·xd, dx_blk = (dt_blk·A) ⊙ keep/(1-p),
//                        then dx_blk += dy_blk·W.
//
// Where the big GEMM runs and on which library is a run-time choice (Cfg below, timed per
// shape class by tune.h): per outer block of >= 256 rows inside the same parallel pass
// ("+blocked"; forward per 512-column tile of y, so the tile is still in cache), or one
// multi-threaded call after the pass; on ATen (MKL) or oneDNN (gemm.h). The rank-r products
// run on the register-blocked micro-kernels of rank_kernels.h (r of whole vectors) or on
// per-block BLAS calls (blas.h). Which is fastest depends on the CPU: measured, oneDNN per
// block won on an AMD EPYC, MKL after the pass on an Intel Xeon with AMX.
//
// So no M×N temporary, no separate add or scale pass, no M×K float mask or dropped copy of
// x: the extra memory is t and dt (M×r), per-chunk dA/dB partials and BR-row scratch.
// Blocks run in at::parallel_for (one contiguous chunk of blocks per thread, block count a
// multiple of the thread count). The dA/dB partials are per chunk (fixed split), so results do
// not depend on thread scheduling. FASTPEFT_LORA_BR / FASTPEFT_LORA_GB override the block
// heights (tests).
// The dropout mask is fastpeft::dropout_keep (common.h), bit-identical to fastpeft._dropout.
// fp32/fp64 compute natively. bf16/fp16: see "bf16 / fp16" below (native low-precision GEMMs,
// fp32 rank-r work; "upcast" to fp32 is a configuration of its own where that is faster).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "brgemm.h"
#include "common.h"
#include "gemm.h"
#include "rank_kernels.h"
#include "tune.h"

namespace {

using at::Tensor;
using namespace fastpeft::rk;

// Rows per outer block of the parallel pass, balanced: the block count is a multiple of the
// thread count, so every thread (one fixed chunk of blocks each) gets the same number of blocks
// of near-equal height. (13 blocks split 6/7 left one thread idle for 1/7 of the pass; 7 blocks
// at M = 512 split 3/4, a quarter.) Blocks hold at most `target` rows: the rank-pass block br
// (x/dy block in L2), or >= 256 rows when the big GEMM runs per block (a single-threaded GEMM
// on fewer rows runs slower). The blocking depends only on (M, K, N, thread count), so the
// per-chunk partial sums, and the results, are the same on every call.
// FASTPEFT_LORA_BR / FASTPEFT_LORA_GB override br / the outer block (tests use tiny blocks
// to cover ragged tails).
int64_t balanced_rows(int64_t M, int64_t target) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t nblk = std::max<int64_t>(1, (M + target - 1) / target);
  nblk = (nblk + nth - 1) / nth * nth;
  return std::max<int64_t>(1, (M + nblk - 1) / nblk);
}

// Rows per rank-pass block: the x/dy block and its scratch should stay in L2 (~1 MiB per
// core), balanced across the threads.
int64_t block_rows(int64_t M, int64_t width, int64_t elem) {
  // FASTPEFT_LORA_BR overrides, unbalanced (read per call: tests use tiny blocks to cover tails).
  if (const char* e = std::getenv("FASTPEFT_LORA_BR")) return std::max<int64_t>(1, std::atoll(e));
  const int64_t target = 256 * 1024;  // bytes of one BR×width block
  const int64_t br = std::min<int64_t>(256, std::max<int64_t>(16, target / std::max<int64_t>(1, width * elem)));
  return std::min(br, balanced_rows(M, br));
}

uint32_t dropout_threshold(double p) {
  // Python's int(round(p * 2**32)) (round half to even), capped at 2**32 - 1.
  const double v = std::nearbyint(p * 4294967296.0);
  return v >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(v);
}

uint32_t seed_value(const std::optional<Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->defined(), "lora: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1, "lora: seed must be a single-element tensor, got ", seed->sizes());
  return static_cast<uint32_t>(seed->item<int64_t>());
}

// The hash loops below are plain `omp simd` loops; GCC's default tuning vectorises them with
// 256-bit registers even where AVX-512 has 512 (16 hashes per instruction instead of 8).
#ifdef __AVX512F__
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#endif
// keep[i*K + j] = dropout_keep(seed, thr, (row0+i)*K + j) for rows [row0, row0+rows); and, when
// xd != nullptr, xd[i*K + j] = x[i, j] · (keep ? scale : 0) (x read through its strides).
// The common case (the 32-bit high word of the index constant along a row) is a plain loop
// the compiler vectorises (vpmulld, 16 lanes with AVX-512). Its counter is 32-bit (the hash
// input is lo + j mod 2**32 anyway): a 64-bit one made every vector iteration widen and narrow
// its index (3 more uops).
// x may be stored narrower than T (bf16 / fp16, widened here).
template <typename T, typename TI>
void dropout_rows(uint32_t seed, uint32_t thr, T scale, int64_t row0, int64_t rows, int64_t K,
                  const TI* x, int64_t sx0, int64_t sx1, T* xd, uint8_t* keep) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t base = (row0 + i) * K;
    const TI* xr = x ? x + i * sx0 : nullptr;
    T* xo = xd ? xd + i * K : nullptr;
    uint8_t* kr = keep ? keep + i * K : nullptr;
    const uint64_t hi0 = static_cast<uint64_t>(base) >> 32;
    const uint64_t hi1 = static_cast<uint64_t>(base + K - 1) >> 32;
    if (hi0 == hi1) {
      const uint32_t key = fastpeft::dropout_key(seed, static_cast<uint32_t>(hi0));
      const uint32_t lo = static_cast<uint32_t>(base & 0xffffffffLL);
      if (!xo && kr) {  // the mask alone (the bf16 brgemm passes mask x themselves)
#pragma omp simd
        for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) kr[j] = fastpeft::fmix32((lo + j) ^ key) >= thr;
      } else if (xo && sx1 == 1) {
        if (kr) {
#pragma omp simd
          for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
            const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
            kr[j] = k;
            xo[j] = static_cast<T>(xr[j]) * (k ? scale : T(0));
          }
        } else {
#pragma omp simd
          for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
            const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
            xo[j] = static_cast<T>(xr[j]) * (k ? scale : T(0));
          }
        }
      } else {
        for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
          const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
          if (kr) kr[j] = k;
          if (xo) xo[j] = static_cast<T>(xr[j * sx1]) * (k ? scale : T(0));
        }
      }
    } else {  // the row straddles a multiple of 2**32 elements: per-element key
      for (int64_t j = 0; j < K; ++j) {
        const bool k = fastpeft::dropout_keep(seed, thr, base + j);
        if (kr) kr[j] = k;
        if (xo) xo[j] = static_cast<T>(xr[j * sx1]) * (k ? scale : T(0));
      }
    }
  }
}

// d[i, j] = d[i, j] · (keep[i, j] ? scale : 0) on a contiguous rows×K block (a multiply, not a
// select: a dropped NaN / inf gives NaN, as in the reference).
template <typename T>
void apply_keep(T* d, const uint8_t* keep, int64_t n, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = d[j] * (keep[j] ? scale : T(0));
}
#ifdef __AVX512F__
#pragma GCC pop_options
#endif

// Split [0, nblk) into a fixed number of contiguous chunks (one per thread).
int64_t num_chunks(int64_t nblk) {
  return std::max<int64_t>(1, std::min<int64_t>(nblk, at::get_num_threads()));
}

int64_t gemm_rows(int64_t M, int64_t br) {
  if (const char* e = std::getenv("FASTPEFT_LORA_GB")) return std::max<int64_t>(br, std::atoll(e));
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // As many >= 256-row blocks as fit, rounded down to a multiple of the thread count (at least
  // one per thread), then balanced.
  const int64_t nob = std::max<int64_t>(1, M / 256 / nth) * nth;
  return std::max<int64_t>(1, (M + nob - 1) / nob);
}

void check_2d(const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "lora: ", name, " must be 2-D, got ", t.sizes());
}

bool is_half(const Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

Tensor to_f32(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

std::optional<Tensor> opt_f32(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) return t->to(at::kFloat);
  return t;
}


// ---------------------------------------------------------------------------------------------
// Where the frozen GEMM runs (see the header): per outer block inside the rank pass (blocked),
// or one multi-threaded call after it; and which library runs it (gemm.h).
// And how the rank-r products run: the register-blocked kernels of rank_kernels.h (when r
// fills whole vectors) or single-threaded BLAS calls per block (any r). Name:
// "<lib>[+blocked]|<micro|blas>", e.g. "onednn+blocked|micro".
// bf16 / fp16 only: "upcast" runs the fp32 op on fp32 copies of every operand (for CPUs whose
// low-precision GEMMs are slower than fp32 ones).
// bf16 / fp16 only: "|gemm" runs the rank-r products that need no dropout mask as whole-M
// library GEMMs (AMX kernels on CPUs that have them outrun any fp32 micro-kernel).
// bf16 / fp16 only: "|brgemm" runs every rank-r product per row block on oneDNN's brgemm
// micro-kernels (brgemm.h), dropout included, and the frozen GEMMs as whole-M library calls.
struct Cfg {
  fastpeft::Lib lib;
  bool blocked;
  bool blas_rank;
  bool upcast = false;
  bool gemm_rank = false;
  bool brg = false;
  std::string name() const {
    if (upcast) return "upcast";
    return std::string(fastpeft::lib_name(lib)) + (blocked ? "+blocked" : "") +
           (brg ? "|brgemm" : gemm_rank ? "|gemm" : blas_rank ? "|blas" : "|micro");
  }
};

// The configurations allowed here for dtype st and rank r, the default (untuned) one first.
template <typename T>
std::vector<Cfg> candidates(at::ScalarType st, int64_t r) {
  const auto libs = fastpeft::allowed_libs(st);
  std::vector<std::pair<fastpeft::Lib, bool>> places;
  if (libs.aten) places.push_back({fastpeft::Lib::Aten, false});
  if (libs.onednn) places.push_back({fastpeft::Lib::OneDnn, true});
  if (libs.onednn) places.push_back({fastpeft::Lib::OneDnn, false});
  if (libs.aten) places.push_back({fastpeft::Lib::Aten, true});
  std::vector<Cfg> out;
  for (bool blas_rank : {false, true}) {
    if (!blas_rank && rank_vb<T>(r) == 0) continue;
    for (const auto& pl : places) out.push_back({pl.first, pl.second, blas_rank});
  }
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor> fwd_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& A, const Tensor& B, double scaling, double p,
                                    const std::optional<Tensor>& seed, const Cfg& cfg) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels, no autograd graph
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  const auto opts = x.options();
  Tensor y = at::empty({M, N}, opts);
  Tensor t = at::empty({M, r}, opts);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const T dscale = static_cast<T>(1.0 / (1.0 - p));
  const Tensor At = A.t(), Bt = B.t();
  // Packed Aᵀ (K×r) and Bᵀ (r×N), tiny copies; vb = 0: the rank-r products go to BLAS.
  const int vb = cfg.blas_rank ? 0 : rank_vb<T>(r);
  const Tensor ATc = At.contiguous(), BTc = Bt.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();

  // Blocked: y_blk += x_blk·Wᵀ runs inside the parallel pass, per 512-column tile right after
  // y_tile = b + s·t_blk·Bᵀ was written (the tile still in cache, x_blk just read). Else one
  // multi-threaded GEMM accumulates onto y after the pass.
  const bool blocked = cfg.blocked && M > 0;
  const Tensor Wt = weight.t();
  if (M > 0) {
    const int64_t br = block_rows(M, std::max(K, N), sizeof(T));
    const int64_t gb = blocked ? gemm_rows(M, br) : br;  // rows per outer block
    const int64_t nblk = (M + gb - 1) / gb;
    const int64_t nch = num_chunks(nblk);
    const T* xp = x.data_ptr<T>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      // Dispatch TLS is per thread: worker threads must skip autograd (A may require grad).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = (drop || sx1 != 1) ? at::empty({br, K}, opts) : Tensor();
      const T* xd_ptr = xd.defined() ? xd.data_ptr<T>() : nullptr;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
          const int64_t o0 = ob * gb, orows = std::min(gb, M - o0);
          // t for the block's rows, br rows at a time (the dropped-out rows stay in L1/L2) ...
          for (int64_t i0 = o0; i0 < o0 + orows; i0 += br) {
            const int64_t rows = std::min(br, o0 + orows - i0);
            const T* X = xp + i0 * sx0;
            int64_t ldx = sx0;
            if (drop || sx1 != 1) {  // thr 0 keeps every element: a plain strided copy
              dropout_rows<T>(sd, drop ? thr : 0u, drop ? dscale : T(1), i0, rows, K, X, sx0, sx1,
                              xd.data_ptr<T>(), nullptr);
              X = xd_ptr;
              ldx = K;
            }
            T* tb = t.data_ptr<T>() + i0 * r;
            if (vb) {
              FASTPEFT_RANK_SWITCH(T, vb, r, rowvec<T, VB, NV>(rows, K, X, ldx, ATc.data_ptr<T>(), T(1), tb, r));
            } else {
              rowvec_blas<T>(rows, K, r, X, ldx, ATc.data_ptr<T>(), T(1), tb, r);
            }
          }
          // ... then y column tile by column tile: y_tile = b + s·t·Bᵀ (this write replaces the
          // bias broadcast of a plain linear), and, blocked, y_tile += x_blk·Wᵀ while the tile
          // is still in cache.
          const int64_t nc = blocked ? std::min<int64_t>(N, 512) : N;
          for (int64_t j0 = 0; j0 < N; j0 += nc) {
            const int64_t cols = std::min(nc, N - j0);
            const T* bj = has_bias ? bc.data_ptr<T>() + j0 : nullptr;
            T* yt = y.data_ptr<T>() + o0 * N + j0;
            if (vb) {
              outer<T, kOuterVB>(orows, cols, r, t.data_ptr<T>() + o0 * r, r, static_cast<T>(scaling),
                                 BTc.data_ptr<T>() + j0, N, bj, yt, N);
            } else {
              outer_blas<T>(orows, cols, r, t.data_ptr<T>() + o0 * r, r, static_cast<T>(scaling),
                            BTc.data_ptr<T>() + j0, N, bj, yt, N);
            }
            if (blocked) fastpeft::gemm(x.narrow(0, o0, orows), Wt.narrow(1, j0, cols),
                                        y.narrow(0, o0, orows).narrow(1, j0, cols), 1.0, 1.0, cfg.lib);
          }
        }
      }
    });
  }
  // The frozen GEMM accumulates in place (multi-threaded).
  if (!blocked) fastpeft::gemm(x, Wt, y, 1.0, 1.0, cfg.lib);
  return {y, t};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
    const Tensor& t_in, double scaling, double p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias, const Cfg& cfg) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels, no autograd graph
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  const auto opts = x.options();
  // Row blocks of dy are sliced and fed to BLAS: keep its rows unit-stride.
  const Tensor dy = dy_in.stride(1) == 1 ? dy_in : dy_in.contiguous();
  const Tensor t = t_in.stride(1) == 1 ? t_in : t_in.contiguous();
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const T dscale = static_cast<T>(1.0 / (1.0 - p));

  Tensor dx = need_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  Tensor dA, dB;
  // As in the forward: blocked, dx_blk += dy_blk·W runs per outer block right after the rank
  // pass wrote dx_blk = (dt·A) ⊙ mask (dx_blk in cache, dy_blk just read); else one
  // multi-threaded GEMM after the pass.
  const bool blocked = cfg.blocked && need_x && M > 0;
  if (M == 0) {
    dA = at::zeros({r, K}, opts);
    dB = at::zeros({N, r}, opts);
  } else {
    const int64_t br = block_rows(M, std::max(K, N), sizeof(T));
    const int64_t gb = blocked ? gemm_rows(M, br) : br;  // rows per outer block
    const int64_t nblk = (M + gb - 1) / gb;
    const int64_t nch = num_chunks(nblk);
    // Per-chunk partial sums of the two reductions over rows (tiny: r×(K+N) each).
    const int vb = cfg.blas_rank ? 0 : rank_vb<T>(r);
    // dAᵀ (K×r) is accumulated, so both reductions have the same form (acct).
    Tensor dA_part = at::zeros({nch, K, r}, opts);
    const Tensor Bc = B.contiguous(), Ac = A.contiguous();
    const T* dyp = dy.data_ptr<T>();
    const int64_t ldy = dy.stride(0);
    Tensor dB_part = at::zeros({nch, N, r}, opts);
    Tensor dt = at::empty({M, r}, opts);
    const T* xp = x.data_ptr<T>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      // Dispatch TLS is per thread: worker threads must skip autograd (A may require grad).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = (drop || sx1 != 1) ? at::empty({br, K}, opts) : Tensor();
      std::vector<uint8_t> keep(drop && need_x ? static_cast<size_t>(br * K) : 0);
      std::vector<T> ts(static_cast<size_t>(br * r));
      for (int64_t c = c0; c < c1; ++c) {
        Tensor dAc = dA_part[c], dBc = dB_part[c];
        for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
         const int64_t o0 = ob * gb, orows = std::min(gb, M - o0);
         for (int64_t i0 = o0; i0 < o0 + orows; i0 += br) {
          const int64_t rows = std::min(br, o0 + orows - i0);
          const T* dyb = dyp + i0 * ldy;
          T* dtb = dt.data_ptr<T>() + i0 * r;
          const T* tb = t.data_ptr<T>() + i0 * t.stride(0);
          const T sc = static_cast<T>(scaling);
          for (int64_t a = 0; a < rows; ++a)
            for (int64_t k = 0; k < r; ++k) ts[a * r + k] = sc * tb[a * t.stride(0) + k];
          const T* X = xp + i0 * sx0;
          int64_t ldx = sx0;
          if (drop || sx1 != 1) {
            dropout_rows<T>(sd, drop ? thr : 0u, drop ? dscale : T(1), i0, rows, K, X, sx0, sx1,
                            xd.data_ptr<T>(), drop && need_x ? keep.data() : nullptr);
            X = xd.data_ptr<T>();
            ldx = K;
          }
          T* dBp = dBc.data_ptr<T>();
          T* dAp = dAc.data_ptr<T>();
          if (vb) {
            FASTPEFT_RANK_SWITCH(T, vb, r, {
              rowvec<T, VB, NV>(rows, N, dyb, ldy, Bc.data_ptr<T>(), sc, dtb, r);  // dt = s·dy·B
              acct<T, VB, NV>(rows, N, dyb, ldy, ts.data(), dBp);                  // dB += dyᵀ·(s·t)
              acct<T, VB, NV>(rows, K, X, ldx, dtb, dAp);                          // dAᵀ += drop(x)ᵀ·dt
            });
          } else {
            rowvec_blas<T>(rows, N, r, dyb, ldy, Bc.data_ptr<T>(), sc, dtb, r);
            acct_blas<T>(rows, N, r, dyb, ldy, ts.data(), dBp);
            acct_blas<T>(rows, K, r, X, ldx, dtb, dAp);
          }
          if (need_x) {
            T* dxb = dx.data_ptr<T>() + i0 * K;
            if (vb) outer<T, kOuterVB>(rows, K, r, dtb, r, T(1), Ac.data_ptr<T>(), K, nullptr, dxb, K);  // dx_blk = dt·A ...
            else outer_blas<T>(rows, K, r, dtb, r, T(1), Ac.data_ptr<T>(), K, nullptr, dxb, K);
            if (drop) apply_keep<T>(dxb, keep.data(), rows * K, dscale);  // ... ⊙ mask/(1-p)
          }
         }
         // dx_blk += dy_blk·W (not column-tiled: a column slice of W is neither row- nor
         // column-major, and oneDNN would copy it per call).
         if (blocked) fastpeft::gemm(dy.narrow(0, o0, orows), weight, dx.narrow(0, o0, orows), 1.0, 1.0, cfg.lib);
        }
      }
    });
    // Fixed chunks summed in chunk order: the same bits on every call with this thread count.
    dA = fastpeft::sum_parts(dA_part, true, r, x.scalar_type());
    dB = fastpeft::sum_parts(dB_part, false, r, x.scalar_type());
    if (need_x && !blocked) fastpeft::gemm(dy, weight, dx, 1.0, 1.0, cfg.lib);  // dx += dy·W (multi-threaded)
  }
  if (need_x && M == 0) dx.zero_();
  Tensor dW = need_weight ? at::empty({N, K}, opts) : at::empty({0}, opts);
  if (need_weight) fastpeft::gemm(dy.t(), x, dW, 0.0, 1.0, cfg.lib);
  Tensor db = need_bias ? dy.sum(0) : at::empty({0}, opts);
  return {dx, dW, db, dA, dB};
}


// ---------------------------------------------------------------------------------------------
// bf16 / fp16 (storage type S). The big GEMMs take the S operands as they are: ATen hands them
// to oneDNN, which runs AMX / AVX512-BF16 kernels where the CPU has them, accumulates in fp32
// and rounds once. The rank-r work runs on the fp32 micro-kernels, reading x / dy in place,
// keeping t, dt and the dA / dB sums in fp32 and rounding y / dx once on store. A and B (tiny)
// are widened per call, zero-padded to rank rp >= r (whole vectors: the padding adds zeros).
// No fp32 copy of x, W or dy: the extra memory is O(M·rp) plus per-thread block scratch.

// m (rows, c) widened to fp32 and zero-padded to (rows, cols).
Tensor pad_cols_f32(const Tensor& m, int64_t cols) {
  Tensor out = at::zeros({m.size(0), cols}, m.options().dtype(at::kFloat));
  out.narrow(1, 0, m.size(1)).copy_(m);
  return out;
}

std::vector<Cfg> lowp_candidates(at::ScalarType st, int64_t r) {
  std::vector<Cfg> out;
  if (padded_rank(r) > 0) {
    out.push_back({fastpeft::Lib::Aten, false, false});
    out.push_back({fastpeft::Lib::Aten, true, false});
    out.push_back({fastpeft::Lib::Aten, false, false, false, true});
  }
  if (fastpeft::brg::ok(st)) out.push_back({fastpeft::Lib::Aten, false, false, false, false, true});
  if (out.empty() || !fastpeft::native_lowp_gemm(st)) out.push_back({fastpeft::Lib::Aten, false, false, true});
  return out;
}

template <typename S>
std::tuple<Tensor, Tensor> lowp_fwd_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         const Tensor& A, const Tensor& B, double scaling, double p,
                                         const std::optional<Tensor>& seed, const Cfg& cfg) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0), rp = padded_rank(r);
  const int vb = rank_vb<float>(rp);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor y = at::empty({M, N}, x.options());
  Tensor tf = at::empty({M, rp}, fopts);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const float dscale = static_cast<float>(1.0 / (1.0 - p));
  const Tensor ATp = pad_cols_f32(A.t(), rp);                // (K, rp)
  const Tensor BTp = pad_cols_f32(B, rp).t().contiguous();    // (rp, N)
  const Tensor bf = has_bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const bool blocked = cfg.blocked && M > 0;
  const Tensor Wt = weight.t();
  if (M > 0) {
    const int64_t br = block_rows(M, std::max(K, N), sizeof(float));
    const int64_t gb = blocked ? gemm_rows(M, br) : br;
    const int64_t nblk = (M + gb - 1) / gb;
    const int64_t nch = num_chunks(nblk);
    const S* xp = x.data_ptr<S>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    const bool scratch = drop || sx1 != 1;
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = at::empty({br, K}, fopts);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
          const int64_t o0 = ob * gb, orows = std::min(gb, M - o0);
          for (int64_t i0 = o0; i0 < o0 + orows; i0 += br) {
            const int64_t rows = std::min(br, o0 + orows - i0);
            float* tb = tf.data_ptr<float>() + i0 * rp;
            // drop(x) (or x) widened into the fp32 block scratch once: the micro-kernels then
            // broadcast fp32 values instead of widening each element per use.
            if (scratch)
              dropout_rows<float>(sd, drop ? thr : 0u, drop ? dscale : 1.0f, i0, rows, K, xp + i0 * sx0, sx0, sx1,
                                  xd.data_ptr<float>(), nullptr);
            else
              widen_rows<float, kOuterVB>(xp + i0 * sx0, sx0, rows, K, xd.data_ptr<float>());
            FASTPEFT_RANK_SWITCH(float, vb, rp,
                                 rowvec<float, VB, NV>(rows, K, xd.data_ptr<float>(), K, ATp.data_ptr<float>(), 1.0f, tb, rp));
          }
          const int64_t nc = blocked ? std::min<int64_t>(N, 512) : N;
          for (int64_t j0 = 0; j0 < N; j0 += nc) {
            const int64_t cols = std::min(nc, N - j0);
            outer<float, kOuterVB>(orows, cols, rp, tf.data_ptr<float>() + o0 * rp, rp, static_cast<float>(scaling),
                                   BTp.data_ptr<float>() + j0, N, has_bias ? bf.data_ptr<float>() + j0 : nullptr,
                                   y.data_ptr<S>() + o0 * N + j0, N);
            if (blocked) fastpeft::gemm(x.narrow(0, o0, orows), Wt.narrow(1, j0, cols),
                                        y.narrow(0, o0, orows).narrow(1, j0, cols), 1.0, 1.0, cfg.lib);
          }
        }
      }
    });
  }
  if (!blocked) fastpeft::gemm(x, Wt, y, 1.0, 1.0, cfg.lib);
  return {y, tf.narrow(1, 0, r).to(x.scalar_type())};
}

template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowp_bwd_impl(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
    const Tensor& t_in, double scaling, double p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias, const Cfg& cfg) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0), rp = padded_rank(r);
  const int vb = rank_vb<float>(rp);
  const auto opts = x.options();
  const auto fopts = opts.dtype(at::kFloat);
  const Tensor dy = dy_in.stride(1) == 1 ? dy_in : dy_in.contiguous();
  const Tensor t = t_in.stride(1) == 1 ? t_in : t_in.contiguous();
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const float dscale = static_cast<float>(1.0 / (1.0 - p));
  const float sc = static_cast<float>(scaling);

  Tensor dx = need_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  Tensor dA, dB;
  const bool blocked = cfg.blocked && need_x && M > 0;
  if (M == 0) {
    dA = at::zeros({r, K}, opts);
    dB = at::zeros({N, r}, opts);
  } else {
    const int64_t br = block_rows(M, std::max(K, N), sizeof(float));
    const int64_t gb = blocked ? gemm_rows(M, br) : br;
    const int64_t nblk = (M + gb - 1) / gb;
    const int64_t nch = num_chunks(nblk);
    Tensor dA_part = at::zeros({nch, K, rp}, fopts);  // dAᵀ partials, fixed chunks (deterministic)
    Tensor dB_part = at::zeros({nch, N, rp}, fopts);
    const Tensor Bp = pad_cols_f32(B, rp);                   // (N, rp)
    const Tensor Ap = pad_cols_f32(A.t(), rp).t().contiguous();  // (rp, K)
    const S* dyp = dy.data_ptr<S>();
    const int64_t ldy = dy.stride(0), ldt = t.stride(0);
    const S* tp = t.data_ptr<S>();
    const S* xp = x.data_ptr<S>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    const bool scratch = drop || sx1 != 1;
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = at::empty({br, K}, fopts);
      Tensor dyf = at::empty({br, N}, fopts);
      Tensor dxf = need_x && drop ? at::empty({br, K}, fopts) : Tensor();
      std::vector<uint8_t> keep(drop && need_x ? static_cast<size_t>(br * K) : 0);
      std::vector<float> ts(static_cast<size_t>(br * rp), 0.0f);  // s·t, padding columns stay 0
      std::vector<float> dtf(static_cast<size_t>(br * rp));
      for (int64_t c = c0; c < c1; ++c) {
        float* dBp = dB_part[c].data_ptr<float>();
        float* dAp = dA_part[c].data_ptr<float>();
        for (int64_t ob = nblk * c / nch; ob < nblk * (c + 1) / nch; ++ob) {
          const int64_t o0 = ob * gb, orows = std::min(gb, M - o0);
          for (int64_t i0 = o0; i0 < o0 + orows; i0 += br) {
            const int64_t rows = std::min(br, o0 + orows - i0);
            for (int64_t a = 0; a < rows; ++a)
              for (int64_t k = 0; k < r; ++k) ts[a * rp + k] = sc * static_cast<float>(tp[(i0 + a) * ldt + k]);
            // dy and drop(x) widened into fp32 block scratch once, read twice each below.
            widen_rows<float, kOuterVB>(dyp + i0 * ldy, ldy, rows, N, dyf.data_ptr<float>());
            if (scratch)
              dropout_rows<float>(sd, drop ? thr : 0u, drop ? dscale : 1.0f, i0, rows, K, xp + i0 * sx0, sx0, sx1,
                                  xd.data_ptr<float>(), drop && need_x ? keep.data() : nullptr);
            else
              widen_rows<float, kOuterVB>(xp + i0 * sx0, sx0, rows, K, xd.data_ptr<float>());
            const float* dyb = dyf.data_ptr<float>();
            FASTPEFT_RANK_SWITCH(float, vb, rp, {
              rowvec<float, VB, NV>(rows, N, dyb, N, Bp.data_ptr<float>(), sc, dtf.data(), rp);  // dt = s·dy·B
              acct<float, VB, NV>(rows, N, dyb, N, ts.data(), dBp);                             // dB += dyᵀ·(s·t)
              acct<float, VB, NV>(rows, K, xd.data_ptr<float>(), K, dtf.data(), dAp);          // dAᵀ += drop(x)ᵀ·dt
            });
            if (need_x) {
              S* dxb = dx.data_ptr<S>() + i0 * K;
              if (drop) {  // dx_blk = (dt·A) ⊙ mask/(1-p), masked in fp32 and rounded once
                outer<float, kOuterVB>(rows, K, rp, dtf.data(), rp, 1.0f, Ap.data_ptr<float>(), K, nullptr,
                                       dxf.data_ptr<float>(), K);
                store_rows<S, float, kOuterVB>(dxf.data_ptr<float>(), dxb, rows * K, keep.data(), dscale);
              } else {
                outer<float, kOuterVB>(rows, K, rp, dtf.data(), rp, 1.0f, Ap.data_ptr<float>(), K, nullptr, dxb, K);
              }
            }
          }
          if (blocked) fastpeft::gemm(dy.narrow(0, o0, orows), weight, dx.narrow(0, o0, orows), 1.0, 1.0, cfg.lib);
        }
      }
    });
    dA = fastpeft::sum_parts(dA_part, true, r, x.scalar_type());
    dB = fastpeft::sum_parts(dB_part, false, r, x.scalar_type());
    if (need_x && !blocked) fastpeft::gemm(dy, weight, dx, 1.0, 1.0, cfg.lib);
  }
  if (need_x && M == 0) dx.zero_();
  Tensor dW = need_weight ? at::empty({N, K}, opts) : at::empty({0}, opts);
  if (need_weight) fastpeft::gemm(dy.t(), x, dW, 0.0, 1.0, cfg.lib);
  Tensor db = need_bias ? dy.sum(0) : at::empty({0}, opts);
  return {dx, dW, db, dA, dB};
}


// t = drop(x)·Aᵀ in fp32 (M, rp), by the micro-kernels over row blocks (the mask regenerated,
// never stored), for the "|gemm" configuration when dropout is on or x is strided.
template <typename S>
Tensor lowp_t_pass(const Tensor& x, const Tensor& A, double p, const std::optional<Tensor>& seed) {
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0), rp = padded_rank(r);
  const int vb = rank_vb<float>(rp);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor tf = at::empty({M, rp}, fopts);
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const float dscale = static_cast<float>(1.0 / (1.0 - p));
  const Tensor ATp = pad_cols_f32(A.t(), rp);
  const int64_t br = block_rows(M, K, sizeof(float));
  const int64_t nblk = (M + br - 1) / br;
  const S* xp = x.data_ptr<S>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  fastpeft::parallel_items(nblk, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor xd = at::empty({br, K}, fopts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * br, rows = std::min(br, M - i0);
      dropout_rows<float>(sd, drop ? thr : 0u, drop ? dscale : 1.0f, i0, rows, K, xp + i0 * sx0, sx0, sx1,
                          xd.data_ptr<float>(), nullptr);
      FASTPEFT_RANK_SWITCH(float, vb, rp,
                           rowvec<float, VB, NV>(rows, K, xd.data_ptr<float>(), K, ATp.data_ptr<float>(), 1.0f,
                                                 tf.data_ptr<float>() + i0 * rp, rp));
    }
  });
  return tf;
}

// ---------------------------------------------------------------------------------------------
// "|brgemm" (bf16 / fp16 where brg::ok): every rank-r product per row block on oneDNN's brgemm
// micro-kernels (brgemm.h), reading the S operands as they are, and the frozen GEMMs as whole-M
// library calls that accumulate in place onto what the rank pass wrote:
//   forward   per block: t_blk = drop(x_blk)·Aᵀ; then y = b + s·t·Bᵀ, y += x·Wᵀ.
//   backward  per block: dt_blk = s·dy_blk·B, dBᵀ_c += t_blkᵀ·dy_blk, keep mask, dA_c +=
//             dt_blkᵀ·(x_blk ⊙ keep), dx_blk = (dt_blk·A) ⊙ keep/(1-p); then dx += dy·W.
// Why: the fp32 micro-kernel passes widen x / dy and run 6·M·r·K multiply-adds on FMA units,
// while a bf16 GEMM on AMX runs ~8x faster than fp32: the rank work was compute-bound and cost
// about as much as the frozen GEMMs. On brgemm it is bound by reading x / dy. An in-place
// beta = 1 library GEMM measured no slower than a fresh one (oneDNN bf16), so the frozen GEMM
// accumulating onto the rank pass's output saves a pass over y / dx. Tried and slower: running
// the frozen product on brgemm too, in the same L2 tile as the rank terms (W repacked per call,
// the rank tile written and reloaded: 4.7 vs 3.6 ms forward at 4096×768×768, 2 threads).
// Dropout masks x exactly in S (x, or a zero of its sign; inf / NaN give NaN as x·0 does), the
// 1/(1-p) applied in fp32.

// Rows per row block: an S block of x / dy (~256 KB) in L2, an even count (the VNNI B operands
// pair rows; only the last block can be odd).
int64_t brg_block_rows(int64_t M, int64_t width) {
  const int64_t br = block_rows(M, width, 2);
  return br + (br & 1);
}

// m (R × C) as the VNNI B operand of a product over its R dimension (transpose: mᵀ, over C).
template <typename S>
Tensor vnni_of(const Tensor& m, bool transpose) {
  const int64_t K = transpose ? m.size(1) : m.size(0), N = transpose ? m.size(0) : m.size(1);
  Tensor out = at::empty({(K + 1) / 2, N, 2}, m.options());
  fastpeft::brg::pack_pairs<S>(m.data_ptr<S>(), transpose ? m.stride(1) : m.stride(0),
                               transpose ? m.stride(0) : m.stride(1), K, N, nullptr, out.data_ptr<S>(), N);
  return out;
}

template <typename S>
std::tuple<Tensor, Tensor> lowp_fwd_brg(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& A, const Tensor& B, double scaling, double p,
                                        const std::optional<Tensor>& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0), Kp = K + (K & 1);
  Tensor t = at::empty({M, r}, x.options());
  const bool drop = p > 0.0;
  if (M > 0 && r > 0) {
    const uint32_t sd = drop ? seed_value(seed) : 0u;
    const uint32_t thr = drop ? dropout_threshold(p) : 0u;
    const float dscale = static_cast<float>(1.0 / (1.0 - p));
    const Tensor Av = vnni_of<S>(A, true);  // Aᵀ (K × r)
    const int64_t br = brg_block_rows(M, K);
    const int64_t nblk = (M + br - 1) / br;
    const S* xp = x.data_ptr<S>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    // x masked (or copied: strided, or K odd for the zero pad column) into an S scratch
    const bool scratch = drop || sx1 != 1 || Kp != K;
    fastpeft::parallel_items(nblk, [&](int64_t b0, int64_t b1) {
      std::vector<S> xd(scratch ? static_cast<size_t>(br * Kp) : 0);
      std::vector<uint8_t> keep(drop ? static_cast<size_t>(br * K) : 0);
      std::vector<float> tf(static_cast<size_t>(br * r));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * br, rows = std::min(br, M - i0);
        if (scratch) {
          if (drop) dropout_rows<float, S>(sd, thr, 1.0f, i0, rows, K, nullptr, 0, 0, nullptr, keep.data());
          fastpeft::brg::mask_rows<S>(xp + i0 * sx0, sx0, sx1, rows, K, Kp, drop ? keep.data() : nullptr, xd.data(), Kp);
          fastpeft::brg::mm<S>(rows, r, Kp, xd.data(), Kp, Av.data_ptr<S>(), r, tf.data(), r, false);
        } else {
          fastpeft::brg::mm<S>(rows, r, K, xp + i0 * sx0, sx0, Av.data_ptr<S>(), r, tf.data(), r, false);
        }
        if (drop)
          for (int64_t j = 0; j < rows * r; ++j) tf[j] *= dscale;
        store_rows<S, float, kOuterVB>(tf.data(), t.data_ptr<S>() + i0 * r, rows * r);
      }
      fastpeft::brg::release();
    });
  } else {
    t.zero_();
  }
  Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, t, B.t(), 1.0, scaling)
                                                   : at::mm(t, B.t()).mul_(scaling);
  if (y.numel() > 0) fastpeft::gemm(x, weight.t(), y, 1.0, 1.0, fastpeft::Lib::Aten);
  return {y, t};
}

template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowp_bwd_brg(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
    const Tensor& t_in, double scaling, double p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  // Np: N pair-padded (dy as an A operand); rr: the rank padded with zero columns to a multiple of
  // 32, AMX's bf16 tile depth, for dx's product over the rank.
  const int64_t Np = N + (N & 1), rr = (r + 31) / 32 * 32;
  const auto opts = x.options();
  const auto fopts = opts.dtype(at::kFloat);
  const Tensor dy = dy_in.stride(1) == 1 ? dy_in : dy_in.contiguous();
  const Tensor t = t_in.is_contiguous() ? t_in : t_in.contiguous();
  const bool drop = p > 0.0;
  const uint32_t sd = drop ? seed_value(seed) : 0u;
  const uint32_t thr = drop ? dropout_threshold(p) : 0u;
  const float dscale = static_cast<float>(1.0 / (1.0 - p));
  const float sc = static_cast<float>(scaling);

  // The rank pass writes every row of dx, then dy·W accumulates onto it in place.
  Tensor dx = need_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  Tensor dA, dB;
  if (M == 0 || r == 0 || K == 0) {
    if (need_x) dx.zero_();
    dA = at::zeros({r, K}, opts);
    dB = at::zeros({N, r}, opts);
  } else {
    const int64_t br = brg_block_rows(M, std::max(K, N));
    const int64_t nblk = (M + br - 1) / br;
    const int64_t nch = num_chunks(nblk);
    Tensor dA_part = at::zeros({nch, r, K}, fopts);
    Tensor dBT_part = at::zeros({nch, r, N}, fopts);
    const Tensor Bv = vnni_of<S>(B, false);                                                      // B (N × r)
    const Tensor Av = vnni_of<S>(rr == r ? A : at::constant_pad_nd(A, {0, 0, 0, rr - r}), false);  // A (rr × K)
    const S* dyp = dy.data_ptr<S>();
    const S* tp = t.data_ptr<S>();
    const S* xp = x.data_ptr<S>();
    const int64_t ldy = dy.stride(0), sx0 = x.stride(0), sx1 = x.stride(1);
    const int64_t bp = br + 1;  // pair-padded rows of a block
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      std::vector<S> dypad(Np != N ? static_cast<size_t>(br * Np) : 0);
      std::vector<S> dyv(static_cast<size_t>(bp * N));
      std::vector<S> xv(static_cast<size_t>(bp * K));
      std::vector<uint8_t> keep(drop ? static_cast<size_t>(br * K) : 0);
      std::vector<float> dtf(static_cast<size_t>(br * r));
      std::vector<S> dtb(static_cast<size_t>(br * rr), S(0.0f));  // dt rows, pad columns 0
      std::vector<S> dtT(static_cast<size_t>(r * bp));            // dtᵀ, pad column 0
      std::vector<S> tT(static_cast<size_t>(r * bp));             // tᵀ, pad column 0
      std::vector<float> tmp(need_x ? static_cast<size_t>(br * K) : 0);
      for (int64_t c = c0; c < c1; ++c) {
        float* dAp = dA_part[c].data_ptr<float>();
        float* dBp = dBT_part[c].data_ptr<float>();
        for (int64_t b = nblk * c / nch; b < nblk * (c + 1) / nch; ++b) {
          const int64_t i0 = b * br, rows = std::min(br, M - i0), rows2 = rows + (rows & 1);
          const S* dyb = dyp + i0 * ldy;
          const S* dya = dyb;
          int64_t ldya = ldy;
          if (Np != N) {
            fastpeft::brg::mask_rows<S>(dyb, ldy, 1, rows, N, Np, nullptr, dypad.data(), Np);
            dya = dypad.data();
            ldya = Np;
          }
          // dt = s·dy·B, rounded once; the transposes copy bits
          fastpeft::brg::mm<S>(rows, r, Np, dya, ldya, Bv.data_ptr<S>(), r, dtf.data(), r, false);
          for (int64_t j = 0; j < rows * r; ++j) dtf[j] *= sc;
          for (int64_t a = 0; a < rows; ++a) store_rows<S, float, kOuterVB>(dtf.data() + a * r, dtb.data() + a * rr, r);
          {
            const uint16_t* d16 = reinterpret_cast<const uint16_t*>(dtb.data());
            const uint16_t* t16 = reinterpret_cast<const uint16_t*>(tp + i0 * r);
            uint16_t* dT = reinterpret_cast<uint16_t*>(dtT.data());
            uint16_t* tTp = reinterpret_cast<uint16_t*>(tT.data());
            for (int64_t k = 0; k < r; ++k)
              for (int64_t a = 0; a < rows; ++a) {
                dT[k * rows2 + a] = d16[a * rr + k];
                tTp[k * rows2 + a] = t16[a * r + k];
              }
            if (rows2 != rows)
              for (int64_t k = 0; k < r; ++k) dT[k * rows2 + rows] = tTp[k * rows2 + rows] = 0;
          }
          // dBᵀ += tᵀ·dy
          fastpeft::brg::pack_pairs<S>(dyb, ldy, 1, rows, N, nullptr, dyv.data(), N);
          fastpeft::brg::mm<S>(r, N, rows2, tT.data(), rows2, dyv.data(), N, dBp, N, true);
          // dA += dtᵀ·(x ⊙ keep)
          if (drop) dropout_rows<float, S>(sd, thr, 1.0f, i0, rows, K, nullptr, 0, 0, nullptr, keep.data());
          fastpeft::brg::pack_pairs<S>(xp + i0 * sx0, sx0, sx1, rows, K, drop ? keep.data() : nullptr, xv.data(), K);
          fastpeft::brg::mm<S>(r, K, rows2, dtT.data(), rows2, xv.data(), K, dAp, K, true);
          if (need_x) {  // dx_blk = (dt·A) ⊙ keep/(1-p), rounded once
            fastpeft::brg::mm<S>(rows, K, rr, dtb.data(), rr, Av.data_ptr<S>(), K, tmp.data(), K, false);
            store_rows<S, float, kOuterVB>(tmp.data(), dx.data_ptr<S>() + i0 * K, rows * K,
                                           drop ? keep.data() : nullptr, dscale);
          }
        }
      }
      fastpeft::brg::release();
    });
    dA = fastpeft::sum_parts(dA_part, false, K, x.scalar_type(), drop ? dscale : 1.0);
    dB = fastpeft::sum_parts(dBT_part, true, N, x.scalar_type(), sc);
  }
  if (need_x) fastpeft::gemm(dy, weight, dx, 1.0, 1.0, fastpeft::Lib::Aten);
  Tensor dW = need_weight ? at::mm(dy.t(), x) : at::empty({0}, opts);
  Tensor db = need_bias ? dy.sum(0) : at::empty({0}, opts);
  return {dx, dW, db, dA, dB};
}

// "|gemm": the frozen GEMM first (beta = 0: accumulating into a bf16 output costs the library an
// extra pass), then y += s·t·Bᵀ as one more whole-M GEMM.
template <typename S>
std::tuple<Tensor, Tensor> lowp_fwd_gemm(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         const Tensor& A, const Tensor& B, double scaling, double p,
                                         const std::optional<Tensor>& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t r = A.size(0);
  const Tensor t = (p > 0.0 || x.stride(1) != 1) ? lowp_t_pass<S>(x, A, p, seed).narrow(1, 0, r).to(x.scalar_type())
                                                 : at::mm(x, A.t());
  Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (y.numel() > 0) y.addmm_(t, B.t(), 1.0, scaling);
  return {y, t};
}

template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowp_bwd_gemm(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
    const Tensor& t, double scaling, double p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0), rp = padded_rank(r);
  const auto opts = x.options();
  const Tensor dy = dy_in.stride(1) == 1 ? dy_in : dy_in.contiguous();
  const Tensor dt = at::mm(dy, B).mul_(scaling);      // (M, r), rounded to S as in eager
  Tensor dB = at::mm(dy.t(), t).mul_(scaling);         // (N, r)
  Tensor dx = need_x ? at::mm(dy, weight) : at::empty({0}, opts);
  Tensor dA;
  const bool drop = p > 0.0;
  if (!drop && x.stride(1) == 1) {
    dA = at::mm(dt.t(), x);
    if (need_x && dx.numel() > 0) dx.addmm_(dt, A);
  } else if (M == 0) {
    dA = at::zeros({r, K}, opts);
  } else {
    // dAᵀ += drop(x)ᵀ·dt and dx += (dt·A) ⊙ mask/(1-p) per row block, the mask regenerated.
    const int vb = rank_vb<float>(rp);
    const auto fopts = opts.dtype(at::kFloat);
    const uint32_t sd = drop ? seed_value(seed) : 0u;
    const uint32_t thr = drop ? dropout_threshold(p) : 0u;
    const float dscale = static_cast<float>(1.0 / (1.0 - p));
    const int64_t br = block_rows(M, K, sizeof(float));
    const int64_t nblk = (M + br - 1) / br;
    const int64_t nch = num_chunks(nblk);
    Tensor dA_part = at::zeros({nch, K, rp}, fopts);
    const Tensor Ap = pad_cols_f32(A.t(), rp).t().contiguous();  // (rp, K)
    const S* xp = x.data_ptr<S>();
    const S* dtp = dt.data_ptr<S>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor xd = at::empty({br, K}, fopts);
      Tensor dxf = need_x ? at::empty({br, K}, fopts) : Tensor();
      std::vector<uint8_t> keep(need_x ? static_cast<size_t>(br * K) : 0);
      std::vector<float> dtf(static_cast<size_t>(br * rp), 0.0f);  // padding columns stay 0
      for (int64_t c = c0; c < c1; ++c) {
        float* dAp = dA_part[c].data_ptr<float>();
        for (int64_t b = nblk * c / nch; b < nblk * (c + 1) / nch; ++b) {
          const int64_t i0 = b * br, rows = std::min(br, M - i0);
          for (int64_t a = 0; a < rows; ++a)
            for (int64_t k = 0; k < r; ++k) dtf[a * rp + k] = static_cast<float>(dtp[(i0 + a) * r + k]);
          dropout_rows<float>(sd, drop ? thr : 0u, drop ? dscale : 1.0f, i0, rows, K, xp + i0 * sx0, sx0, sx1,
                              xd.data_ptr<float>(), need_x ? keep.data() : nullptr);
          FASTPEFT_RANK_SWITCH(float, vb, rp,
                               acct<float, VB, NV>(rows, K, xd.data_ptr<float>(), K, dtf.data(), dAp));
          if (need_x) {
            outer<float, kOuterVB>(rows, K, rp, dtf.data(), rp, 1.0f, Ap.data_ptr<float>(), K, nullptr,
                                   dxf.data_ptr<float>(), K);
            add_rows<S, float, kOuterVB>(dxf.data_ptr<float>(), dx.data_ptr<S>() + i0 * K, rows * K,
                                         drop ? keep.data() : nullptr, drop ? dscale : 1.0f);
          }
        }
      }
    });
    dA = fastpeft::sum_parts(dA_part, true, r, x.scalar_type());
  }
  Tensor dW = need_weight ? at::mm(dy.t(), x) : at::empty({0}, opts);
  Tensor db = need_bias ? dy.sum(0) : at::empty({0}, opts);
  return {dx, dW, db, dA, dB};
}

// Shape class of a call, for tune.h (with the libraries allowed: a FASTPEFT_CPU_GEMM or
// torch.backends.mkldnn change is a new class).
std::string tune_key(const char* op, const Tensor& x, int64_t M, int64_t K, int64_t N, int64_t r, double p,
                     const std::vector<Cfg>& cands) {
  bool aten = false, dnn = false;
  for (const auto& c : cands) (c.lib == fastpeft::Lib::OneDnn ? dnn : aten) = true;
  return std::string(op) + " " + c10::toString(x.scalar_type()) + " M~" + std::to_string(fastpeft::row_class(M)) +
         " K=" + std::to_string(K) + " N=" + std::to_string(N) + " r=" + std::to_string(r) + (p > 0.0 ? " drop" : "") +
         " threads=" + std::to_string(at::get_num_threads()) + (aten ? " aten" : "") + (dnn ? " onednn" : "");
}

std::vector<std::string> names_of(const std::vector<Cfg>& cands) {
  std::vector<std::string> n;
  for (const auto& c : cands) n.push_back(c.name());
  return n;
}

// ---------------------------------------------------------------------------------------------
// fp32 / fp64: the tuned configuration for this shape class (obey_forced: see tune.h).
std::tuple<Tensor, Tensor> fwd_tuned(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                     const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                     const std::optional<Tensor>& seed, bool obey_forced) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_fwd", [&] {
    const auto cands = candidates<scalar_t>(x.scalar_type(), r);
    auto run = [&](int i) { return fwd_impl<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, cands[i]); };
    const int pick = fastpeft::tuned_choice(tune_key("lora_fwd", x, M, K, N, r, dropout_p, cands), names_of(cands),
                                            static_cast<double>(M) * K * N, [&](int i) { run(i); }, obey_forced);
    out = run(pick);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_tuned(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& t, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias, bool obey_forced) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_bwd", [&] {
    const auto cands = candidates<scalar_t>(x.scalar_type(), r);
    auto run = [&](int i) {
      return bwd_impl<scalar_t>(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x, need_weight,
                                need_bias, cands[i]);
    };
    // need_x / need_weight change the work: part of the shape class.
    std::string key = tune_key("lora_bwd", x, M, K, N, r, dropout_p, cands) + (need_x ? " dx" : "") +
                      (need_weight ? " dW" : "");
    const double work = static_cast<double>(M) * K * N * ((need_x ? 1 : 0) + (need_weight ? 1 : 0));
    const int pick = fastpeft::tuned_choice(key, names_of(cands), work, [&](int i) { run(i); }, obey_forced);
    out = run(pick);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> lora_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                    const std::optional<Tensor>& seed) {
  check_2d("x", x);
  check_2d("weight", weight);
  check_2d("lora_A", lora_A);
  check_2d("lora_B", lora_B);
  TORCH_CHECK(x.device().is_cpu(), "lora_fwd (C++ backend): expected CPU tensors, got ", x.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_fwd: dropout_p must be in [0, 1), got ", dropout_p);
  if (x.size(1) == 0) {  // K = 0: y = b (or 0), t = 0; x has no data for the blocked pass to read
    Tensor y = at::zeros({x.size(0), weight.size(0)}, x.options());
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    return {y, at::zeros({x.size(0), lora_A.size(0)}, x.options())};
  }
  if (!is_half(x)) return fwd_tuned(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, true);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const auto st = x.scalar_type();
  const auto cands = lowp_candidates(st, r);
  auto run = [&](int i) -> std::tuple<Tensor, Tensor> {
    if (cands[i].upcast) {
      auto [y, t] = fwd_tuned(to_f32(x), to_f32(weight), opt_f32(bias), to_f32(lora_A), to_f32(lora_B), scaling,
                              dropout_p, seed, false);
      return {y.to(st), t.to(st)};
    }
    std::tuple<Tensor, Tensor> out;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "lora_fwd", [&] {
      out = cands[i].brg ? lowp_fwd_brg<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
            : cands[i].gemm_rank
                ? lowp_fwd_gemm<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
                : lowp_fwd_impl<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, cands[i]);
    });
    return out;
  };
  const int pick = fastpeft::tuned_choice(tune_key("lora_fwd", x, M, K, N, r, dropout_p, cands), names_of(cands),
                                          static_cast<double>(M) * K * N, [&](int i) { run(i); });
  return run(pick);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& t, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool need_x,
    bool need_weight, bool need_bias) {
  check_2d("dy", dy);
  check_2d("x", x);
  check_2d("weight", weight);
  check_2d("lora_A", lora_A);
  check_2d("lora_B", lora_B);
  check_2d("t", t);
  TORCH_CHECK(x.device().is_cpu(), "lora_bwd (C++ backend): expected CPU tensors, got ", x.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_bwd: dropout_p must be in [0, 1), got ", dropout_p);
  if (!is_half(x))
    return bwd_tuned(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x, need_weight, need_bias, true);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const auto st = x.scalar_type();
  const auto cands = lowp_candidates(st, r);
  using Out = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  auto run = [&](int i) -> Out {
    if (cands[i].upcast) {
      auto [dx, dW, db, dA, dB] = bwd_tuned(to_f32(dy), to_f32(x), to_f32(weight), to_f32(lora_A), to_f32(lora_B),
                                            to_f32(t), scaling, dropout_p, seed, need_x, need_weight, need_bias, false);
      return {dx.to(st), dW.to(st), db.to(st), dA.to(st), dB.to(st)};
    }
    Out out;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "lora_bwd", [&] {
      out = cands[i].brg
                ? lowp_bwd_brg<scalar_t>(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x,
                                         need_weight, need_bias)
            : cands[i].gemm_rank
                ? lowp_bwd_gemm<scalar_t>(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x,
                                          need_weight, need_bias)
                : lowp_bwd_impl<scalar_t>(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x,
                                          need_weight, need_bias, cands[i]);
    });
    return out;
  };
  std::string key = tune_key("lora_bwd", x, M, K, N, r, dropout_p, cands) + (need_x ? " dx" : "") +
                    (need_weight ? " dW" : "");
  const double work = static_cast<double>(M) * K * N * ((need_x ? 1 : 0) + (need_weight ? 1 : 0));
  const int pick = fastpeft::tuned_choice(key, names_of(cands), work, [&](int i) { run(i); });
  return run(pick);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
        &lora_fwd);
  m.def("lora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, float scaling, "
        "float dropout_p, Tensor? seed, bool need_x, bool need_weight, bool need_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &lora_bwd);
}
