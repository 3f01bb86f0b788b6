// Shared helpers for the C++ CPU backend.
#pragma once
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

}  // namespace fastpeft
