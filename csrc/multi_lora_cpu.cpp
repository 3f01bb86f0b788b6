// Multi-adapter LoRA linear for CPU tensors (family "multi_lora"; contract in
// fastpeft/ops/multi_lora.py): every row i of the batch runs through its own adapter a = ids[i]
// (a = -1: the base layer only):
//
//   t[i] = drop(x)[i]·A[a]ᵀ                     (M, r), returned and saved for backward (0 if a = -1)
//   y[i] = x[i]·Wᵀ + b + s[a]·t[i]·B[a]ᵀ         (M, N)
//
// The frozen GEMM is the same for every row, so it runs ONCE for the whole batch (one
// multi-threaded call accumulating in place, beta = 1), whatever the adapter mix, on the GEMM
// library (ATen/MKL or oneDNN, gemm.h) timed fastest for the shape class on this machine (tune.h:
// oneDNN's fp32 GEMM ran 2x faster than MKL's on an AMD EPYC, MKL won on an Intel Xeon). Only
// the rank-r work depends on the adapter: the rows are grouped by adapter with a stable counting
// sort (segments in adapter order, rows in their original order inside a segment), each segment
// is cut into blocks of at most BR rows, and one parallel pass over the blocks does, per block,
// on BR×K / BR×N scratch in cache (gathered rows: no M×K sorted copy of x):
//
//   forward   xd = drop(x[rows]) (hash regenerated), t_blk = xd·A[a]ᵀ, y[rows] = b + s[a]·t_blk·B[a]ᵀ
//             (base rows: y[rows] = b, t = 0); then y += x·Wᵀ for all rows at once.
//   backward  dt = s[a]·dy[rows]·B[a], dB_part = s[a]·dy[rows]ᵀ·t[rows], dA_part = dtᵀ·drop(x[rows]),
//             dx[rows] = (dt·A[a]) ⊙ keep/(1-p) (base rows: 0); then dx += dy·W once.
//
// dA / dB: one partial per block, summed per adapter in block order afterwards. The blocking
// depends only on the ids and the shapes (not on the thread count or the scheduling), so
// every gradient is bit-for-bit deterministic. Adapters without rows get zero gradients.
// The small per-block products go to single-threaded BLAS (blas.h) inside at::parallel_for.
// The dropout mask is fastpeft::dropout_keep (common.h) over the logical (M, K) view of x,
// bit-identical to fastpeft._dropout, so every backend draws the same mask.
// fp32/fp64 compute natively; fp16/bf16 are upcast to fp32 and the results cast back.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "blas.h"
#include "common.h"
#include "gemm.h"
#include "tune.h"

