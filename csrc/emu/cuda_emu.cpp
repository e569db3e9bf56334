// Runtime of the CUDA emulation (read cuda_emu.h first): a team of OS threads per launch, one per CUDA thread of
// a block, walks the blocks in order; one mutex guards the block's barrier and warp state. Every wait has a
// watchdog (BITFAST_EMU_TIMEOUT_S, default 300 s), so a barrier that can never complete aborts with its site
// instead of hanging CI.
#include "cuda_emu.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace bitfast_emu {
namespace {

struct Warp {
  unsigned live = 0, arrived = 0, mask = 0;  // lane bitmasks: not returned, waiting, the mask being synced
  uint64_t gen = 0;                          // bumped when a warp barrier completes
  uint64_t slot[32] = {};                    // exchange slots, one per lane
  std::condition_variable cv;
};

// The block now running (blocks never overlap) and the launch it belongs to.
struct Team {
  dim3 grid, block;
  int nthreads = 0;
  std::mutex mu;
  std::condition_variable bar_cv, end_cv;
  int live = 0, arrived = 0, exited = 0;  // threads not returned, at the barrier, done with this block
  uint64_t bar_gen = 0, block_gen = 0;
  const char* site_file = nullptr;
  int site_line = 0;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory
};

Team* g_team = nullptr;
dim3 g_none(0, 0, 0);
cudaError_t g_last_error = cudaSuccess;
thread_local ThreadCtx t_ctx;
thread_local int t_tid = -1;

[[noreturn]] void fatal(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, t_ctx.block.x, t_ctx.block.y,
               t_ctx.block.z, t_ctx.thread.x, t_ctx.thread.y, t_ctx.thread.z);
  std::fflush(stderr);
  std::abort();
}

std::chrono::seconds timeout() {
  const char* s = std::getenv("BITFAST_EMU_TIMEOUT_S");
  return std::chrono::seconds(s ? std::atoi(s) : 300);
}

// Waits on cv until done(); aborts naming `what` if that takes longer than the watchdog allows.
template <typename F> void wait(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, F done,
                                const char* what) {
  if (!cv.wait_for(lk, timeout(), done)) fatal(what);
}

Team& team() {
  if (!g_team) fatal("a kernel intrinsic was called outside a launch");
  return *g_team;
}

Warp& my_warp(Team& t) { return t.warps[t_tid / 32]; }
unsigned my_bit() { return 1u << (t_tid % 32); }

void release_barrier(Team& t) {
  t.arrived = 0;
  ++t.bar_gen;
  t.bar_cv.notify_all();
}

// Lanes `mask` of this thread's warp meet; t.mu held.
void warp_barrier(Team& t, unsigned mask, std::unique_lock<std::mutex>& lk) {
  Warp& w = my_warp(t);
  if (!(mask & my_bit())) fatal("a *_sync intrinsic called by a lane that is not in its mask");
  if ((mask & w.live) != mask) fatal("a *_sync mask names a lane that has returned from the kernel");
  if (w.arrived == 0) w.mask = mask;
  else if (w.mask != mask) fatal("lanes of one warp are in *_sync calls with different masks");
  w.arrived |= my_bit();
  if (w.arrived == mask) {
    w.arrived = 0;
    ++w.gen;
    w.cv.notify_all();
    return;
  }
  const uint64_t gen = w.gen;
  wait(lk, w.cv, [&] { return w.gen != gen; }, "deadlock in a *_sync intrinsic (a lane in the mask never came)");
}

// The state every block starts in: all threads live, none waiting, dynamic shared memory poisoned; t.mu held.
void reset_block(Team& t) {
  t.live = t.nthreads;
  t.exited = t.arrived = 0;
  for (size_t i = 0; i < t.warps.size(); ++i) {
    const int lanes = t.nthreads - int(i) * 32 < 32 ? t.nthreads - int(i) * 32 : 32;
    t.warps[i].live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    t.warps[i].arrived = 0;
  }
  if (!t.smem.empty()) std::memset(t.smem.data(), 0xFF, t.smem.size());
  ++t.block_gen;
}

