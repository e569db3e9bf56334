// Runtime of the CUDA emulation (read cuda_emu.h first). A block's threads are fibers (ucontext) on the calling OS
// thread: each runs until it waits at a barrier (__syncthreads, a warp intrinsic) or returns, then the scheduler
// resumes the next ready fiber in thread order. So every thread really is in flight at once between barriers, a
// thread that reads another's unsynchronized write reads a stale value (deterministically), and switching costs
// ~1 us instead of an OS context switch. The sanitizers are told about the fibers: TSan sees each fiber as a
// thread of its own, with happens-before only where a barrier, the block start/end or the launch puts it (so a
// missing barrier is a reported data race), and ASan follows the stack switches.
#include "cuda_emu.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

// Under TSan this file is compiled *without* -fsanitize=thread (BITFAST_EMU_TSAN=1 instead): the scheduler's own
// bookkeeping is shared by all fibers by design and must stay invisible to TSan; the kernels' memory is what TSan
// watches, with happens-before given only through the __tsan_release/acquire calls below.
#if defined(__SANITIZE_THREAD__) || defined(BITFAST_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

namespace bitfast_emu {
namespace {

constexpr size_t kStack = 256 << 10;  // per fiber; ASan's redzones make frames several times larger

enum class State { ready, blocked, done };

struct Fiber {  // one CUDA thread; the stack and TSan context are kept across launches
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::done;
  ThreadCtx idx;
  void* tsan = nullptr;
  void* fake_stack = nullptr;  // ASan's fake-stack handle while switched out
};

struct Warp {
  unsigned live = 0, arrived = 0, mask = 0;  // lane bitmasks: not returned, waiting, the mask being synced
  uint64_t gen = 0;                          // bumped when a warp barrier completes
  uint64_t slot[2][32] = {};                 // exchange slots per lane, double-buffered by gen parity
  char sync[2] = {};                         // TSan sync objects, by gen parity (see hb_release)
};

// The launch now running; its blocks run one after another.
struct Team {
  dim3 grid, block;
  int nthreads = 0, cur = -1;  // cur: the running fiber
  const std::function<void()>* body = nullptr;
  int live = 0, arrived = 0;   // block barrier: threads not returned, threads waiting
  uint64_t bar_gen = 0;        // bumped when the block barrier completes
  int64_t block_index = 0;
  const char* site_file = nullptr;
  int site_line = 0;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory
  ucontext_t sched;
  void* sched_tsan = nullptr;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  // Addresses TSan's happens-before is attached to, two of each: arrivals at barrier generation g (or the exits of
  // block b) release into [g & 1] (block: [(b + 1) & 1]) and the waiters acquire [g & 1] (the next block's threads:
  // [b & 1]) when they resume. A fiber that resumes late must not acquire what others released at the *next*
  // barrier or in the same block, or it would be ordered after writes it races with.
  char block_sync[2] = {}, bar_sync[2] = {};
};

Team* g_team = nullptr;
dim3 g_none(0, 0, 0);
cudaError_t g_last_error = cudaSuccess;
ThreadCtx g_host_ctx{};
std::vector<Fiber>& pool() {
  static std::vector<Fiber> fibers(1024);
  return fibers;
}

void hb_release(void* p) {
#ifdef EMU_TSAN
  __tsan_release(p);
#endif
  (void)p;
}
void hb_acquire(void* p) {
#ifdef EMU_TSAN
  __tsan_acquire(p);
#endif
  (void)p;
}

[[noreturn]] void fatal(const char* what) {
  const ThreadCtx& c = g_team && g_team->cur >= 0 ? pool()[size_t(g_team->cur)].idx : g_host_ctx;
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, c.block.x, c.block.y, c.block.z,
               c.thread.x, c.thread.y, c.thread.z);
  std::fflush(stderr);
  std::abort();
}

Team& team() {
  if (!g_team || g_team->cur < 0) fatal("a kernel intrinsic was called outside a kernel");
  return *g_team;
}
Fiber& me(Team& t) { return pool()[size_t(t.cur)]; }
Warp& my_warp(Team& t) { return t.warps[size_t(t.cur / 32)]; }
unsigned my_bit(Team& t) { return 1u << (t.cur % 32); }

// Fiber -> scheduler. `final`: this fiber never resumes (ASan may drop its fake stack).
void to_scheduler(Team& t, bool final) {
  Fiber& f = me(t);
#ifdef EMU_TSAN
  __tsan_switch_to_fiber(t.sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.fake_stack, t.sched_bottom, t.sched_size);
#endif
  (void)final;
  swapcontext(&f.ctx, &t.sched);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &t.sched_bottom, &t.sched_size);
#endif
}

