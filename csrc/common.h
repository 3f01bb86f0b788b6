// Shared helpers for the C++ CPU backend.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace fastpeft {

// murmur3's 32-bit finaliser: a bijection with full avalanche.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Per-call key for the high 32 bits of the element index (constant for < 2^32 elements).
inline uint32_t dropout_key(uint32_t seed, uint32_t hi) { return fmix32(seed + hi * 0x9E3779B9u); }

// Dropout keep decision for logical element `idx` of a row-major (rows, cols) matrix.
// Must match fastpeft/_dropout.py bit for bit: keep iff fmix32(lo ^ key) >= threshold.
inline bool dropout_keep(uint32_t seed, uint32_t threshold, int64_t idx) {
  const uint32_t lo = static_cast<uint32_t>(idx & 0xffffffffLL);
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(idx) >> 32);
  return fmix32(lo ^ dropout_key(seed, hi)) >= threshold;
}


// Σ_c part[c] for part (nch, R, C) contiguous, in chunk order (deterministic for a fixed nch),
// as a new (R, C) tensor, or (C, R) with `transpose`, narrowed to its first `cols` columns
// (before the transpose), times `scale`, and cast to `out_dtype`. One plain loop: the per-chunk partials of the
// rank-r reductions are tiny (K×r), and the ATen ops this replaces (sum, narrow, t, to,
// contiguous) cost ~60 µs a call, 3 % of a LoRA backward at 512×768 on 2 cores.
inline at::Tensor sum_parts(const at::Tensor& part, bool transpose, int64_t cols, at::ScalarType out_dtype,
                            double scale = 1.0) {
  const int64_t nch = part.size(0), R = part.size(1), C = part.size(2);
  at::Tensor out = transpose ? at::empty({cols, R}, part.options().dtype(out_dtype))
                             : at::empty({R, cols}, part.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "sum_parts", [&] {
    using T = scalar_t;
    const at::Tensor pc = part.contiguous();
    const T* p = pc.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "sum_parts_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          T acc = p[i * C + j];
          for (int64_t c = 1; c < nch; ++c) acc += p[(c * R + i) * C + j];
          if (scale != 1.0) acc *= static_cast<T>(scale);
          o[transpose ? j * R + i : i * cols + j] = static_cast<scalar_t>(acc);
        }
    });
  });
  return out;
}


// at::parallel_for(0, n, 1, f), except that n == 1 runs f(0, 1) on the calling thread. ATen's
// OpenMP parallel_for starts a whole thread team even for one item, and the team's closing barrier
// waits for every thread: on a machine with other load, one descheduled team thread costs a
// scheduler time slice (measured: 8 ms per call of a 4×16 LoRA forward while one other process
// was busy). One item is the common case at decode-size inputs (a single row block).
template <class F>
inline void parallel_items(int64_t n, const F& f) {
  if (n == 1) {
    f(int64_t{0}, int64_t{1});
    return;
  }
  at::parallel_for(0, n, 1, f);
}

}  // namespace fastpeft
