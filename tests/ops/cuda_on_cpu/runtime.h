// The CUDA execution model on the CPU, for checking the logic of the kernels in csrc/ on a machine
// without a GPU (tests/ops/cpu_kernels.py builds them with it, tests/ops/test_kernels_on_cpu.py runs them).
//
// A launch runs the grid's blocks one after another. The threads of a block are fibers (ucontext) on the
// calling thread: each runs until it reaches a barrier or ends, then the next one runs. __syncthreads() is
// a barrier of the block's threads, __shfl_xor_sync one of the warp's lanes with an exchange of values,
// and __shared__ memory is one static array (blocks do not overlap; each block finds what the last one
// left, as a block on a GPU may find another's leftovers). The order in which the fibers run between two
// barriers alternates from one launch of a kernel to its next (thread 0 first, then the last thread first),
// so a result that depends on the order of unsynchronised threads differs between two runs of the same call. A barrier that
// not every thread of its block (or lane of its warp) reaches, a shuffle from a lane that does not exist,
// or an invalid launch configuration throws, naming the kernel. So does a load or store at an address
// its type's alignment does not allow (the kernels' 16-byte packs): the sources are compiled with
// -fsanitize=alignment and the handler below reports to the launch. What this does not model: the GPU's
// instructions (__expf is expf here), memory coalescing, and warps running in lockstep between
// synchronisation points.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;

enum class State { kReady, kAtSync, kAtShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStack]};
  State state = State::kReady;
  uint3 index;
};

// The launch being run: its fibers and the one running now.
struct Launch {
  const char* name = "";
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  std::function<void()> body;
  uint3 block_index;
  dim3 block_dim, grid_dim;
  unsigned char slots[1024][8];  // the values each lane offers in a shuffle
  std::string failure;

  void yield(State state) {
    running->state = state;
    swapcontext(&running->context, &scheduler);
  }
};

inline Launch* current = nullptr;
inline std::map<std::string, unsigned long> launches;  // per kernel, for the order of its next launch

inline void fiber_entry() {
  current->body();
  current->running->state = State::kDone;  // uc_link returns to the scheduler
}

// Runs every fiber that is ready until it waits or ends, in this launch's order.
inline void run_ready(Launch& launch, bool reverse) {
  const int n = static_cast<int>(launch.fibers.size());
  for (int k = 0; k < n; ++k) {
    Fiber& fiber = launch.fibers[reverse ? n - 1 - k : k];
    if (fiber.state == State::kReady) {
      launch.running = &fiber;
      swapcontext(&launch.scheduler, &fiber.context);
      launch.running = nullptr;
    }
  }
}

// Releases the barriers every participant has reached; false when none could be (a deadlock).
inline bool release(Launch& launch) {
  const int n = static_cast<int>(launch.fibers.size());
  bool released = false;
  const bool block_waits = std::all_of(launch.fibers.begin(), launch.fibers.end(),
                                       [](const Fiber& f) { return f.state == State::kAtSync; });
  if (block_waits) {
    for (Fiber& f : launch.fibers) f.state = State::kReady;
    return true;
  }
  for (int first = 0; first < n; first += kWarp) {
    const int last = std::min(n, first + kWarp);
    if (std::all_of(launch.fibers.begin() + first, launch.fibers.begin() + last,
                    [](const Fiber& f) { return f.state == State::kAtShuffle; })) {
      for (int t = first; t < last; ++t) launch.fibers[t].state = State::kReady;
      released = true;
    }
  }
  return released;
}

inline std::string census(const Launch& launch) {
  int sync = 0, shuffle = 0, done = 0;
  for (const Fiber& f : launch.fibers) {
    sync += f.state == State::kAtSync;
    shuffle += f.state == State::kAtShuffle;
    done += f.state == State::kDone;
  }
  return std::to_string(sync) + " threads at __syncthreads, " + std::to_string(shuffle) + " at a shuffle, " +
         std::to_string(done) + " ended, of " + std::to_string(launch.fibers.size()) + " (block " +
         std::to_string(launch.block_index.x) + ")";
}

// The launch configuration: <<<grid, block, shared bytes, stream>>> with one-dimensional grid and block.
struct Config {
  int64_t grid, block;
  template <typename Stream = int>
  Config(int64_t grid_, int64_t block_, size_t = 0, Stream = {}) : grid(grid_), block(block_) {}
};

// Called by the code -fsanitize=alignment adds, at a misaligned access (in place of the sanitizer's runtime,
// which is not linked: the failure goes to the launch, which throws).
struct SourceLocation {
  const char* file;
  unsigned int line, column;
};
struct TypeMismatch {
  SourceLocation where;
  const void* type;
  unsigned char log_alignment, check_kind;
};