namespace {

using at::Tensor;

// One block of work: rows order[begin, end) of adapter `adapter` (-1: base rows).
struct Block {
  int64_t adapter, begin, end;
};

// Rows grouped by adapter: `order` holds every row index, base rows (-1) first, then adapter
// 0's rows, adapter 1's, ... (stable: original order within a group); seg[a + 1] .. seg[a + 2]
// is adapter a's range (seg[0] .. seg[1]: the base rows).
struct Plan {
  std::vector<int64_t> order, seg;
  std::vector<Block> blocks;
};

// Rows per block: the gathered x / dy block (BR × width) stays in L2. Depends on the shape only,
// never on the thread count, so the partial sums (and the gradients) are the same everywhere.
// FASTPEFT_MULTI_LORA_BR overrides (tests use tiny blocks to cover the tails).
int64_t block_rows(int64_t width, int64_t elem) {
  if (const char* e = std::getenv("FASTPEFT_MULTI_LORA_BR")) return std::max<int64_t>(1, std::atoll(e));
  const int64_t target = 256 * 1024;
  return std::min<int64_t>(128, std::max<int64_t>(16, target / std::max<int64_t>(1, width * elem)));
}

Plan make_plan(const Tensor& ids_in, int64_t n, int64_t br) {
  const Tensor ids = ids_in.contiguous();
  const int64_t M = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  Plan p;
  p.seg.assign(n + 2, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t a = id[i];
    TORCH_CHECK(a >= -1 && a < n, "multi_lora: adapter_ids must be in [-1, ", n, ") (n = ", n,
                " adapters, -1 = base only), got ", a, " at row ", i);
    ++p.seg[a + 2];
  }
  for (int64_t a = 0; a <= n; ++a) p.seg[a + 1] += p.seg[a];
  p.order.resize(M);
  std::vector<int64_t> fill(p.seg.begin(), p.seg.end() - 1);
  for (int64_t i = 0; i < M; ++i) p.order[fill[id[i] + 1]++] = i;
  for (int64_t a = -1; a < n; ++a) {
    const int64_t b0 = p.seg[a + 1], b1 = p.seg[a + 2], len = b1 - b0;
    if (len == 0) continue;
    const int64_t nb = (len + br - 1) / br;  // near-equal blocks of <= br rows
    for (int64_t k = 0; k < nb; ++k) p.blocks.push_back({a, b0 + len * k / nb, b0 + len * (k + 1) / nb});
  }
  return p;
}

uint32_t dropout_threshold(double p) {
  // Python's int(round(p * 2**32)) (round half to even), capped at 2**32 - 1.
  const double v = std::nearbyint(p * 4294967296.0);
  return v >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(v);
}

uint32_t seed_value(const std::optional<Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->defined(), "multi_lora: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1, "multi_lora: seed must be a single-element tensor, got ", seed->sizes());
  return static_cast<uint32_t>(seed->item<int64_t>());
}

// Dropout settings of one call: keep iff hash >= thr, kept values scaled by 1/(1-p).
template <typename T>
struct Drop {
  bool on;
  uint32_t seed, thr;
  T scale;
};

// The hash loops are plain `omp simd` loops; GCC's default tuning vectorises them with 256-bit
// registers even where AVX-512 has 512 (16 hashes per instruction instead of 8).
#ifdef __AVX512F__
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#endif
// o[j] = v[j·s1] (· keep/(1-p) when dropout is on, keep = the mask of logical element idx0 + j).
template <typename T>
void copy_row(const T* v, int64_t s1, int64_t idx0, int64_t K, const Drop<T>& d, T* o) {
  if (!d.on) {
    if (s1 == 1) {
      std::memcpy(o, v, sizeof(T) * K);
    } else {
      for (int64_t j = 0; j < K; ++j) o[j] = v[j * s1];
    }
    return;
  }
  const uint64_t hi0 = static_cast<uint64_t>(idx0) >> 32, hi1 = static_cast<uint64_t>(idx0 + K - 1) >> 32;
  if (hi0 == hi1) {  // one key per row: a loop the compiler vectorises
    const uint32_t key = fastpeft::dropout_key(d.seed, static_cast<uint32_t>(hi0));
    const uint32_t lo = static_cast<uint32_t>(idx0 & 0xffffffffLL);
    const uint32_t thr = d.thr;  // locals: stores through o must not make the loop reload them
    const T scale = d.scale;
    if (s1 == 1) {  // unit stride: 16 hashes per AVX-512 instruction
#pragma omp simd
      for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
        const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
        o[j] = v[j] * (k ? scale : T(0));  // a multiply: a dropped NaN stays NaN, as the reference
      }
    } else {
      for (uint32_t j = 0; j < static_cast<uint32_t>(K); ++j) {
        const bool k = fastpeft::fmix32((lo + j) ^ key) >= thr;
        o[j] = v[j * s1] * (k ? scale : T(0));
      }
    }
  } else {  // the row straddles a multiple of 2**32 elements: per-element key
    for (int64_t j = 0; j < K; ++j)
      o[j] = v[j * s1] * (fastpeft::dropout_keep(d.seed, d.thr, idx0 + j) ? d.scale : T(0));
  }
}

// out[i, :] = v[rows[i], :] (dropped out with the mask of the logical (M, K) row rows[i]); v is
// read through its strides, out is m × K contiguous.
template <typename T>
void gather(const T* v, int64_t s0, int64_t s1, const int64_t* rows, int64_t m, int64_t K, const Drop<T>& d,
            T* out) {
  for (int64_t i = 0; i < m; ++i) copy_row<T>(v + rows[i] * s0, s1, rows[i] * K, K, d, out + i * K);
}

#ifdef __AVX512F__
#pragma GCC pop_options
#endif

