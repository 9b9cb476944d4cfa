// The CUDA execution model on the CPU, for checking the logic of the kernels in csrc/ on a machine
// without a GPU (tests/ops/cpu_kernels.py builds them with it, tests/ops/test_kernels_on_cpu.py runs them).
//
// A launch runs the grid's blocks one after another. The threads of a block are fibers (ucontext) on the
// calling thread, run one warp at a time: a warp's lanes run until each has reached __syncthreads or ended
// (a shuffle, which every lane of the warp must reach, is the only other point where they wait), then the
// next warp runs, and once every thread waits at the same __syncthreads they all go on. __shared__
// memory is one static array per variable, filled with 0xFF bytes (NaN) before each block, so a read of
// shared memory no thread has written is NaN. Blocks, warps and lanes run in ascending order on one launch
// of a kernel and in descending order on its next: a result that depends on the order of unsynchronised
// threads (in one warp, across warps or across blocks) differs between two runs of the same call. Float
// arithmetic in a kernel flushes subnormal inputs and results to zero, as the extension's -ftz=true
// build does on the GPU (x86's MXCSR FTZ and DAZ, set for the launch). These fail the launch, which
// throws naming the kernel: a __syncthreads that not every thread of the block reaches, threads waiting at
// different __syncthreads, a shuffle that not every lane of a full warp reaches (CUDA leaves both
// undefined), a block larger than the kernel's __launch_bounds__ or 1024 threads, an exception or a
// misaligned load or store in a kernel (the sources are compiled with -fsanitize=alignment; the handler
// below reports to the launch). What this does not model: the GPU's instructions (__expf is glibc's expf
// here, and no multiply-add is fused), memory coalescing, warps running in lockstep between
// synchronisation points, and a thread losing a read-modify-write of shared or global memory to another:
// a thread runs on until it waits, so `x += v` from many threads adds every v here (the kernels use no
// atomics and keep such sums in per-thread slots reduced behind barriers).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
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
// Every __shared__ variable lies in one section, which the launcher fills with 0xFF before each block.
#define __shared__ static __attribute__((section("emu_shared")))
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;

enum class State { kReady, kAtSync, kAtShuffle, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  uint3 index;
  const char* sync_file = "";  // where it waits in __syncthreads
  int sync_line = 0;
};

// The launch being run: its fibers, their stacks, and the one running now.
struct Launch {
  explicit Launch(int64_t threads) : fibers(threads) {
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stacks_size = threads * (kStack + page);
    void* memory = mmap(nullptr, stacks_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
      throw std::runtime_error("cannot map the fibers' stacks");
    }
    stacks = static_cast<char*>(memory);
    for (int64_t t = 0; t < threads; ++t) {  // a guard page under each stack: an overflow faults
      mprotect(stack_of(t) - page, page, PROT_NONE);
    }
  }
  ~Launch() { munmap(stacks, stacks_size); }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  char* stack_of(int64_t t) { return stacks + t * (kStack + page) + page; }

  void fail(const std::string& why) {
    if (failure.empty()) {
      failure = why;
    }
  }

  void yield(State state) {
    running->state = state;
    swapcontext(&running->context, &scheduler);
  }

  const char* name = "";
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  std::function<void()> body;
  uint3 block_index;
  dim3 block_dim, grid_dim;
  unsigned char slots[1024][8];  // the values each lane offers in a shuffle
  std::string failure;
  char* stacks = nullptr;
  size_t stacks_size = 0, page = 0;
};

inline Launch* current = nullptr;
inline std::map<std::string, unsigned long> launches;  // per kernel, for the order of its next launch

