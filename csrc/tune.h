// Run-time choice between an op's equivalent configurations (GEMM library, where the big GEMM
// runs), measured on the machine it runs on instead of hard-wired for one CPU.
//
// The first call of an op for a shape class (tune_key: op, dtype, rows rounded to a power of
// two, the other dims, thread count, the libraries allowed) times every candidate on the call's
// own inputs, interleaved, kReps rounds (kMoreReps more for those within kClose of the fastest),
// keeps the fastest by its minimum, and remembers it for the rest of the process. Every later call of that class runs the chosen configuration only, so
// for a fixed thread count the same inputs give bit-identical results. Candidates compute the
// same function; they may differ in the last bits (a different GEMM library sums differently).
//
// Not tuned (the first candidate, the op's default, is taken): calls smaller than kMinWork
// multiply-adds (timing them costs more than a wrong choice), FASTPEFT_CPU_TUNE=0, or
// FASTPEFT_CPU_CONFIG=<name> forcing one configuration by name (tests use it to cover every
// configuration). tune_table() lists what was chosen, for `python -m fastpeft info` and the bench.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace fastpeft {

struct TuneEntry {
  std::string chosen;
  std::vector<std::pair<std::string, double>> ms;  // candidate -> best time (ms)
};

inline std::mutex& tune_mutex() {
  static std::mutex mu;
  return mu;
}

inline std::map<std::string, TuneEntry>& tune_map() {
  static std::map<std::string, TuneEntry> m;
  return m;
}

constexpr double kMinWork = 3.2e7;  // multiply-adds (~0.15 ms on 2 AVX-512 cores)
constexpr int kReps = 3;
constexpr double kClose = 1.05;  // candidates this close to the fastest get more rounds
constexpr int kMoreReps = 4;

// Rows rounded up to a power of two: one shape class per sequence-length octave.
inline int64_t row_class(int64_t M) {
  int64_t c = 1;
  while (c < M) c <<= 1;
  return c;
}

// Index (into names) of the configuration to run. `run(i)` runs candidate i once (a complete,
// self-contained call of the op whose outputs are thrown away). `work` is the call's
// multiply-add count.
// `obey_forced` = false: FASTPEFT_CPU_CONFIG names a configuration of the calling op, not of this
// one (a bf16 op's fp32 "upcast" configuration runs the fp32 op inside it, tuned as usual).
template <class F>
int tuned_choice(const std::string& key, const std::vector<std::string>& names, double work, F&& run,
                 bool obey_forced = true) {
  TORCH_CHECK(!names.empty(), "tune: no candidate configuration for ", key);
  if (const char* forced = obey_forced ? std::getenv("FASTPEFT_CPU_CONFIG") : nullptr) {
    if (*forced != '\0') {
      for (size_t i = 0; i < names.size(); ++i)
        if (names[i] == forced) return static_cast<int>(i);
      std::string all;
      for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
      TORCH_CHECK(false, "FASTPEFT_CPU_CONFIG='", forced, "' is not a configuration of ", key,
                  " here; available: ", all);
    }
  }
  if (names.size() == 1 || work < kMinWork) return 0;
  if (const char* e = std::getenv("FASTPEFT_CPU_TUNE")) {
    if (std::strcmp(e, "0") == 0) return 0;
  }
  {
    std::lock_guard<std::mutex> lock(tune_mutex());
    auto it = tune_map().find(key);
    if (it != tune_map().end()) {
      for (size_t i = 0; i < names.size(); ++i)
        if (names[i] == it->second.chosen) return static_cast<int>(i);
    }
  }
  const size_t n = names.size();
  std::vector<double> best(n, 1e300);
  run(0);  // warm-up: first-touch of outputs, oneDNN primitive creation
  for (int rep = 0; rep < kReps; ++rep) {
    for (size_t j = 0; j < n; ++j) {
      const size_t i = (j + rep) % n;  // rotate the order: no candidate always runs first
      const auto t0 = std::chrono::steady_clock::now();
      run(static_cast<int>(i));
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      best[i] = std::min(best[i], ms);
    }
  }
  // Candidates within kClose of the fastest are apart by less than a shared machine's noise
  // (repeated runs of one GEMM vary by ~5 %): they get kMoreReps more interleaved rounds.
  {
    const double b = *std::min_element(best.begin(), best.end());
    std::vector<size_t> close;
    for (size_t i = 0; i < n; ++i)
      if (best[i] <= b * kClose) close.push_back(i);
    for (int rep = 0; close.size() > 1 && rep < kMoreReps; ++rep) {
      for (size_t j = 0; j < close.size(); ++j) {
        const size_t i = close[(j + rep) % close.size()];
        const auto t0 = std::chrono::steady_clock::now();
        run(static_cast<int>(i));
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        best[i] = std::min(best[i], ms);
      }
    }
  }
  const size_t pick = static_cast<size_t>(std::min_element(best.begin(), best.end()) - best.begin());
  TuneEntry e;
  e.chosen = names[pick];
  for (size_t i = 0; i < n; ++i) e.ms.emplace_back(names[i], best[i]);
  std::lock_guard<std::mutex> lock(tune_mutex());
  tune_map()[key] = e;
  return static_cast<int>(pick);
}

// "key -> chosen (cand=ms ...)" for every shape class tuned so far.
inline std::vector<std::string> tune_table() {
  std::lock_guard<std::mutex> lock(tune_mutex());
  std::vector<std::string> out;
  for (const auto& kv : tune_map()) {
    std::ostringstream s;
    s << kv.first << " -> " << kv.second.chosen << " (";
    for (size_t i = 0; i < kv.second.ms.size(); ++i)
      s << (i ? " " : "") << kv.second.ms[i].first << "=" << std::round(kv.second.ms[i].second * 100) / 100 << "ms";
    s << ")";
    out.push_back(s.str());
  }
  return out;
}

inline void tune_reset() {
  std::lock_guard<std::mutex> lock(tune_mutex());
  tune_map().clear();
}

}  // namespace fastpeft
