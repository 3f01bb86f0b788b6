// Fused bottleneck adapter for CPU tensors (family "adapter"; see fastpeft/ops/adapter.py):
//
//   z = x·Wdᵀ + bd                                  (M, m) pre-activation, returned (saved for bwd)
//   y = R + scale ⊙ (drop(act(z))·Wuᵀ + bu)         (M, d), R = x or the given residual
//
// Row-blocked: blocks of BR rows (about 1.5 MiB of x) are split into one contiguous chunk of
// blocks per thread (a fixed split: chunk c = blocks [nblk·c/nch, nblk·(c+1)/nch)); GEMMs on a
// block are single-threaded: ATen or oneDNN GEMMs written into slices of z / y / dx in place
// (gemm.h), or the micro-kernels of rank_kernels.h when m fills whole vectors; which one is
// timed per shape class at run time (Path below, tune.h).
// The scale is folded into the up weight once per call (Wus = diag(scale)·Wu, c = scale ⊙ bu),
// unless an entry of scale is ±inf or NaN: then the forward computes u = h·Wuᵀ + bu first and
// y = R + scale ⊙ u, the reference's order (folded, inf·Wu summed over m gives NaN where the
// reference has ±inf).
// Forward, per block: z_blk = bd + x_blk·Wdᵀ, h = drop(act(z_blk)), y_blk = R_blk + c while
// R_blk (usually x_blk, just read) is in cache, y_blk += h·Wusᵀ accumulated in place; so x and
// y are each streamed once and the bottleneck never leaves the block's scratch.
// Backward, per block: recompute h = act(z) and the mask, dh = dy·Wus, dz = dh ⊙ act'(z), the
// weight-gradient GEMMs into per-chunk accumulators, colsum(dy), dx_blk = dy_blk (the
// residual's gradient) + dz·Wd accumulated in place. The chunk partials are summed in chunk
// order after the pass: with the fixed split, the gradients are bit-identical from call to
// call for a given thread count (a dynamic hand-out of blocks, used before, summed them in an
// order that changed from call to call).
// Backward recomputes act(z) and the dropout mask from z (nothing else is saved).
// fp32/fp64 compute natively; bf16/fp16: see "bf16 / fp16" below (whole-M low-precision GEMMs,
// fp32 bottleneck math; "upcast" to fp32 a timed configuration where the CPU lacks them).
// Measured: `python -m fastpeft bench --op adapter` (README).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "rank_kernels.h"
#include "tune.h"

namespace {

using at::Tensor;
using namespace fastpeft::rk;

enum class Act { Relu, Gelu, GeluTanh, Silu, Identity };

Act parse_act(const std::string& a) {
  if (a == "relu") return Act::Relu;
  if (a == "gelu") return Act::Gelu;
  if (a == "gelu_tanh") return Act::GeluTanh;
  if (a == "silu") return Act::Silu;
  if (a == "identity") return Act::Identity;
  TORCH_CHECK(false, "adapter: unknown activation '", a, "'; expected relu, gelu, gelu_tanh, silu or identity");
}

// h = act(z) for a block; vectorised ATen kernels (run single-threaded inside a parallel region).
void act_fwd(Act act, Tensor& h, const Tensor& z) {
  switch (act) {
    case Act::Relu: at::clamp_min_out(h, z, 0); break;
    case Act::Gelu: at::gelu_out(h, z, "none"); break;
    case Act::GeluTanh: at::gelu_out(h, z, "tanh"); break;
    case Act::Silu: at::silu_out(h, z); break;
    case Act::Identity: h.copy_(z); break;
  }
}

// dz = dh ⊙ act'(z) for a block.
void act_bwd(Act act, Tensor& dz, const Tensor& dh, const Tensor& z) {
  switch (act) {
    case Act::Relu: at::threshold_backward_out(dz, dh, z, 0); break;
    case Act::Gelu: at::gelu_backward_out(dz, dh, z, "none"); break;
    case Act::GeluTanh: at::gelu_backward_out(dz, dh, z, "tanh"); break;
    case Act::Silu: at::silu_backward_out(dz, dh, z); break;
    case Act::Identity: dz.copy_(dh); break;
  }
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0, threshold = 0;
  double inv_keep = 1.0;
};

Dropout make_dropout(double p, const c10::optional<Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "adapter: dropout_p must be in [0, 1), got ", p);  // NaN too
  Dropout d;
  if (p > 0.0 && seed.has_value() && seed->defined()) {
    d.on = true;
    d.seed = static_cast<uint32_t>(seed->item<int64_t>());
    // Same rounding as fastpeft._dropout.threshold: min(round(p * 2**32), 2**32 - 1).
    double t = std::nearbyint(p * 4294967296.0);
    d.threshold = t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
    d.inv_keep = 1.0 / (1.0 - p);
  }
  return d;
}

// mult[i*m + j] = keep(row0+i, j) / (1-p) or 0, for a block of rows; the same multiplier
// serves the forward mask on h and the backward mask on dh.
template <typename T>
void dropout_mult(const Dropout& dp, T* mult, int64_t row0, int64_t rows, int64_t m) {
  const T inv = static_cast<T>(dp.inv_keep);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t base = (row0 + i) * m;
    T* mr = mult + i * m;
    for (int64_t j = 0; j < m; ++j) mr[j] = fastpeft::dropout_keep(dp.seed, dp.threshold, base + j) ? inv : T(0);
  }
}

template <typename T>
void mul_inplace(T* a, const T* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] *= b[i];
}

