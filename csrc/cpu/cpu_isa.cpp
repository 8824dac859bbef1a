// The instruction-set choice of the CPU kernels compiled more than once (cpu_isa.h).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace tsgb {
namespace {

bool supported(CpuIsa isa) {
#if TSGB_HAVE_X86_TUS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == CpuIsa::kAvx2) return avx2;
  if (isa == CpuIsa::kAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return true;
#else
  return isa == CpuIsa::kDefault;
#endif
}

CpuIsa best() {
  return supported(CpuIsa::kAvx512) ? CpuIsa::kAvx512
         : supported(CpuIsa::kAvx2) ? CpuIsa::kAvx2
                                    : CpuIsa::kDefault;
}

const char* name_of(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "default";
}

std::atomic<int> active{-1};
std::once_flag init_once;

CpuIsa parse(const std::string& s, const char* where) {
  if (s == "auto") return best();
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (s == name_of(isa)) {
      TORCH_CHECK(supported(isa), where, ": ", s, " was asked for, but ",
                  TSGB_HAVE_X86_TUS ? "this CPU lacks it" : "this build has only the default "
                                                            "kernels");
      return isa;
    }
  }
  TORCH_CHECK(false, where, ": expected one of 'auto', 'default', 'avx2', 'avx512', got '", s,
              "'");
}

void init() {
  std::call_once(init_once, [] {
    CpuIsa isa = best();
    if (const char* env = std::getenv("TSGB_CPU_ISA")) {
      // A value this CPU or build cannot use keeps the best choice, silently here: the Python
      // loader (tsgb_ext/ops/loader.py) reports it once as a Python warning. A TORCH_WARN from
      // this lazy first use went to stderr, outside Python's warning filters.
      try {
        isa = parse(env, "TSGB_CPU_ISA");
      } catch (const c10::Error&) {
      }
    }
    int expected = -1;
    active.compare_exchange_strong(expected, static_cast<int>(isa));
  });
}

}  // namespace

CpuIsa cpu_isa() {
  const int v = active.load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<CpuIsa>(v);
  init();
  return static_cast<CpuIsa>(active.load());
}

std::string cpu_isa_op(const std::optional<std::string>& set) {
  const CpuIsa before = cpu_isa();
  if (set.has_value()) {
    active.store(static_cast<int>(parse(*set, "tsgb_ext.cpu_isa")));
  }
  return name_of(before);
}

}  // namespace tsgb
