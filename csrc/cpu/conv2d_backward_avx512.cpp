// The conv rule's kernels (conv2d_backward_impl.h) compiled for AVX-512 (F, BW, VL, DQ);
// conv2d_backward.cpp calls them on CPUs that have it. Everything this file includes is included before the
// target pragma, so only the kernels themselves get the wider instructions.
#include "cpu/cpu_isa.h"

#if TSGB_HAVE_X86_TUS
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/tsgb_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#define TSGB_CONV_RULE_ENTRY conv_rule_cpu_avx512
#include "cpu/conv2d_backward_impl.h"
#pragma GCC pop_options
#endif
