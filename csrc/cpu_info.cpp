// What the C++ CPU backend does on this machine, for `python -m fastpeft info` and the bench:
// which GEMM libraries can run each dtype (gemm.h) and which configuration each op chose for
// each shape class it has seen (tune.h).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "gemm.h"
#include "tune.h"

namespace {

// One line per dtype: "<dtype>: aten ok; onednn ok|<why not>".
std::vector<std::string> gemm_libs() {
  std::vector<std::string> out;
  for (auto st : {at::kFloat, at::kDouble}) {
    const std::string why = fastpeft::onednn_why_not(st);
    out.push_back(std::string(c10::toString(st)) + ": aten ok; onednn " + (why.empty() ? "ok" : why));
  }
  return out;
}

std::vector<std::string> tune_table() { return fastpeft::tune_table(); }

void tune_reset() { fastpeft::tune_reset(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cpu, m) {
  m.def("gemm_libs() -> str[]", &gemm_libs);
  m.def("tune_table() -> str[]", &tune_table);
  m.def("tune_reset() -> ()", &tune_reset);
}
