// A CPU build of the kernels (see ../../runtime.h): one stream, which orders nothing (launches are synchronous).
#pragma once
#include "../../runtime.h"
namespace c10::cuda {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