// Rows per block: a block of x (and of y / dy) of about 1.5 MiB stays in L2 (1-2 MiB per core
// on current x86) through every step; no more rows than give each thread one block.
int64_t block_rows(int64_t M, int64_t d, int64_t elem, int nth) {
  // FASTPEFT_ADAPTER_BR overrides (tests use tiny blocks to cover many blocks and tails).
  if (const char* e = std::getenv("FASTPEFT_ADAPTER_BR")) return std::max(1, std::atoi(e));
  int64_t br = (3 * 512 * 1024) / std::max<int64_t>(1, d * elem);
  br = std::max<int64_t>(16, std::min<int64_t>(1024, br));
  // Balanced: a block count that is a multiple of the thread count, so each thread's fixed chunk
  // has the same number of near-equal blocks (11 blocks split 5/6 left a thread idle 1/6 of it).
  int64_t nblk = std::max<int64_t>(1, (M + br - 1) / br);
  nblk = (nblk + nth - 1) / nth * nth;
  return std::max<int64_t>(1, (M + nblk - 1) / nblk);
}


// Runs body(chunk, block) over blocks 0..nblk-1 split into nch fixed contiguous chunks: chunk c
// is blocks [nblk·c/nch, nblk·(c+1)/nch), run in block order by one thread. Per-chunk scratch
// and accumulators are indexed by c (not by the OS thread id, which can differ when this runs
// nested in another parallel region), so what each accumulator sums, and in which order,
// depends only on nch.
template <typename F>
void for_chunks(int64_t nblk, int64_t nch, const F& body) {
  if (nblk <= 0) return;
  fastpeft::parallel_items(nch, [&](int64_t c0, int64_t c1) {
    at::NoGradGuard no_grad;
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t b = nblk * c / nch; b < nblk * (c + 1) / nch; ++b) body(static_cast<int>(c), b);
  });
}

int64_t num_chunks(int64_t nblk, int nth) { return std::max<int64_t>(1, std::min<int64_t>(nth, nblk)); }