// This thread returned from the kernel for the current block; waits until the whole block has.
void thread_exit(Team& t) {
  std::unique_lock<std::mutex> lk(t.mu);
  Warp& w = my_warp(t);
  if (w.arrived && (w.mask & my_bit())) fatal("returned while lanes of its warp wait for it in a *_sync call");
  w.live &= ~my_bit();
  --t.live;
  if (t.arrived > 0 && t.arrived == t.live) release_barrier(t);  // the others no longer wait for this thread
  if (++t.exited < t.nthreads) {
    const uint64_t gen = t.block_gen;
    wait(lk, t.end_cv, [&] { return t.block_gen != gen; }, "deadlock at the end of a block");
    return;
  }
  reset_block(t);  // last one out
  t.end_cv.notify_all();
}

uint3 unflatten(int64_t i, const dim3& d) {
  return make_uint3(unsigned(i % d.x), unsigned(i / d.x % d.y), unsigned(i / (int64_t(d.x) * d.y)));
}

cudaError_t check_config(dim3 grid, dim3 block, size_t smem) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024 || block.z > 64) return cudaErrorInvalidConfiguration;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > 227 * 1024) return cudaErrorInvalidValue;  // sm_90's opt-in maximum per block
  return cudaSuccess;
}

}  // namespace

ThreadCtx& ctx() { return t_ctx; }
const dim3& block_dim() { return g_team ? g_team->block : g_none; }
const dim3& grid_dim() { return g_team ? g_team->grid : g_none; }
void* dynamic_smem() { return team().smem.data(); }
int lane() { return t_tid % 32; }

cudaError_t launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const cudaError_t e = check_config(grid, block, smem);
  if (e != cudaSuccess) return g_last_error = e;
  if (g_team) fatal("launch from inside a kernel (dynamic parallelism is not emulated)");
  Team t;
  t.grid = grid;
  t.block = block;
  t.nthreads = int(block.x * block.y * block.z);
  t.warps = std::vector<Warp>((t.nthreads + 31) / 32);
  t.smem.resize(smem);
  reset_block(t);
  g_team = &t;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  std::vector<std::thread> threads;
  threads.reserve(t.nthreads);
  for (int tid = 0; tid < t.nthreads; ++tid)
    threads.emplace_back([&t, &body, tid, blocks] {
      t_tid = tid;
      t_ctx.thread = unflatten(tid, t.block);
      for (int64_t b = 0; b < blocks; ++b) {
        t_ctx.block = unflatten(b, t.grid);
        body();
        thread_exit(t);
      }
    });
  for (auto& th : threads) th.join();
  g_team = nullptr;
  return cudaSuccess;
}

void syncthreads(const char* file, int line) {
  Team& t = team();
  std::unique_lock<std::mutex> lk(t.mu);
  if (t.arrived == 0) t.site_file = file, t.site_line = line;
  else if (t.site_line != line || std::strcmp(t.site_file, file) != 0) fatal("threads of a block wait at different __syncthreads() (divergent barrier)");
  if (++t.arrived == t.live) return release_barrier(t);
  const uint64_t gen = t.bar_gen;
  wait(lk, t.bar_cv, [&] { return t.bar_gen != gen; }, "deadlock in __syncthreads()");
}

void syncwarp(unsigned mask) {
  Team& t = team();
  std::unique_lock<std::mutex> lk(t.mu);
  warp_barrier(t, mask, lk);
}

uint64_t exchange(unsigned mask, uint64_t v, int src) {
  Team& t = team();
  std::unique_lock<std::mutex> lk(t.mu);
  Warp& w = my_warp(t);
  w.slot[lane()] = v;
  warp_barrier(t, mask, lk);  // every lane in the mask has offered its value
  uint64_t r = v;
  if (src >= 0 && src < 32) {
    if (!(mask & (1u << src))) fatal("a shuffle reads a lane that is not in its mask");
    r = w.slot[src];
  }
  warp_barrier(t, mask, lk);  // every lane has read before any slot is reused
  return r;
}

unsigned ballot(unsigned mask, bool pred) {
  unsigned bits = 0;
  for (int src = 0; src < 32; ++src)
    if (mask & (1u << src)) bits |= unsigned(exchange(mask, pred, src)) << src;
  return bits;
}

}  // namespace bitfast_emu

// The two runtime functions the kernels' launchers call (declared by cuda_runtime_api.h).
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = bitfast_emu::g_last_error;
  bitfast_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "unknown error";
  }
}
