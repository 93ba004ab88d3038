// COGVX_HD marks helpers compiled for both the host (C++ CPU kernels) and the device (CUDA).
#pragma once

#if defined(__CUDACC__)
#define COGVX_HD __host__ __device__ __forceinline__
#else
#define COGVX_HD inline
#endif