template <typename T>
std::tuple<Tensor, Tensor> fwd_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& A_in, const Tensor& B_in, c10::ArrayRef<double> scaling,
                                    const Tensor& ids, double p, const std::optional<Tensor>& seed,
                                    fastpeft::Lib lib) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels, no autograd graph
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = A_in.size(0), r = A_in.size(1);
  const auto opts = x.options();
  const Tensor A = A_in.contiguous(), B = B_in.contiguous();  // (n, r, K), (n, N, r): small
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  Tensor y = at::empty({M, N}, opts);
  Tensor t = at::empty({M, r}, opts);
  const Drop<T> d{p > 0.0, p > 0.0 ? seed_value(seed) : 0u, p > 0.0 ? dropout_threshold(p) : 0u,
                  static_cast<T>(1.0 / (1.0 - p))};
  const int64_t br = block_rows(std::max(K, N), sizeof(T));
  const Plan plan = make_plan(ids, n, br);
  const int64_t nblk = static_cast<int64_t>(plan.blocks.size());
  const T *xp = x.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Bp = B.data_ptr<T>();
  const T* bp = has_bias ? bc.data_ptr<T>() : nullptr;
  T *yp = y.data_ptr<T>(), *tp = t.data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  fastpeft::parallel_items(nblk, [&](int64_t b0, int64_t b1) {
    std::vector<T> xg(br * K), tg(br * r), ug(br * N);
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = plan.blocks[b];
      const int64_t* rows = plan.order.data() + blk.begin;
      const int64_t m = blk.end - blk.begin;
      if (blk.adapter < 0) {  // base rows: y = b (the frozen GEMM adds x·Wᵀ below), t = 0
        for (int64_t i = 0; i < m; ++i) {
          T* yr = yp + rows[i] * N;
          if (bp) std::memcpy(yr, bp, sizeof(T) * N); else std::fill(yr, yr + N, T(0));
          std::fill(tp + rows[i] * r, tp + (rows[i] + 1) * r, T(0));
        }
        continue;
      }
      const T* Aa = Ap + blk.adapter * r * K;
      const T* Ba = Bp + blk.adapter * N * r;
      gather<T>(xp, sx0, sx1, rows, m, K, d, xg.data());
      fastpeft::blas::mm_abT<T>(m, r, K, T(1), xg.data(), K, Aa, K, T(0), tg.data(), r);  // t = xd·Aᵀ
      fastpeft::blas::mm_abT<T>(m, N, r, static_cast<T>(scaling[blk.adapter]), tg.data(), r, Ba, r, T(0),
                                ug.data(), N);                                             // u = s·t·Bᵀ
      for (int64_t i = 0; i < m; ++i) {
        T* yr = yp + rows[i] * N;
        const T* ur = ug.data() + i * N;
        if (bp) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) yr[j] = ur[j] + bp[j];
        } else {
          std::memcpy(yr, ur, sizeof(T) * N);
        }
        std::memcpy(tp + rows[i] * r, tg.data() + i * r, sizeof(T) * r);
      }
    }
  });
  fastpeft::gemm(x, weight.t(), y, 1.0, 1.0, lib);  // the frozen GEMM, once, for every row
  return {y, t};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& A_in, const Tensor& B_in,
    const Tensor& t_in, c10::ArrayRef<double> scaling, const Tensor& ids, double p,
    const std::optional<Tensor>& seed, bool need_x, bool need_weight, bool need_bias, fastpeft::Lib lib) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = A_in.size(0), r = A_in.size(1);
  const auto opts = x.options();
  const Tensor A = A_in.contiguous(), B = B_in.contiguous();
  const Drop<T> d{p > 0.0, p > 0.0 ? seed_value(seed) : 0u, p > 0.0 ? dropout_threshold(p) : 0u,
                  static_cast<T>(1.0 / (1.0 - p))};
  const int64_t br = block_rows(std::max(K, N), sizeof(T));
  const Plan plan = make_plan(ids, n, br);
  const int64_t nblk = static_cast<int64_t>(plan.blocks.size());
  Tensor dx = need_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  Tensor dA = at::zeros({n, r, K}, opts), dB = at::zeros({n, N, r}, opts);
  // Per-block partials (block b of adapter a covers part of a's rows), summed per adapter below.
  std::vector<T> dAp(static_cast<size_t>(nblk) * r * K), dBp(static_cast<size_t>(nblk) * N * r);
  const T *xp = x.data_ptr<T>(), *dyp = dy.data_ptr<T>(), *tp = t_in.data_ptr<T>();
  const T *Ap = A.data_ptr<T>(), *Bp = B.data_ptr<T>();
  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sd0 = dy.stride(0), sd1 = dy.stride(1);
  const int64_t st0 = t_in.stride(0), st1 = t_in.stride(1);
  const Drop<T> nodrop{false, 0u, 0u, T(1)};
  fastpeft::parallel_items(nblk, [&](int64_t b0, int64_t b1) {
    std::vector<T> dyg(br * N), tg(br * r), dtg(br * r), xg(br * K);
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = plan.blocks[b];
      const int64_t* rows = plan.order.data() + blk.begin;
      const int64_t m = blk.end - blk.begin;
      if (blk.adapter < 0) {  // base rows: no LoRA term in dx (dy·W is added below)
        if (need_x)
          for (int64_t i = 0; i < m; ++i) std::fill(dxp + rows[i] * K, dxp + (rows[i] + 1) * K, T(0));
        continue;
      }
      const T s = static_cast<T>(scaling[blk.adapter]);
      const T* Aa = Ap + blk.adapter * r * K;
      const T* Ba = Bp + blk.adapter * N * r;
      gather<T>(dyp, sd0, sd1, rows, m, N, nodrop, dyg.data());
      gather<T>(tp, st0, st1, rows, m, r, nodrop, tg.data());
      fastpeft::blas::mm_ab<T>(m, r, N, s, dyg.data(), N, Ba, r, T(0), dtg.data(), r);       // dt = s·dy·B
      fastpeft::blas::mm_aTb<T>(N, r, m, s, dyg.data(), N, tg.data(), r, T(0), dBp.data() + b * N * r, r);
      gather<T>(xp, sx0, sx1, rows, m, K, d, xg.data());                                      // drop(x)
      fastpeft::blas::mm_aTb<T>(r, K, m, T(1), dtg.data(), r, xg.data(), K, T(0), dAp.data() + b * r * K, K);
      if (need_x) {
        fastpeft::blas::mm_ab<T>(m, K, r, T(1), dtg.data(), r, Aa, K, T(0), xg.data(), K);  // dt·A (reuses xg)
        for (int64_t i = 0; i < m; ++i) {
          // the same mask as x's row in the forward
          copy_row<T>(xg.data() + i * K, 1, rows[i] * K, K, d, dxp + rows[i] * K);
        }
      }
    }
  });
  // Sum the partials per adapter, in block order (blocks of one adapter are consecutive).
  std::vector<int64_t> first(n + 1, nblk);
  for (int64_t b = nblk - 1; b >= 0; --b)
    if (plan.blocks[b].adapter >= 0) first[plan.blocks[b].adapter] = b;
  T *dAo = dA.data_ptr<T>(), *dBo = dB.data_ptr<T>();
  fastpeft::parallel_items(n, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      for (int64_t b = first[a]; b < nblk && plan.blocks[b].adapter == a; ++b) {
        T* oa = dAo + a * r * K;
        const T* pa = dAp.data() + b * r * K;
        for (int64_t j = 0; j < r * K; ++j) oa[j] += pa[j];
        T* ob = dBo + a * N * r;
        const T* pb = dBp.data() + b * N * r;
        for (int64_t j = 0; j < N * r; ++j) ob[j] += pb[j];
      }
    }
  });
  if (need_x) fastpeft::gemm(dy, weight, dx, 1.0, 1.0, lib);  // the frozen GEMM's dx, once, for every row
  Tensor dW = need_weight ? at::empty({N, K}, opts) : at::empty({0}, opts);
  if (need_weight) fastpeft::gemm(dy.t(), x, dW, 0.0, 1.0, lib);
  Tensor db = need_bias ? dy.sum(0) : at::empty({0}, opts);
  return {dx, dW, db, dA, dB};
}