template <typename T>
bool all_finite(const Tensor& t) {  // t contiguous
  const T* p = t.data_ptr<T>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

Tensor to_compute(const Tensor& t, at::ScalarType ct) {
  return t.detach().to(ct).contiguous();
}

// How a block's skinny products (one dimension is the bottleneck m) are computed: a GEMM
// library per block (gemm.h), or the register-blocked kernels of rank_kernels.h, which take m
// as their "rank" when m fills whole vectors (m = 16, 32, 64, 128 in fp32 with AVX-512). Which
// is fastest depends on the CPU and the shape: chosen by timing (tune.h).
enum class Path { Aten, OneDnn, Micro };

const char* path_name(Path p) { return p == Path::Micro ? "micro" : p == Path::OneDnn ? "onednn" : "aten"; }

fastpeft::Lib lib_of(Path p) { return p == Path::OneDnn ? fastpeft::Lib::OneDnn : fastpeft::Lib::Aten; }

template <typename T>
bool micro_ok(int64_t m) { return rank_vb<T>(m) != 0 && m <= kOuterMaxRank; }

// The paths allowed here (FASTPEFT_CPU_GEMM, oneDNN availability), the default one first.
template <typename T>
std::vector<Path> adapter_paths(at::ScalarType st, int64_t m) {
  const auto libs = fastpeft::allowed_libs(st);
  std::vector<Path> out;
  if (libs.aten) out.push_back(Path::Aten);
  if (libs.onednn) out.push_back(Path::OneDnn);
  if (micro_ok<T>(m)) out.push_back(Path::Micro);
  return out;
}

std::vector<std::string> path_names(const std::vector<Path>& ps) {
  std::vector<std::string> n;
  for (auto p : ps) n.push_back(path_name(p));
  return n;
}

std::string adapter_key(const char* op, const Tensor& x, int64_t M, int64_t d, int64_t m, const std::string& act,
                        bool drop, const std::vector<Path>& ps) {
  std::string k = std::string(op) + " " + c10::toString(x.scalar_type()) + " M~" +
                  std::to_string(fastpeft::row_class(M)) + " d=" + std::to_string(d) + " m=" + std::to_string(m) +
                  " " + act + (drop ? " drop" : "") + " threads=" + std::to_string(at::get_num_threads()) + " [";
  for (size_t i = 0; i < ps.size(); ++i) k += (i ? "," : "") + std::string(path_name(ps[i]));
  return k + "]";
}


// ----------------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor> fwd_impl(const Tensor& x, const Tensor& Wd, const c10::optional<Tensor>& bd,
                                    const Tensor& Wu, const c10::optional<Tensor>& bu, const Tensor& scale,
                                    const c10::optional<Tensor>& residual, Act act, const Dropout& dp, Path path) {
  const int64_t M = x.size(0), d = x.size(1), m = Wd.size(0);
  const fastpeft::Lib lib = lib_of(path);
  const bool micro = path == Path::Micro;
  auto opts = x.options();
  Tensor z = at::empty({M, m}, opts);
  Tensor y = at::empty({M, d}, opts);
  if (M == 0) return {y, z};
  // Fold the scale into the up-projection: Wus = diag(scale)·Wu (d, m), c = scale ⊙ bu; with a
  // non-finite scale entry, keep u = h·Wuᵀ + bu whole and scale it after (see the header).
  const bool fold = all_finite<T>(scale);
  const bool has_bu = bu.has_value() && bu->defined();
  Tensor Wus = fold ? (Wu * scale.unsqueeze(1)).contiguous() : Wu;
  Tensor WusT = Wus.t();                     // (m, d) view for h·Wusᵀ
  Tensor c = has_bu ? (fold ? (scale * *bu).contiguous() : *bu) : at::zeros({d}, opts);
  Tensor WdT = micro ? Wd.t().contiguous() : Wd.t();   // (d, m)
  Tensor WusTc = micro ? WusT.contiguous() : Tensor();  // (m, d) rows for the micro-kernel
  const int vb = micro ? rank_vb<T>(m) : 0;
  const bool has_bd = bd.has_value() && bd->defined();
  const T* bdp = has_bd ? bd->data_ptr<T>() : nullptr;
  const Tensor R = residual.has_value() && residual->defined() ? *residual : x;
  const T* Rp = R.data_ptr<T>();
  const T* cp = c.data_ptr<T>();
  const T* sp = scale.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* zp = z.data_ptr<T>();
  const int nth = std::max(1, at::get_num_threads());
  const int64_t BR = block_rows(M, d, sizeof(T), nth);
  const int64_t nblk = (M + BR - 1) / BR;
  const int64_t nch = num_chunks(nblk, nth);
  // Per-chunk scratch: the bottleneck activation h and the dropout multipliers of one block.
  std::vector<Tensor> h_t(nch), mult_t(nch);
  for (int64_t i = 0; i < nch; ++i) {
    h_t[i] = at::empty({BR, m}, opts);
    if (dp.on) mult_t[i] = at::empty({BR, m}, opts);
  }
  for_chunks(nblk, nch, [&](int ch, int64_t b) {
    const int64_t r0 = b * BR, nr = std::min(BR, M - r0);
    Tensor xb = x.narrow(0, r0, nr), zb = z.narrow(0, r0, nr), hb = h_t[ch].narrow(0, 0, nr);
    // z_blk = bd + x_blk·Wdᵀ (bias rows written first, the GEMM accumulates onto them).
    if (has_bd) {
      for (int64_t i = 0; i < nr; ++i) std::copy(bdp, bdp + m, zp + (r0 + i) * m);
    }
    if (micro) {
      T* zr = zp + r0 * m;
      FASTPEFT_RANK_SWITCH(T, vb, m, rowvec<T, VB, NV>(nr, d, xb.data_ptr<T>(), x.stride(0), WdT.data_ptr<T>(),
                                                       T(1), zr, m));
      if (has_bd)
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < m; ++j) zr[i * m + j] += bdp[j];
    } else {
      fastpeft::gemm(xb, WdT, zb, has_bd ? 1.0 : 0.0, 1.0, lib);
    }
    act_fwd(act, hb, zb);
    if (dp.on) {
      T* mp = mult_t[ch].data_ptr<T>();
      dropout_mult<T>(dp, mp, r0, nr, m);
      mul_inplace<T>(hb.data_ptr<T>(), mp, nr * m);
    }
    Tensor yb = y.narrow(0, r0, nr);
    if (fold && micro) {
      // y_blk = R_blk + c + h·Wusᵀ, each element of y written once.
      outer<T, kOuterVB>(nr, d, m, hb.data_ptr<T>(), m, T(1), WusTc.data_ptr<T>(), d, cp, yp + r0 * d, d,
                         Rp + r0 * d, d);
    } else if (fold) {
      // y_blk = R_blk + c while R_blk (often x_blk, just read) is still in cache ...
      for (int64_t i = 0; i < nr; ++i) {
        const T* rr = Rp + (r0 + i) * d;
        T* yr = yp + (r0 + i) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) yr[j] = rr[j] + cp[j];
      }
      // ... then y_blk += h·Wusᵀ accumulates in place.
      fastpeft::gemm(hb, WusT, yb, 1.0, 1.0, lib);
    } else {
      // u_blk = bu + h·Wuᵀ, then y_blk = R_blk + scale ⊙ u_blk.
      for (int64_t i = 0; i < nr; ++i) std::copy(cp, cp + d, yp + (r0 + i) * d);
      fastpeft::gemm(hb, WusT, yb, 1.0, 1.0, lib);
      for (int64_t i = 0; i < nr; ++i) {
        const T* rr = Rp + (r0 + i) * d;
        T* yr = yp + (r0 + i) * d;
        for (int64_t j = 0; j < d; ++j) yr[j] = rr[j] + sp[j] * yr[j];
      }
    }
  });
  return {y, z};
}

