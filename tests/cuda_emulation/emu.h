// A CPU emulation of the CUDA execution model, just enough to run vfm's CUDA kernels
// (csrc/cuda/*.cu compiled as C++ with -DVFM_CUDA_EMULATION) on a machine without a GPU, so that
// tests check the kernels' logic (indexing, vector/scalar paths, block reductions, in-place
// writes, formulas) against the reference.  Not a performance model.
//
// * A launch runs its blocks one after another; the threads of a block are cooperative fibers
//   (ucontext).  __syncthreads() yields to a scheduler that runs every live thread up to its next
//   barrier, so one scheduler round is one barrier phase.  A round in which some threads reach a
//   __syncthreads() while others exit is a divergent barrier (undefined on a GPU): it is counted
//   in vfm_emu::divergent_barriers.  Warp shuffles yield too (they may sit in warp-uniform
//   branches, which is legal), but are not counted.
// * __shared__ locals become statics (one block runs at a time); dynamic shared memory is one
//   static buffer; warp shuffles exchange values through per-thread slots between two barriers
//   (every thread of the block takes part, as in vfm's kernels).
// * Device intrinsics map to their exact host counterparts (ex2.approx -> exp2f, __logf -> logf).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace vfm_emu {

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};
inline Idx thread_idx, block_idx, block_dim, grid_dim;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};
inline std::vector<Fiber> fibers;
inline int current = 0;
inline ucontext_t scheduler;
inline std::function<void()>* body = nullptr;
inline std::vector<double> slots;
inline std::vector<char> at_block_barrier;  // per thread: parked in __syncthreads (not a shuffle)
alignas(16) inline unsigned char dyn_smem[64 * 1024];
inline int forced_block_threads = 0;  // > 0: the kce launch uses this many threads per block
inline long divergent_barriers = 0;

inline unsigned char* dynamic_shared_memory() { return dyn_smem; }
inline int block_threads(int asked) { return forced_block_threads > 0 ? forced_block_threads : asked; }

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

inline void syncthreads() {
  at_block_barrier[current] = 1;
  yield();
  at_block_barrier[current] = 0;
}

inline void fiber_entry() {
  (*body)();
  fibers[current].done = true;
  swapcontext(&fibers[current].ctx, &scheduler);
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  const int t = static_cast<int>(thread_idx.x);
  slots[t] = static_cast<double>(v);
  yield();
  const T r = static_cast<T>(slots[t ^ lane_mask]);
  yield();
  return r;
}

inline int syncthreads_or(int p) {
  const int t = static_cast<int>(thread_idx.x);
  slots[t] = p ? 1.0 : 0.0;
  syncthreads();
  int any = 0;
  for (unsigned j = 0; j < block_dim.x; ++j) any |= slots[j] != 0.0;
  syncthreads();
  return any;
}

template <typename F>
int launch(int64_t grid_x, int64_t grid_y, int threads, size_t smem, F&& f) {
  if (smem > sizeof(dyn_smem)) return static_cast<int>(cudaErrorInvalidValue);
  std::function<void()> fn = f;
  body = &fn;
  fibers.assign(threads, Fiber());
  slots.assign(threads, 0.0);
  at_block_barrier.assign(threads, 0);
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  grid_dim = {static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), 1};
  for (int64_t by = 0; by < grid_y; ++by) {
    for (int64_t bx = 0; bx < grid_x; ++bx) {
      block_idx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
      for (auto& fb : fibers) {
        fb.stack.resize(256 * 1024);
        fb.done = false;
        getcontext(&fb.ctx);
        fb.ctx.uc_stack.ss_sp = fb.stack.data();
        fb.ctx.uc_stack.ss_size = fb.stack.size();
        fb.ctx.uc_link = nullptr;
        makecontext(&fb.ctx, fiber_entry, 0);
      }
      for (;;) {
        int waiting = 0, finished = 0, at_sync = 0;
        for (int t = 0; t < threads; ++t) {
          if (fibers[t].done) continue;
          current = t;
          thread_idx = {static_cast<unsigned>(t), 0, 0};
          swapcontext(&scheduler, &fibers[t].ctx);
          if (fibers[t].done)
            ++finished;
          else
            ++waiting;
          at_sync += at_block_barrier[t];
        }
        if (waiting == 0) break;
        if (finished > 0 && at_sync > 0) ++divergent_barriers;
      }
    }
  }
  body = nullptr;
  return 0;
}

}  // namespace vfm_emu

#define threadIdx (vfm_emu::thread_idx)
#define blockIdx (vfm_emu::block_idx)
#define blockDim (vfm_emu::block_dim)
#define gridDim (vfm_emu::grid_dim)
#define __syncthreads() vfm_emu::syncthreads()
#define __syncthreads_or(p) vfm_emu::syncthreads_or(p)
#define __shfl_xor_sync(mask, v, lane_mask) vfm_emu::shfl_xor((v), (lane_mask))
#define __ldg(p) (*(p))
#define __logf(x) logf(x)
#define cudaGetErrorString(code) ((code) == cudaSuccess ? "no error" : "emulated CUDA error")