void check_args(const char* op, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
                c10::ArrayRef<double> scaling, const Tensor& ids, double p) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x and weight must be 2-D, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3, op, ": lora_A (n, r, K) and lora_B (n, N, r) must be 3-D, got ",
              A.sizes(), " and ", B.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, " (C++ backend): expected CPU tensors, got ", x.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == x.size(0), op,
              ": adapter_ids must be int64 of shape (", x.size(0), ",), got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(static_cast<int64_t>(scaling.size()) == A.size(0), op, ": expected ", A.size(0),
              " scalings (one per adapter), got ", scaling.size());
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// The candidates' names (one per GEMM library) and the tune key of a call's shape class.
std::vector<std::string> lib_names(const std::vector<fastpeft::Lib>& libs) {
  std::vector<std::string> n;
  for (auto l : libs) n.push_back(fastpeft::lib_name(l));
  return n;
}

std::string key_of(const char* op, const Tensor& x, int64_t N, int64_t n, int64_t r,
                   const std::vector<fastpeft::Lib>& libs) {
  std::string k = std::string(op) + " " + c10::toString(x.scalar_type()) + " M~" +
                  std::to_string(fastpeft::row_class(x.size(0))) + " K=" + std::to_string(x.size(1)) +
                  " N=" + std::to_string(N) + " n=" + std::to_string(n) + " r=" + std::to_string(r) +
                  " threads=" + std::to_string(at::get_num_threads());
  for (auto l : libs) k += std::string(" ") + fastpeft::lib_name(l);
  return k;
}
Tensor to_f32(const Tensor& t) { return t.to(at::kFloat); }