// Scheduler -> fiber tid, until it blocks or finishes.
void run_fiber(Team& t, int tid) {
  Fiber& f = pool()[size_t(tid)];
  t.cur = tid;
#ifdef EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&t.sched_fake, f.stack.get(), kStack);
#endif
  swapcontext(&t.sched, &f.ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(t.sched_fake, nullptr, nullptr);
#endif
  t.cur = -1;
}

// The running fiber waits until woken (state set back to ready by whoever completes its barrier).
void wait_here(Team& t) {
  me(t).state = State::blocked;
  to_scheduler(t, false);
}
void wake(Team& t, int first, int count) {
  for (int i = first; i < first + count; ++i)
    if (pool()[size_t(i)].state == State::blocked) pool()[size_t(i)].state = State::ready;
}

void release_block_barrier(Team& t) {
  t.arrived = 0;
  ++t.bar_gen;
  wake(t, 0, t.nthreads);
}

// Lanes `mask` of the running fiber's warp meet.
void warp_barrier(Team& t, unsigned mask) {
  Warp& w = my_warp(t);
  if (!(mask & my_bit(t))) fatal("a *_sync intrinsic called by a lane that is not in its mask");
  if ((mask & w.live) != mask) fatal("a *_sync mask names a lane that has returned from the kernel");
  if (w.arrived == 0) w.mask = mask;
  else if (w.mask != mask) fatal("lanes of one warp are in *_sync calls with different masks");
  w.arrived |= my_bit(t);
  char* sync = &w.sync[w.gen & 1];
  hb_release(sync);
  if (w.arrived == mask) {
    w.arrived = 0;
    ++w.gen;
    const int base = t.cur / 32 * 32;
    wake(t, base, t.nthreads - base < 32 ? t.nthreads - base : 32);
  } else {
    wait_here(t);
  }
  hb_acquire(sync);
}

// The running fiber returned from the kernel.
void thread_exit(Team& t) {
  Warp& w = my_warp(t);
  if (w.arrived && (w.mask & my_bit(t))) fatal("returned while lanes of its warp wait for it in a *_sync call");
  w.live &= ~my_bit(t);
  --t.live;
  if (t.arrived > 0 && t.arrived == t.live) release_block_barrier(t);  // the others no longer wait for it
  hb_release(&t.block_sync[(t.block_index + 1) & 1]);
  me(t).state = State::done;
}

void fiber_main() {
  Team& t = *g_team;
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t.sched_bottom, &t.sched_size);
#endif
  hb_acquire(&t.block_sync[t.block_index & 1]);  // the launch's inputs, the previous block's shared memory
  (*t.body)();
  thread_exit(t);
  to_scheduler(t, true);
  fatal("a finished fiber was resumed");
}