// Sum of the per-chunk partials part[0..nch) in chunk order (elementwise adds: the same
// result on every call).
Tensor sum_chunks(const Tensor& part) {
  Tensor acc = part[0].clone();
  for (int64_t c = 1; c < part.size(0); ++c) acc.add_(part[c]);
  return acc;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    const Tensor& dy, const Tensor& x, const Tensor& Wd, const Tensor& Wu, const c10::optional<Tensor>& bu,
    const Tensor& z, const Tensor& scale, Act act, const Dropout& dp, bool residual_is_x, bool need_x,
    bool need_scale, Path path) {
  const int64_t M = x.size(0), d = x.size(1), m = Wd.size(0);
  const fastpeft::Lib lib = lib_of(path);
  const bool micro = path == Path::Micro;
  const int vb = micro ? rank_vb<T>(m) : 0;
  auto opts = x.options();
  Tensor dx = need_x ? at::empty({M, d}, opts) : at::empty({0}, opts);
  Tensor Wus = (Wu * scale.unsqueeze(1)).contiguous();   // (d, m): dh = dy·Wus
  const int nth = std::max(1, at::get_num_threads());
  const int64_t BR = block_rows(M, d, sizeof(T), nth);
  const int64_t nblk = M == 0 ? 0 : (M + BR - 1) / BR;
  const int64_t nch = num_chunks(nblk, nth);
  // Per-chunk accumulators: Gᵀ = hᵀ·dy (m, d), s = colsum(dy) (d,), dWd = dzᵀ·x (m, d), dbd (m,).
  // The GEMM ones are written (beta 0) by the chunk's first block, the others start at zero.
  // The micro-kernels accumulate the transposes, G (d, m) and dWdᵀ (d, m), from zero.
  Tensor GT_t = micro ? at::zeros({nch, d, m}, opts) : at::empty({nch, m, d}, opts);
  Tensor dWd_t = micro ? at::zeros({nch, d, m}, opts) : at::empty({nch, m, d}, opts);
  Tensor s_t = at::zeros({nch, d}, opts), dbd_t = at::zeros({nch, m}, opts);
  const T* dyp = dy.data_ptr<T>();

  std::vector<Tensor> h_t(nch), dh_t(nch), dz_t(nch), mult_t(nch);
  for (int64_t i = 0; i < nch; ++i) {
    h_t[i] = at::empty({BR, m}, opts); dh_t[i] = at::empty({BR, m}, opts); dz_t[i] = at::empty({BR, m}, opts);
    if (dp.on) mult_t[i] = at::empty({BR, m}, opts);
  }
  for_chunks(nblk, nch, [&](int ch, int64_t b) {
    const double beta = b == nblk * ch / nch ? 0.0 : 1.0;  // the chunk's first block overwrites
    T* sp = s_t[ch].data_ptr<T>();
    T* dbdp = dbd_t[ch].data_ptr<T>();
    const int64_t r0 = b * BR, nr = std::min(BR, M - r0);
    Tensor xb = x.narrow(0, r0, nr), zb = z.narrow(0, r0, nr), dyb = dy.narrow(0, r0, nr);
    Tensor hb = h_t[ch].narrow(0, 0, nr), dhb = dh_t[ch].narrow(0, 0, nr), dzb = dz_t[ch].narrow(0, 0, nr);
    act_fwd(act, hb, zb);                                   // recompute h = act(z)
    if (micro) {
      FASTPEFT_RANK_SWITCH(T, vb, m, rowvec<T, VB, NV>(nr, d, dyb.data_ptr<T>(), d, Wus.data_ptr<T>(), T(1),
                                                       dhb.data_ptr<T>(), m));  // dh = dy·Wus
    } else {
      fastpeft::gemm(dyb, Wus, dhb, 0.0, 1.0, lib);         // dh = dy·Wus   (nr, m)
    }
    if (dp.on) {
      T* mp = mult_t[ch].data_ptr<T>();
      dropout_mult<T>(dp, mp, r0, nr, m);
      mul_inplace<T>(hb.data_ptr<T>(), mp, nr * m);
      mul_inplace<T>(dhb.data_ptr<T>(), mp, nr * m);
    }
    act_bwd(act, dzb, dhb, zb);                             // dz = dh ⊙ act'(z)
    if (micro) {
      FASTPEFT_RANK_SWITCH(T, vb, m, {
        acct<T, VB, NV>(nr, d, dyb.data_ptr<T>(), d, hb.data_ptr<T>(), GT_t[ch].data_ptr<T>());   // G += dyᵀ·h
        acct<T, VB, NV>(nr, d, xb.data_ptr<T>(), d, dzb.data_ptr<T>(), dWd_t[ch].data_ptr<T>());  // dWdᵀ += xᵀ·dz
      });
    } else {
      fastpeft::gemm(hb.t(), dyb, GT_t[ch], beta, 1.0, lib);   // Gᵀ (+)= hᵀ·dy    (m, d)
      fastpeft::gemm(dzb.t(), xb, dWd_t[ch], beta, 1.0, lib);  // dWd (+)= dzᵀ·x   (m, d)
    }
    const T* dzp = dzb.data_ptr<T>();
    for (int64_t i = 0; i < nr; ++i) {
      const T* zr = dzp + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) dbdp[j] += zr[j];
    }
    // One pass over the dy block: colsum(dy), and dx_blk = dy_blk (sequential adapter: the
    // residual's gradient) that the GEMM below accumulates onto while it is in cache.
    T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
    const bool copy_dy = need_x && residual_is_x && !micro;
    for (int64_t i = 0; i < nr; ++i) {
      const T* dr = dyp + (r0 + i) * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) sp[j] += dr[j];
      if (copy_dy) std::copy(dr, dr + d, dxp + (r0 + i) * d);
    }
    if (need_x && micro) {  // dx_blk = (dy_blk) + dz·Wd, each element written once
      outer<T, kOuterVB>(nr, d, m, dzp, m, T(1), Wd.data_ptr<T>(), d, nullptr, dxp + r0 * d, d,
                         residual_is_x ? dyp + r0 * d : nullptr, d);
    } else if (need_x) {
      fastpeft::gemm(dzb, Wd, dx.narrow(0, r0, nr), copy_dy ? 1.0 : 0.0, 1.0, lib);  // dx_blk (+)= dz·Wd
    }
  });
  // Sum the chunk partials in chunk order.
  Tensor G, s, dWd, dbd;
  if (nblk == 0) {
    G = at::zeros({d, m}, opts); s = at::zeros({d}, opts); dWd = at::zeros({m, d}, opts); dbd = at::zeros({m}, opts);
  } else {
    G = micro ? sum_chunks(GT_t) : sum_chunks(GT_t).t();
    s = sum_chunks(s_t);
    dWd = micro ? sum_chunks(dWd_t).t().contiguous() : sum_chunks(dWd_t);
    dbd = sum_chunks(dbd_t);
  }
  Tensor dWu = (G * scale.unsqueeze(1)).contiguous();
  Tensor dbu = s * scale;
  Tensor ds = at::empty({0}, opts);
  if (need_scale) {
    ds = (Wu * G).sum(1);
    if (bu.has_value() && bu->defined()) ds.add_(*bu * s);
  }
  return {dx, dWd, dbd, dWu, dbu, ds};
}