template <typename... Params, typename... Args>
void launch(const char* name, Config config, void (*kernel)(Params...), Args&&... args) {
  if (config.grid < 1 || config.grid > 2147483647 || config.block < 1 || config.block > 1024) {
    throw std::runtime_error(std::string(name) + ": invalid launch configuration, grid " +
                             std::to_string(config.grid) + " x block " + std::to_string(config.block));
  }
  if (current != nullptr) {
    throw std::runtime_error(std::string(name) + ": launched from inside a kernel");
  }
  const std::tuple<Params...> params(std::forward<Args>(args)...);  // passed by value, as a launch does
  Launch launch;
  launch.name = name;
  launch.block_dim = dim3(static_cast<unsigned int>(config.block));
  launch.grid_dim = dim3(static_cast<unsigned int>(config.grid));
  launch.fibers.resize(config.block);
  launch.body = [&] { std::apply(kernel, params); };
  const bool reverse = launches[name]++ % 2 == 1;
  current = &launch;
  for (int64_t b = 0; b < config.grid && launch.failure.empty(); ++b) {
    launch.block_index = uint3{static_cast<unsigned int>(b), 0, 0};
    for (int64_t t = 0; t < config.block; ++t) {
      Fiber& fiber = launch.fibers[t];
      fiber.state = State::kReady;
      fiber.index = uint3{static_cast<unsigned int>(t), 0, 0};
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStack;
      fiber.context.uc_link = &launch.scheduler;
      makecontext(&fiber.context, fiber_entry, 0);
    }
    while (launch.failure.empty()) {
      run_ready(launch, reverse);
      if (std::all_of(launch.fibers.begin(), launch.fibers.end(),
                      [](const Fiber& f) { return f.state == State::kDone; })) {
        break;
      }
      if (!release(launch)) {
        launch.failure = "a barrier that not every thread reaches: " + census(launch);
      }
    }
  }
  current = nullptr;
  if (!launch.failure.empty()) {
    // Fibers left waiting are abandoned with their stacks (nothing they hold needs destroying).
    throw std::runtime_error(std::string(name) + ": " + launch.failure);
  }
}

}  // namespace emu

// Weak: every source that includes this defines it, and the linker keeps one. The thread that made the
// access stops there (its next instruction may fault on the address), and the launch throws.
extern "C" __attribute__((weak, used)) void __ubsan_handle_type_mismatch_v1(emu::TypeMismatch* data,
                                                                          uintptr_t address) {
  emu::Launch* launch = emu::current;
  if (launch == nullptr || launch->running == nullptr) {
    return;  // host code: not this model's to judge
  }
  if (launch->failure.empty()) {
    launch->failure = "misaligned access at " + std::string(data->where.file) + ":" +
                      std::to_string(data->where.line) + ": address " + std::to_string(address) +
                      " is not a multiple of " + std::to_string(1u << data->log_alignment) + " bytes";
  }
  launch->yield(emu::State::kDone);  // never resumed
}

#define threadIdx (::emu::current->running->index)
#define blockIdx (::emu::current->block_index)
#define blockDim (::emu::current->block_dim)
#define gridDim (::emu::current->grid_dim)

inline void __syncthreads() { emu::current->yield(emu::State::kAtSync); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = emu::kWarp) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  emu::Launch& launch = *emu::current;
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % emu::kWarp;
  const int source = t - lane + (lane ^ lane_mask);
  const int lanes = std::min<int>(emu::kWarp, static_cast<int>(launch.fibers.size()) - (t - lane));
  if (mask != 0xffffffffu || width != emu::kWarp || lane_mask < 0 || lane_mask >= emu::kWarp ||
      source - (t - lane) >= lanes) {
    if (launch.failure.empty()) {
      launch.failure = "__shfl_xor_sync from lane " + std::to_string(lane ^ lane_mask) + " with mask " +
                       std::to_string(mask) + " and width " + std::to_string(width) + " in a warp of " +
                       std::to_string(lanes) + " lanes (only whole warps are modelled)";
    }
    return value;
  }
  std::memcpy(launch.slots[t], &value, sizeof(T));
  launch.yield(emu::State::kAtShuffle);  // every lane has offered its value
  T out;
  std::memcpy(&out, launch.slots[source], sizeof(T));
  launch.yield(emu::State::kAtShuffle);  // every lane has read before any offers again
  return out;
}

inline float __expf(float x) { return std::exp(x); }
using std::fmax;
using std::fmaxf;
using std::fminf;
using std::isnan;
