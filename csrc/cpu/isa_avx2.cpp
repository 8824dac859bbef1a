// The CPU kernels written as vectorisable loops (the conv rule, csrc/cpu/conv2d_backward_impl.h;
// max_pool2d, csrc/cpu/max_pool2d_impl.h) compiled for AVX2 + FMA; their entry files
// (conv2d_backward.cpp, max_pool2d.cpp) call this copy on CPUs that have it (cpu_isa.h).
// Everything these kernels include is included before the target pragma, so only the kernels
// themselves get the wider instructions.
#include "cpu/cpu_isa.h"

#if TSGB_HAVE_X86_TUS
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/tsgb_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TSGB_ISA_SUFFIX _avx2
#include "cpu/conv2d_backward_impl.h"
#include "cpu/max_pool2d_impl.h"
#pragma GCC pop_options
#endif