inline void fiber_entry() {
  try {
    current->body();
  } catch (const std::exception& err) {
    current->fail(std::string("an exception in the kernel: ") + err.what());
  } catch (...) {
    current->fail("an exception in the kernel");
  }
  current->running->state = State::kDone;  // uc_link returns to the scheduler
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

// Runs one warp's lanes until each waits at __syncthreads or has ended, releasing its shuffles.
inline void run_warp(Launch& launch, int first, int last, bool reverse) {
  while (launch.failure.empty()) {
    for (int k = 0; k < last - first; ++k) {
      Fiber& fiber = launch.fibers[reverse ? last - 1 - k : first + k];
      if (fiber.state == State::kReady) {
        launch.running = &fiber;
        swapcontext(&launch.scheduler, &fiber.context);
        launch.running = nullptr;
      }
    }
    const auto begin = launch.fibers.begin() + first, end = launch.fibers.begin() + last;
    const bool at_shuffle = std::any_of(begin, end, [](const Fiber& f) { return f.state == State::kAtShuffle; });
    if (!at_shuffle) {
      return;
    }
    if (last - first != kWarp || !std::all_of(begin, end, [](const Fiber& f) { return f.state == State::kAtShuffle; })) {
      launch.fail("a shuffle that not every lane of a full warp reaches: " + census(launch));
      return;
    }
    for (auto f = begin; f != end; ++f) f->state = State::kReady;
  }
}

inline void run_block(Launch& launch, bool reverse) {
  const int n = static_cast<int>(launch.fibers.size());
  const int warps = (n + kWarp - 1) / kWarp;
  while (launch.failure.empty()) {
    for (int k = 0; k < warps && launch.failure.empty(); ++k) {
      const int w = reverse ? warps - 1 - k : k;
      run_warp(launch, w * kWarp, std::min(n, (w + 1) * kWarp), reverse);
    }
    if (!launch.failure.empty()) {
      return;
    }
    const Fiber& first = launch.fibers[0];
    if (std::all_of(launch.fibers.begin(), launch.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; })) {
      return;
    }
    if (!std::all_of(launch.fibers.begin(), launch.fibers.end(), [](const Fiber& f) { return f.state == State::kAtSync; })) {
      launch.fail("a __syncthreads that not every thread reaches: " + census(launch));
      return;
    }
    for (const Fiber& f : launch.fibers) {
      if (f.sync_line != first.sync_line || std::strcmp(f.sync_file, first.sync_file) != 0) {
        launch.fail("threads wait at different __syncthreads: " + std::string(first.sync_file) + ":" +
                    std::to_string(first.sync_line) + " and " + f.sync_file + ":" + std::to_string(f.sync_line));
        return;
      }
    }
    for (Fiber& f : launch.fibers) f.state = State::kReady;
  }
}

// Subnormal float inputs and results read as zero while it lives (nvcc's -ftz=true, which setup.py passes).
// Fibers made while it lives take it with their contexts (glibc's getcontext saves MXCSR).
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned int kFtz = 0x8000, kDaz = 0x0040;
  unsigned int saved_;
#else
  FlushSubnormals() = default;  // elsewhere the CPU keeps subnormals: results may differ from a GPU's there
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// The launch configuration: <<<grid, block, shared bytes, stream>>> with one-dimensional grid and block.
struct Config {
  int64_t grid, block, max_block = 1024;
  template <typename Stream = int>
  Config(int64_t grid_, int64_t block_, size_t = 0, Stream = {}) : grid(grid_), block(block_) {}
  Config& bounded(int64_t launch_bounds) {  // the kernel's __launch_bounds__
    max_block = launch_bounds;
    return *this;
  }
};

