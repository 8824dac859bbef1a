// Device helpers shared by the CUDA kernels of tsgb_ext (csrc/cuda/*.cu).
//
// Only inline/templated code lives here; every .cu keeps its kernels in an anonymous namespace
// and registers one op with TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/tsgb_common.h"

namespace tsgb {
namespace cuda_detail {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `items` work items of `per_block` each. Capped so that
// the grid stays a reasonable size; the kernels loop over the rest.
inline unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20)));
}

// Smallest power of two >= v (v >= 1), capped at `cap`.
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

template <typename A>
__device__ __forceinline__ A sign_of(A v) {
  return static_cast<A>((v > A(0)) - (v < A(0)));
}

// Sum over `width` consecutive lanes (width a power of two <= 32); every lane gets the sum.
// All 32 lanes of the warp must call it.
template <typename A>
__device__ __forceinline__ A lane_group_allreduce(A v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off, width);
  }
  return v;
}

// A register vector for 16-byte loads/stores.
template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace cuda_detail
}  // namespace tsgb