void check_dtype(const Tensor& x) {
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "adapter: x must be a floating tensor, got ", st);
}

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

c10::optional<Tensor> opt_to(const c10::optional<Tensor>& t, at::ScalarType ct) {
  if (t.has_value() && t->defined()) return to_compute(*t, ct);
  return c10::nullopt;
}

// fp32 / fp64 (operands already in that dtype): the tuned path for this shape class.
// obey_forced = false for the "upcast" configuration of a bf16 / fp16 call (tune.h).
std::tuple<Tensor, Tensor> fwd_tuned(const Tensor& x, const Tensor& Wd, const c10::optional<Tensor>& bd,
                                     const Tensor& Wu, const c10::optional<Tensor>& bu, const Tensor& sc,
                                     const c10::optional<Tensor>& R, const std::string& activation, Act act,
                                     const Dropout& dp, bool obey_forced) {
  std::tuple<Tensor, Tensor> out;
  const int64_t M = x.size(0), d = x.size(1), m = Wd.size(0);
  const double work = 2.0 * M * d * m;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_fwd", [&] {
    const auto paths = adapter_paths<scalar_t>(x.scalar_type(), m);
    auto run = [&](int i) { return fwd_impl<scalar_t>(x, Wd, bd, Wu, bu, sc, R, act, dp, paths[i]); };
    const int pick = fastpeft::tuned_choice(adapter_key("adapter_fwd", x, M, d, m, activation, dp.on, paths),
                                            path_names(paths), work, [&](int i) { run(i); }, obey_forced);
    out = run(pick);
  });
  return out;
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut bwd_tuned(const Tensor& dy, const Tensor& x, const Tensor& Wd, const Tensor& Wu,
                 const c10::optional<Tensor>& bu, const Tensor& z, const Tensor& sc, const std::string& activation,
                 Act act, const Dropout& dp, bool residual_is_x, bool need_x, bool need_scale, bool obey_forced) {
  BwdOut out;
  const int64_t M = x.size(0), d = x.size(1), m = Wd.size(0);
  const double work = (need_x ? 4.0 : 3.0) * M * d * m;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_bwd", [&] {
    const auto paths = adapter_paths<scalar_t>(x.scalar_type(), m);
    auto run = [&](int i) {
      return bwd_impl<scalar_t>(dy, x, Wd, Wu, bu, z, sc, act, dp, residual_is_x, need_x, need_scale, paths[i]);
    };
    const std::string key = adapter_key("adapter_bwd", x, M, d, m, activation, dp.on, paths) +
                            (need_x ? " dx" : "") + (residual_is_x ? " res" : "");
    const int pick = fastpeft::tuned_choice(key, path_names(paths), work, [&](int i) { run(i); }, obey_forced);
    out = run(pick);
  });
  return out;
}

// ----------------------------------------------------------------------------------------
// bf16 / fp16. Configurations (tune.h names):
//   "gemm"    native: the six big products (x·Wdᵀ, [h, 1]·Wc; dy·Wus, [h, 1]ᵀ·dy, dzᵀ·x, dz·Wd)
//             are whole-M ATen GEMMs on the bf16 / fp16 tensors themselves (ATen hands them to
//             oneDNN: AMX / AVX512-BF16 kernels where the CPU has them; fp32 accumulation over
//             the whole reduction, each output rounded once), so nothing of size M·d is ever
//             widened or copied to fp32. The bottleneck (M, m) work - activation, dropout mask,
//             act' - runs in fp32 in one pass over row blocks (block-sized fp32 scratch), rounded
//             once into the GEMM operands. Biases ride the GEMMs: h gets a column of ones and the
//             folded up weight a row, Wc = [scale ⊙ Wu | scale ⊙ bu]ᵀ, so y = R + [h, 1]·Wc is one
//             GEMM onto R (as is dx = dy + dz·Wd), and in backward row m of [h, 1]ᵀ·dy is
//             colsum(dy). Folded weights and the small gradients (dbd, dWu, dbu, d_scale) are
//             formed in fp32 and rounded once.
//   "gemm+blocked"  the same, with the two "R + a·b" products by row blocks (add_gemm_rows).
//   "upcast"  the fp32 op on fp32 copies of every operand, results rounded back: a candidate
//             only where fastpeft::native_lowp_gemm(dtype) is false (no AMX / AVX512-BF16 for
//             bf16, no AMX-FP16 for fp16), where fp32 GEMMs can be the faster ones.
// Measured (Intel Xeon with AMX-BF16, 2 threads, M=8192 d=768 m=64 GELU, fwd+bwd, interleaved):
// 1.13x faster than eager bf16 (both bound by the same GEMMs; the two reductions over M cost as
// much as every elementwise pass saved), "gemm" chosen over "gemm+blocked"; README.
struct LowpCfg {
  bool upcast;
  bool blocked = false;  // the two "R + a·b" products by row blocks (add_gemm_rows)
  std::string name() const { return upcast ? "upcast" : blocked ? "gemm+blocked" : "gemm"; }
};

std::vector<LowpCfg> lowp_candidates(at::ScalarType st) {
  std::vector<LowpCfg> out{{false, false}, {false, true}};
  if (!fastpeft::native_lowp_gemm(st)) out.push_back({true});
  return out;
}

std::vector<std::string> lowp_names(const std::vector<LowpCfg>& c) {
  std::vector<std::string> n;
  for (const auto& x : c) n.push_back(x.name());
  return n;
}