std::tuple<Tensor, Tensor> multi_lora_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const Tensor& lora_A, const Tensor& lora_B, c10::ArrayRef<double> scaling,
                                          const Tensor& adapter_ids, double dropout_p,
                                          const std::optional<Tensor>& seed) {
  check_args("multi_lora_fwd", x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p);
  if (is_half(x)) {
    std::optional<Tensor> b32 = bias.has_value() && bias->defined() ? std::optional<Tensor>(to_f32(*bias)) : bias;
    auto [y, t] = multi_lora_fwd(to_f32(x), to_f32(weight), b32, to_f32(lora_A), to_f32(lora_B), scaling,
                                 adapter_ids, dropout_p, seed);
    return {y.to(x.scalar_type()), t.to(x.scalar_type())};
  }
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_fwd", [&] {
    const auto libs = fastpeft::allowed_lib_list(x.scalar_type());
    auto run = [&](int i) {
      return fwd_impl<scalar_t>(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, libs[i]);
    };
    const int pick = fastpeft::tuned_choice(key_of("multi_lora_fwd", x, weight.size(0), lora_A.size(0),
                                                   lora_A.size(1), libs),
                                            lib_names(libs), 1.0 * x.size(0) * x.size(1) * weight.size(0),
                                            [&](int i) { run(i); });
    out = run(pick);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& t, c10::ArrayRef<double> scaling, const Tensor& adapter_ids, double dropout_p,
    const std::optional<Tensor>& seed, bool need_x, bool need_weight, bool need_bias) {
  check_args("multi_lora_bwd", x, weight, lora_A, lora_B, scaling, adapter_ids, dropout_p);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == weight.size(0),
              "multi_lora_bwd: dy must be (M, N) = (", x.size(0), ", ", weight.size(0), "), got ", dy.sizes());
  if (is_half(x)) {
    auto [dx, dW, db, dA, dB] = multi_lora_bwd(to_f32(dy), to_f32(x), to_f32(weight), to_f32(lora_A),
                                               to_f32(lora_B), to_f32(t), scaling, adapter_ids, dropout_p, seed,
                                               need_x, need_weight, need_bias);
    const auto st = x.scalar_type();
    return {dx.to(st), dW.to(st), db.to(st), dA.to(st), dB.to(st)};
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_bwd", [&] {
    const auto libs = fastpeft::allowed_lib_list(x.scalar_type());
    auto run = [&](int i) {
      return bwd_impl<scalar_t>(dy, x, weight, lora_A, lora_B, t, scaling, adapter_ids, dropout_p, seed, need_x,
                                need_weight, need_bias, libs[i]);
    };
    const std::string key = key_of("multi_lora_bwd", x, weight.size(0), lora_A.size(0), lora_A.size(1), libs) +
                            (need_x ? " dx" : "") + (need_weight ? " dW" : "");
    const double work = (need_x + need_weight) * 1.0 * x.size(0) * x.size(1) * weight.size(0);
    const int pick = fastpeft::tuned_choice(key, lib_names(libs), work, [&](int i) { run(i); });
    out = run(pick);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("multi_lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scaling, "
        "Tensor adapter_ids, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
        &multi_lora_fwd);
  m.def("multi_lora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, "
        "float[] scaling, Tensor adapter_ids, float dropout_p, Tensor? seed, bool need_x, bool need_weight, "
        "bool need_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &multi_lora_bwd);
}
