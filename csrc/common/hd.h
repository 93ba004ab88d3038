// COGVX_HD marks helpers compiled for both the host (C++ CPU kernels) and the device (CUDA).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define COGVX_HD __host__ __device__ __forceinline__
#else
#define COGVX_HD inline
#endif

namespace cogvx {

// ceil(a / b) for a >= 0, b > 0: block counts.
COGVX_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cogvx
