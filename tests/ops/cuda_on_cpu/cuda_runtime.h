// Stands in for CUDA's header in a CPU build of the kernels: see runtime.h.
#pragma once
#include "runtime.h"
