// Which instruction set the CPU kernels compiled more than once run with (cpu_isa.cpp).
#pragma once

#include <optional>
#include <string>

// The AVX2 and AVX-512 copies are built with GCC's target pragma, on x86-64 only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TSGB_HAVE_X86_TUS 1
#else
#define TSGB_HAVE_X86_TUS 0
#endif

// base##TSGB_ISA_SUFFIX: the name of an entry point of the kernel copy being compiled (the
// includer of a *_impl.h defines TSGB_ISA_SUFFIX: _default, _avx2, _avx512).
#define TSGB_ISA_CAT2(a, b) a##b
#define TSGB_ISA_CAT(a, b) TSGB_ISA_CAT2(a, b)
#define TSGB_ISA_NAME(base) TSGB_ISA_CAT(base, TSGB_ISA_SUFFIX)

namespace tsgb {

enum class CpuIsa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The active choice: the best this CPU runs, unless TSGB_CPU_ISA=default|avx2|avx512 (read once) or
// cpu_isa_op changed it.
CpuIsa cpu_isa();

// Op tsgb_ext::cpu_isa(str? set=None) -> str: the active name ("default", "avx2", "avx512");
// with `set` (one of those or "auto"), switches first and returns the previous name.
std::string cpu_isa_op(const std::optional<std::string>& set);

}  // namespace tsgb

// base_avx512(...), base_avx2(...) or base_default(...): the copy of a kernel entry point for
// the active instruction set (the callers declare the copies they use).
#if TSGB_HAVE_X86_TUS
#define TSGB_ISA_CALL(base, ...)                                                              \
  (::tsgb::cpu_isa() == ::tsgb::CpuIsa::kAvx512 ? base##_avx512(__VA_ARGS__)                  \
   : ::tsgb::cpu_isa() == ::tsgb::CpuIsa::kAvx2 ? base##_avx2(__VA_ARGS__)                    \
                                                : base##_default(__VA_ARGS__))
#else
#define TSGB_ISA_CALL(base, ...) base##_default(__VA_ARGS__)
#endif