std::string lowp_key(const char* op, const Tensor& x, int64_t M, int64_t d, int64_t m, const std::string& act,
                     bool drop, const std::vector<LowpCfg>& c) {
  std::string k = std::string(op) + " " + c10::toString(x.scalar_type()) + " M~" +
                  std::to_string(fastpeft::row_class(M)) + " d=" + std::to_string(d) + " m=" + std::to_string(m) +
                  " " + act + (drop ? " drop" : "") + " threads=" + std::to_string(at::get_num_threads()) + " [";
  for (size_t i = 0; i < c.size(); ++i) k += (i ? "," : "") + c[i].name();
  return k + "]";
}

// The bottleneck (M, m) work of the bf16 / fp16 path, in one pass over row blocks of kLowpRows
// with fp32 scratch of one block (no (M, m) fp32 tensor is allocated; fresh multi-MB buffers
// page-fault on every call):
//   forward : h = drop(act(z)) -> hc (M, m (+1)) in S, [h, 1] when `ones`;
//   backward: h as above -> hcT (m + 1, M) = [h, 1]ᵀ; dz = (dh ⊙ mask) ⊙ act'(z) -> dz (M, m) and
//             dzT (m, M) in S; dbd partials per block (summed in block order after: deterministic).
constexpr int64_t kLowpRows = 256;

// dst rows j = 0..m-1 at dst + j·ld get column j of the fp32 block src (rows × m), rounded once.
template <typename S>
void store_cols(const float* src, int64_t rows, int64_t m, S* dst, int64_t ld, float* col) {
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t r = 0; r < rows; ++r) col[r] = src[r * m + j];
    store_rows<S, float, kOuterVB>(col, dst + j * ld, rows);
  }
}

// hb = drop(act(z rows [r0, r0+nr))) in fp32; mult (when dropout is on) gets the block's mask.
template <typename S>
void block_h(const S* zp, int64_t r0, int64_t nr, int64_t m, Act act, const Dropout& dp, Tensor& zb, Tensor& hb,
             Tensor& mult) {
  widen_rows<float, kOuterVB>(zp + r0 * m, m, nr, m, zb.data_ptr<float>());
  act_fwd(act, hb, zb);
  if (dp.on) {
    dropout_mult<float>(dp, mult.data_ptr<float>(), r0, nr, m);
    hb.mul_(mult);
  }
}

template <typename S>
Tensor lowp_fwd_bottleneck(const Tensor& z, Act act, const Dropout& dp, bool ones) {
  const int64_t M = z.size(0), m = z.size(1), mc = m + (ones ? 1 : 0);
  Tensor hc = at::empty({M, mc}, z.options());
  const S* zp = z.data_ptr<S>();
  S* hp = hc.data_ptr<S>();
  const auto fo = z.options().dtype(at::kFloat);
  fastpeft::parallel_items((M + kLowpRows - 1) / kLowpRows, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kLowpRows, nr = std::min(kLowpRows, M - r0);
      Tensor zb = at::empty({nr, m}, fo), hb = at::empty({nr, m}, fo), mult = dp.on ? at::empty({nr, m}, fo) : Tensor();
      block_h<S>(zp, r0, nr, m, act, dp, zb, hb, mult);
      const float* h = hb.data_ptr<float>();
      for (int64_t r = 0; r < nr; ++r) {
        store_rows<S, float, kOuterVB>(h + r * m, hp + (r0 + r) * mc, m);
        if (ones) hp[(r0 + r) * mc + m] = static_cast<S>(1.0f);
      }
    }
  });
  return hc;
}

// Returns hcT (m + 1, M), dz (M, m), dzT (m, M) in S and dbd (m,) in fp32.
template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor> lowp_bwd_bottleneck(const Tensor& z, const Tensor& dh, Act act,
                                                               const Dropout& dp) {
  const int64_t M = z.size(0), m = z.size(1), nblk = (M + kLowpRows - 1) / kLowpRows;
  const auto fo = z.options().dtype(at::kFloat);
  Tensor hcT = at::empty({m + 1, M}, z.options()), dz = at::empty({M, m}, z.options()),
         dzT = at::empty({m, M}, z.options());
  Tensor dbd_part = at::zeros({std::max<int64_t>(nblk, 1), m}, fo);
  const S* zp = z.data_ptr<S>();
  const S* dhp = dh.data_ptr<S>();
  S *hT = hcT.data_ptr<S>(), *dzp = dz.data_ptr<S>(), *dzTp = dzT.data_ptr<S>();
  fastpeft::parallel_items(nblk, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    std::vector<float> col(kLowpRows);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kLowpRows, nr = std::min(kLowpRows, M - r0);
      Tensor zb = at::empty({nr, m}, fo), hb = at::empty({nr, m}, fo), mult = dp.on ? at::empty({nr, m}, fo) : Tensor();
      Tensor dhb = at::empty({nr, m}, fo), dzb = at::empty({nr, m}, fo);
      block_h<S>(zp, r0, nr, m, act, dp, zb, hb, mult);
      widen_rows<float, kOuterVB>(dhp + r0 * m, m, nr, m, dhb.data_ptr<float>());
      if (dp.on) dhb.mul_(mult);
      act_bwd(act, dzb, dhb, zb);
      const float* dzf = dzb.data_ptr<float>();
      store_cols<S>(hb.data_ptr<float>(), nr, m, hT + r0, M, col.data());
      std::fill(hT + m * M + r0, hT + m * M + r0 + nr, static_cast<S>(1.0f));
      store_cols<S>(dzf, nr, m, dzTp + r0, M, col.data());
      store_rows<S, float, kOuterVB>(dzf, dzp + r0 * m, nr * m);
      float* db = dbd_part.data_ptr<float>() + blk * m;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < m; ++j) db[j] += dzf[r * m + j];
    }
  });
  return {hcT, dz, dzT, dbd_part.sum(0)};
}