template <typename... Params, typename... Args>
void launch(const char* name, Config config, void (*kernel)(Params...), Args&&... args) {
  if (config.grid < 1 || config.grid > 2147483647 || config.block < 1 || config.block > 1024 ||
      config.block > config.max_block) {
    throw std::runtime_error(std::string(name) + ": invalid launch configuration, grid " +
                             std::to_string(config.grid) + " x block " + std::to_string(config.block) +
                             " (at most " + std::to_string(config.max_block) + " threads)");
  }
  if (current != nullptr) {
    throw std::runtime_error(std::string(name) + ": launched from inside a kernel");
  }
  const std::tuple<Params...> params(std::forward<Args>(args)...);  // passed by value, as a launch does
  Launch launch(config.block);
  launch.name = name;
  launch.block_dim = dim3(static_cast<unsigned int>(config.block));
  launch.grid_dim = dim3(static_cast<unsigned int>(config.grid));
  launch.body = [&] { std::apply(kernel, params); };
  const bool reverse = launches[name]++ % 2 == 1;
  const FlushSubnormals flush;  // for the launch: the fibers' contexts are taken inside it
  current = &launch;
  for (int64_t k = 0; k < config.grid && launch.failure.empty(); ++k) {
    const int64_t b = reverse ? config.grid - 1 - k : k;
    launch.block_index = uint3{static_cast<unsigned int>(b), 0, 0};
    if (__start_emu_shared != nullptr) {
      std::memset(__start_emu_shared, 0xFF, __stop_emu_shared - __start_emu_shared);
    }
    for (int64_t t = 0; t < config.block; ++t) {
      Fiber& fiber = launch.fibers[t];
      fiber.state = State::kReady;
      fiber.index = uint3{static_cast<unsigned int>(t), 0, 0};
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = launch.stack_of(t);
      fiber.context.uc_stack.ss_size = kStack;
      fiber.context.uc_link = &launch.scheduler;
      makecontext(&fiber.context, fiber_entry, 0);
    }
    run_block(launch, reverse);
  }
  current = nullptr;
  if (!launch.failure.empty()) {
    // Fibers left waiting are abandoned with their stacks (nothing they hold needs destroying).
    throw std::runtime_error(std::string(name) + ": " + launch.failure);
  }
}

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

}  // namespace emu

// Weak: every source that includes this defines it, and the linker keeps one; hidden: this library's calls
// reach this one even where another library of the process defines it. The thread that made the access
// stops there (its next instruction may fault on the address), and the launch throws.
extern "C" __attribute__((weak, used, visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(
    emu::TypeMismatch* data, uintptr_t address) {
  emu::Launch* launch = emu::current;
  if (launch == nullptr || launch->running == nullptr) {
    return;  // host code: not this model's to judge
  }
  launch->fail("misaligned access at " + std::string(data->where.file) + ":" + std::to_string(data->where.line) +
               ": address " + std::to_string(address) + " is not a multiple of " +
               std::to_string(1u << data->log_alignment) + " bytes");
  launch->yield(emu::State::kDone);  // never resumed
}

#define threadIdx (::emu::current->running->index)
#define blockIdx (::emu::current->block_index)
#define blockDim (::emu::current->block_dim)
#define gridDim (::emu::current->grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::Fiber& fiber = *emu::current->running;
  fiber.sync_file = file;
  fiber.sync_line = line;
  emu::current->yield(emu::State::kAtSync);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = emu::kWarp) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  emu::Launch& launch = *emu::current;
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % emu::kWarp;
  if (mask != 0xffffffffu || width != emu::kWarp || lane_mask < 0 || lane_mask >= emu::kWarp) {
    launch.fail("__shfl_xor_sync with mask " + std::to_string(mask) + ", lane mask " + std::to_string(lane_mask) +
                " and width " + std::to_string(width) + " (only whole warps are modelled)");
    launch.yield(emu::State::kDone);  // never resumed
  }
  std::memcpy(launch.slots[t], &value, sizeof(T));
  launch.yield(emu::State::kAtShuffle);  // every lane has offered its value
  T out;
  std::memcpy(&out, launch.slots[t - lane + (lane ^ lane_mask)], sizeof(T));
  launch.yield(emu::State::kAtShuffle);  // every lane has read before any offers again
  return out;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fdiv_rn(float x, float y) { return x / y; }  // IEEE division, rounded to nearest, as on the GPU
using std::fmax;
using std::fmaxf;
using std::fminf;
using std::isnan;
