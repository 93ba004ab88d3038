// Dtype dispatch shared by the CPU kernels: float32, float16, bfloat16 (fp32 math inside).
#pragma once
#include <ATen/Dispatch.h>

#define COGVX_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