// out = R + a·b (out, R: (M, N) in S; a: (M, K); b: (K, N)). Whole-M: one addmm (ATen copies
// R into out, then one multi-threaded GEMM accumulates: an extra pass over out). Blocked: row
// blocks of about 1.5 MiB in fixed chunks, each copying R_blk into out_blk and accumulating a
// single-threaded GEMM onto it while it is in cache (no extra pass, but per-call GEMM costs).
// Which is faster depends on the CPU and the shape: timed ("gemm" / "gemm+blocked").
Tensor add_gemm_rows(const Tensor& R, const Tensor& a, const Tensor& b, bool blocked) {
  if (!blocked) return at::addmm(R, a, b);
  const int64_t M = R.size(0), N = R.size(1);
  Tensor out = at::empty({M, N}, R.options());
  if (M == 0) return out;
  const int nth = std::max(1, at::get_num_threads());
  const int64_t BR = block_rows(M, N, R.element_size(), nth);
  const int64_t nblk = (M + BR - 1) / BR;
  for_chunks(nblk, num_chunks(nblk, nth), [&](int, int64_t blk) {
    const int64_t r0 = blk * BR, nr = std::min(BR, M - r0);
    Tensor ob = out.narrow(0, r0, nr);
    ob.copy_(R.narrow(0, r0, nr));
    fastpeft::gemm(a.narrow(0, r0, nr), b, ob, 1.0, 1.0);
  });
  return out;
}

std::tuple<Tensor, Tensor> lowp_fwd_gemm(const Tensor& x, const Tensor& Wd, const c10::optional<Tensor>& bd,
                                         const Tensor& Wu, const c10::optional<Tensor>& bu, const Tensor& scale,
                                         const c10::optional<Tensor>& residual, Act act, const Dropout& dp,
                                         bool blocked) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto st = x.scalar_type();
  const bool has_bd = bd.has_value() && bd->defined(), has_bu = bu.has_value() && bu->defined();
  const Tensor R = residual.has_value() && residual->defined() ? *residual : x;
  Tensor z = has_bd ? at::addmm(*bd, x, Wd.t()) : at::mm(x, Wd.t());        // (M, m) in S
  const Tensor sf = scale.to(at::kFloat);
  if (all_finite<float>(sf.contiguous())) {
    // Folded in fp32, rounded once: Wc = [scale ⊙ Wu | scale ⊙ bu]ᵀ (m (+1), d).
    Tensor Wc = (Wu.to(at::kFloat) * sf.unsqueeze(1)).t();
    if (has_bu) Wc = at::cat({Wc, (sf * bu->to(at::kFloat)).unsqueeze(0)}, 0);
    Tensor hc;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "adapter_fwd", [&] { hc = lowp_fwd_bottleneck<scalar_t>(z, act, dp, has_bu); });
    Tensor y = add_gemm_rows(R, hc, Wc.to(st), blocked);                     // y = R + [h, 1]·Wc
    return {y, z};
  }
  // A non-finite scale entry: u = h·Wuᵀ + bu kept whole, y = R + scale ⊙ u (the reference's order).
  Tensor h;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "adapter_fwd", [&] { h = lowp_fwd_bottleneck<scalar_t>(z, act, dp, false); });
  Tensor u = has_bu ? at::addmm(*bu, h, Wu.t()) : at::mm(h, Wu.t());
  return {at::addcmul(R, u, scale.unsqueeze(0)).contiguous(), z};
}

BwdOut lowp_bwd_gemm(const Tensor& dy_in, const Tensor& x, const Tensor& Wd, const Tensor& Wu,
                     const c10::optional<Tensor>& bu, const Tensor& z, const Tensor& scale, Act act, const Dropout& dp,
                     bool residual_is_x, bool need_x, bool need_scale, bool blocked) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto st = x.scalar_type();
  const auto opts = x.options();
  const int64_t m = Wd.size(0);
  const Tensor dy = dy_in.stride(-1) == 1 ? dy_in : dy_in.contiguous();
  const Tensor sf = scale.to(at::kFloat);
  const Tensor Wuf = Wu.to(at::kFloat);
  const Tensor Wus = (Wuf * sf.unsqueeze(1)).to(st);                         // (d, m), rounded once
  const Tensor dh = at::mm(dy, Wus);                                          // (M, m) in S
  // hᵀ / dzᵀ come stored transposed (contiguous rows of M) for the reductions over M: ~25%
  // faster GEMMs than the transposed views of h / dz.
  Tensor hcT, dz, dzT, dbdf;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "adapter_bwd", [&] {
    std::tie(hcT, dz, dzT, dbdf) = lowp_bwd_bottleneck<scalar_t>(z.contiguous(), dh, act, dp);
  });
  // [h, 1]ᵀ·dy: rows 0..m-1 are Gᵀ = hᵀ·dy, row m is colsum(dy).
  const Tensor GTs = at::mm(hcT, dy);                                         // (m + 1, d) in S
  const Tensor G = GTs.narrow(0, 0, m).t().to(at::kFloat);                    // (d, m)
  const Tensor s = GTs.select(0, m).to(at::kFloat);                           // (d,)
  Tensor dWd = at::mm(dzT, x);                                                // (m, d)
  Tensor dx = !need_x ? at::empty({0}, opts) : residual_is_x ? add_gemm_rows(dy, dz, Wd, blocked) : at::mm(dz, Wd);
  Tensor dbd = dbdf.to(st);
  Tensor dWu = (G * sf.unsqueeze(1)).to(st).contiguous();                     // (d, m) row-major
  Tensor dbu = (s * sf).to(st);
  Tensor ds = at::empty({0}, opts);
  if (need_scale) {
    Tensor dsf = (Wuf * G).sum(1);
    if (bu.has_value() && bu->defined()) dsf.add_(bu->to(at::kFloat) * s);
    ds = dsf.to(st);
  }
  return {dx, dWd, dbd, dWu, dbu, ds};
}