// The state every block starts in: every thread ready at the top of the kernel, no one waiting, dynamic shared
// memory poisoned (0xFF bytes: NaN as floats).
void start_block(Team& t, int64_t b) {
  t.live = t.nthreads;
  t.arrived = 0;
  for (size_t i = 0; i < t.warps.size(); ++i) {
    const int lanes = t.nthreads - int(i) * 32 < 32 ? t.nthreads - int(i) * 32 : 32;
    t.warps[i] = Warp{};
    t.warps[i].live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }
  if (!t.smem.empty()) std::memset(t.smem.data(), 0xFF, t.smem.size());
  const uint3 blk = make_uint3(unsigned(b % t.grid.x), unsigned(b / t.grid.x % t.grid.y),
                               unsigned(b / (int64_t(t.grid.x) * t.grid.y)));
  for (int tid = 0; tid < t.nthreads; ++tid) {
    Fiber& f = pool()[size_t(tid)];
    if (!f.stack) f.stack.reset(new char[kStack]);
#ifdef EMU_TSAN
    if (!f.tsan) f.tsan = __tsan_create_fiber(0);
#endif
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(f.stack.get(), kStack);  // frames of the previous block left redzones
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = State::ready;
    f.fake_stack = nullptr;
    f.idx.block = blk;
    f.idx.thread = make_uint3(unsigned(tid % t.block.x), unsigned(tid / t.block.x % t.block.y),
                              unsigned(tid / (t.block.x * t.block.y)));
  }
}

// Runs ready fibers in thread order until all are done; a pass with none ready is a deadlock.
void run_block(Team& t) {
  for (int done = 0; done < t.nthreads;) {
    bool progress = false;
    done = 0;
    for (int tid = 0; tid < t.nthreads; ++tid) {
      if (pool()[size_t(tid)].state == State::ready) run_fiber(t, tid), progress = true;
      done += pool()[size_t(tid)].state == State::done;
    }
    if (!progress && done < t.nthreads)
      fatal(t.arrived ? "deadlock: threads wait in __syncthreads() for threads that never come"
                      : "deadlock: lanes wait in a *_sync intrinsic for lanes that never come");
  }
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

ThreadCtx& ctx() { return g_team && g_team->cur >= 0 ? pool()[size_t(g_team->cur)].idx : g_host_ctx; }
const dim3& block_dim() { return g_team ? g_team->block : g_none; }
const dim3& grid_dim() { return g_team ? g_team->grid : g_none; }
void* dynamic_smem() { return team().smem.data(); }
int lane() { return team().cur % 32; }

cudaError_t launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const cudaError_t e = check_config(grid, block, smem);
  if (e != cudaSuccess) return g_last_error = e;
  if (g_team) fatal("launch from inside a kernel (dynamic parallelism is not emulated)");
  Team t;
  t.grid = grid;
  t.block = block;
  t.nthreads = int(block.x * block.y * block.z);
  t.body = &body;
  t.warps.resize(size_t(t.nthreads + 31) / 32);
  t.smem.resize(smem);
#ifdef EMU_TSAN
  t.sched_tsan = __tsan_get_current_fiber();
#endif
  g_team = &t;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t b = 0; b < blocks; ++b) {
    t.block_index = b;
    start_block(t, b);
    hb_release(&t.block_sync[b & 1]);  // the host's writes before the launch (and the previous block's)
    run_block(t);
    hb_acquire(&t.block_sync[(b + 1) & 1]);  // this block's writes, for the host
  }
  g_team = nullptr;
  return cudaSuccess;
}

void syncthreads(const char* file, int line) {
  Team& t = team();
  if (t.arrived == 0) t.site_file = file, t.site_line = line;
  else if (t.site_line != line || std::strcmp(t.site_file, file) != 0)
    fatal("threads of a block wait at different __syncthreads() (divergent barrier)");
  char* sync = &t.bar_sync[t.bar_gen & 1];
  hb_release(sync);
  if (++t.arrived == t.live) release_block_barrier(t);
  else wait_here(t);
  hb_acquire(sync);
}

void syncwarp(unsigned mask) { warp_barrier(team(), mask); }

uint64_t exchange(unsigned mask, uint64_t v, int src) {
  Team& t = team();
  Warp& w = my_warp(t);
  // One barrier per exchange: the next exchange writes the other buffer, and the one after cannot start before
  // every lane has passed the next barrier, i.e. has read this one.
  uint64_t* slot = w.slot[w.gen & 1];
  slot[t.cur % 32] = v;
  warp_barrier(t, mask);  // every lane in the mask has offered its value
  if (src < 0 || src >= 32) return v;
  if (!(mask & (1u << src))) fatal("a shuffle reads a lane that is not in its mask");
  return slot[src];
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