std::tuple<Tensor, Tensor> adapter_fwd(const Tensor& x, const Tensor& down_weight,
                                       const c10::optional<Tensor>& down_bias, const Tensor& up_weight,
                                       const c10::optional<Tensor>& up_bias, const Tensor& scale,
                                       const c10::optional<Tensor>& residual, std::string activation,
                                       double dropout_p, const c10::optional<Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2 && down_weight.dim() == 2 && up_weight.dim() == 2, "adapter_fwd: 2-D x and weights");
  TORCH_CHECK(x.device().is_cpu(), "adapter_fwd (C++): CPU tensors only");
  check_dtype(x);
  const Act act = parse_act(activation);
  const Dropout dp = make_dropout(dropout_p, seed);
  if (!is_half(x)) {
    const auto ct = x.scalar_type();
    return fwd_tuned(to_compute(x, ct), to_compute(down_weight, ct), opt_to(down_bias, ct),
                     to_compute(up_weight, ct), opt_to(up_bias, ct), to_compute(scale, ct), opt_to(residual, ct),
                     activation, act, dp, true);
  }
  const auto st = x.scalar_type();
  const int64_t M = x.size(0), d = x.size(1), m = down_weight.size(0);
  const auto cands = lowp_candidates(st);
  auto run = [&](int i) -> std::tuple<Tensor, Tensor> {
    if (cands[i].upcast) {
      const auto f = at::kFloat;
      auto [y, z] = fwd_tuned(to_compute(x, f), to_compute(down_weight, f), opt_to(down_bias, f),
                              to_compute(up_weight, f), opt_to(up_bias, f), to_compute(scale, f),
                              opt_to(residual, f), activation, act, dp, false);
      return {y.to(st), z.to(st)};
    }
    return lowp_fwd_gemm(x, down_weight, down_bias, up_weight, up_bias, scale, residual, act, dp, cands[i].blocked);
  };
  const int pick = fastpeft::tuned_choice(lowp_key("adapter_fwd", x, M, d, m, activation, dp.on, cands),
                                          lowp_names(cands), 2.0 * M * d * m, [&](int i) { run(i); });
  return run(pick);
}

BwdOut adapter_bwd(const Tensor& dy, const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
                   const c10::optional<Tensor>& up_bias, const Tensor& z, const Tensor& scale, std::string activation,
                   double dropout_p, const c10::optional<Tensor>& seed, bool residual_is_x, bool need_x,
                   bool need_scale) {
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && z.dim() == 2, "adapter_bwd: 2-D dy, x and z");
  TORCH_CHECK(x.device().is_cpu(), "adapter_bwd (C++): CPU tensors only");
  check_dtype(x);
  const Act act = parse_act(activation);
  const Dropout dp = make_dropout(dropout_p, seed);
  if (!is_half(x)) {
    const auto ct = x.scalar_type();
    return bwd_tuned(to_compute(dy, ct), to_compute(x, ct), to_compute(down_weight, ct), to_compute(up_weight, ct),
                     opt_to(up_bias, ct), to_compute(z, ct), to_compute(scale, ct), activation, act, dp,
                     residual_is_x, need_x, need_scale, true);
  }
  const auto st = x.scalar_type();
  const int64_t M = x.size(0), d = x.size(1), m = down_weight.size(0);
  const auto cands = lowp_candidates(st);
  auto run = [&](int i) -> BwdOut {
    if (cands[i].upcast) {
      const auto f = at::kFloat;
      auto [dx, dWd, dbd, dWu, dbu, ds] =
          bwd_tuned(to_compute(dy, f), to_compute(x, f), to_compute(down_weight, f), to_compute(up_weight, f),
                    opt_to(up_bias, f), to_compute(z, f), to_compute(scale, f), activation, act, dp, residual_is_x,
                    need_x, need_scale, false);
      return {dx.to(st), dWd.to(st), dbd.to(st), dWu.to(st), dbu.to(st), ds.to(st)};
    }
    return lowp_bwd_gemm(dy, x, down_weight, up_weight, up_bias, z, scale, act, dp, residual_is_x, need_x,
                         need_scale, cands[i].blocked);
  };
  const std::string key = lowp_key("adapter_bwd", x, M, d, m, activation, dp.on, cands) + (need_x ? " dx" : "") +
                          (residual_is_x ? " res" : "");
  const int pick = fastpeft::tuned_choice(key, lowp_names(cands), (need_x ? 4.0 : 3.0) * M * d * m,
                                          [&](int i) { run(i); });
  return run(pick);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("adapter_fwd(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
        "Tensor scale, Tensor? residual, str activation, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
        &adapter_fwd);
  m.def("adapter_bwd(Tensor dy, Tensor x, Tensor down_weight, Tensor up_weight, Tensor? up_bias, Tensor z, "
        "Tensor scale, str activation, float dropout_p, Tensor? seed, bool residual_is_x, bool need_x, "
        "bool need_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &adapter_bwd);
}
