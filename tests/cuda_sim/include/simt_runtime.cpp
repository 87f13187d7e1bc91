// The SIMT-on-CPU runtime: fibers, the block scheduler, barriers, warp collectives, cp.async, launch checks.
// See simt_cpu.h for the execution model.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "simt_cpu.h"

#if defined(__x86_64__) && !defined(SIMT_UCONTEXT)
#define SIMT_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace simt {
namespace detail {
ThreadCtx* g_cur = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;
}  // namespace detail

namespace {

// ---- context switch -----------------------------------------------------------------------------------------------
#if SIMT_ASM_SWITCH
// simt_ctx_switch(save, to): pushes the callee-saved registers (and MXCSR / x87 control word) on the current stack,
// stores the stack pointer in *save, loads `to` and pops the same frame from there.
extern "C" void simt_ctx_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .p2align 4
  .globl simt_ctx_switch
  .hidden simt_ctx_switch
  .type simt_ctx_switch, @function
simt_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_ctx_switch, .-simt_ctx_switch
)");
constexpr const char* kSwitchName = "x86-64 assembly";
#else
constexpr const char* kSwitchName = "ucontext";
#endif

enum class State : uint8_t { Ready, AtBarrier, AtWarp, Done };

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  bool valid;
  unsigned group;
};

struct Fiber {
  ThreadCtx ctx;
  State state = State::Done;
#if SIMT_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + kStackBytes)
  std::vector<Copy> copies;  // queued cp.async copies, issue order, from copy_head on
  size_t copy_head = 0;
  unsigned groups = 0;  // committed cp.async groups
  const char* file = nullptr;  // where it waits
  int line = 0;
  const char* what = nullptr;
};

enum Kind : int { kNone = 0, kLdmatrix, kMma16816, kMma1688, kShfl, kSyncwarp };
const char* kind_name(int k) {
  switch (k) {
    case kLdmatrix: return "ldmatrix.sync.aligned.m8n8.x4";
    case kMma16816: return "mma.sync.aligned.m16n8k16";
    case kMma1688: return "mma.sync.aligned.m16n8k8.tf32";
    case kShfl: return "__shfl_*_sync";
    case kSyncwarp: return "__syncwarp";
    default: return "?";
  }
}

struct WarpSlot {
  int kind = kNone;
  bool aligned = false;  // ldmatrix / mma (.sync.aligned): every lane of the warp, none may have exited
  unsigned mask = 0, arrived = 0, done = 0, lanes = 0;  // lanes: those that exist (blockDim may end mid-warp)
  void (*compute)(struct WarpSlot&) = nullptr;
  void* args[32];
  // the lanes a pending collective waits for: those of its mask that exist and have not exited
  unsigned needed() const { return mask & lanes & ~done; }
};

struct LdmArgs {
  const unsigned char* row;
  uint32_t* r;
  bool trans;
};
struct MmaArgs {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  bool bf16;
};
struct ShflArgs {
  uint64_t in, out;
  int mode, arg, width;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kCanaryBytes = 512;
constexpr unsigned char kCanary = 0xA5;
constexpr size_t kMaxDynamicSmem = 232448;  // 227 KiB: sm_90's opt-in limit per block
// The opt-in limit of the simulated card: 227 KiB, or SEG3D_SIMT_SMEM_OPTIN bytes (e.g. 101376, the 99 KiB of
// sm_86 / sm_89 / sm_120 cards), read at each use like SEG3D_SIMT_SMS.
size_t max_dynamic_smem() {
  const char* env = getenv("SEG3D_SIMT_SMEM_OPTIN");
  const long v = env ? atol(env) : 0;
  return v > 0 && static_cast<size_t>(v) < kMaxDynamicSmem ? static_cast<size_t>(v) : kMaxDynamicSmem;
}
constexpr size_t kDefaultSmem = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize

// ---- global state (one launch at a time; blocks run one after another in the launching OS thread) ---------------
std::vector<Fiber> g_fibers;
std::vector<WarpSlot> g_warps;
char* g_stacks = nullptr;
size_t g_stack_count = 0, g_page = 4096;
Fiber* g_running = nullptr;
#if SIMT_ASM_SWITCH
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_uc;
#endif
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
bool g_in_launch = false;
std::vector<int> g_order;  // the order in which a round resumes the block's threads
size_t g_pos = 0;          // position in g_order of the running thread

int g_nthreads = 0, g_done = 0, g_at_barrier = 0;
const char* g_bar_file = nullptr;
int g_bar_line = 0;
bool g_failed = false;
std::string g_error;

unsigned char* g_smem = nullptr;
size_t g_smem_cap = 0, g_smem_bytes = 0;

cudaError_t g_last_error = cudaSuccess;  // what cudaGetLastError returns (and clears)
bool g_unchecked_failure = false;        // a simulation error not yet taken by cudaGetLastError
// SEG3D_SIMT_CP_ASYNC=early: each cp.async lands at issue (the earliest the hardware may), which shows a buffer
// refilled while others still read it; the default, "late", lands it at its wait, which shows a read before the wait.
bool g_cp_async_early = false;
std::string g_failure_text;
std::unordered_map<const void*, int> g_max_dynamic_smem;

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof(buf), fmt, ap);
  return buf;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where(const ThreadCtx& c) {
  return format("block (%u, %u, %u) thread (%u, %u, %u) [warp %d lane %d]", detail::g_block_idx.x,
                detail::g_block_idx.y, detail::g_block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z,
                c.warp, c.lane);
}

std::string lanes_str(unsigned m) {
  std::string s;
  for (int l = 0; l < 32;) {
    if (!(m >> l & 1u)) {
      ++l;
      continue;
    }
    int e = l;
    while (e + 1 < 32 && (m >> (e + 1) & 1u)) ++e;
    if (!s.empty()) s += ",";
    s += e == l ? format("%d", l) : format("%d-%d", l, e);
    l = e + 1;
  }
  return s.empty() ? "none" : s;
}

// ---- fibers -------------------------------------------------------------------------------------------------------
void switch_to_scheduler(Fiber* f) {
#if SIMT_ASM_SWITCH
  simt_ctx_switch(&f->sp, g_sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
}

void resume(Fiber* f) {
  g_running = f;
  detail::g_cur = &f->ctx;
#if SIMT_ASM_SWITCH
  simt_ctx_switch(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched_uc, &f->uc);
#endif
  g_running = nullptr;
}

void switch_fiber(Fiber* from, Fiber* to) {
  g_running = to;
  detail::g_cur = &to->ctx;
#if SIMT_ASM_SWITCH
  simt_ctx_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

void thread_exit(Fiber* f);

void fiber_main() {
  Fiber* f = g_running;
  g_body(g_body_ctx);
  thread_exit(f);  // does not return
}

void ensure_stacks(size_t n) {
  if (n <= g_stack_count) return;
  if (g_stacks) munmap(g_stacks, g_stack_count * (kStackBytes + g_page));
  g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t per = kStackBytes + g_page;
  void* p = mmap(nullptr, n * per, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map fiber stacks");
  g_stacks = static_cast<char*>(p);
  g_stack_count = n;
  for (size_t i = 0; i < n; ++i) mprotect(g_stacks + i * per, g_page, PROT_NONE);  // guard page below each stack
}

void init_fiber(Fiber& f, size_t i) {
  f.stack_lo = g_stacks + i * (kStackBytes + g_page) + g_page;
#if SIMT_ASM_SWITCH
  // Frame popped by simt_ctx_switch: [mxcsr, fpu cw][r15 r14 r13 r12 rbx rbp][return = fiber_main][0]; the stack
  // pointer is then 8 mod 16 at fiber_main's entry, as after a call.
  auto* top = reinterpret_cast<uint64_t*>(f.stack_lo + kStackBytes);  // 16-byte aligned
  uint64_t* sp = top - 9;
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  const uint32_t csr[2] = {mxcsr, fpucw};
  std::memcpy(&sp[0], csr, 8);
  for (int r = 1; r <= 6; ++r) sp[r] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

Fiber* current(const char* what) {
  if (!g_running) {
    fprintf(stderr, "simt: %s called outside a simulated kernel\n", what);
    abort();
  }
  return g_running;
}

[[noreturn]] void fail_in_fiber(Fiber* f, std::string msg) {
  g_failed = true;
  g_error = where(f->ctx) + ": " + msg;
  f->state = State::Done;
  switch_to_scheduler(f);
  abort();  // never resumed
}

// ---- barriers -----------------------------------------------------------------------------------------------------
// The running thread stops (state s) and hands over to the next ready thread of this round, or at the end of the
// round to the scheduler (barrier release, deadlock check, next round). Returns when it is resumed.
void block(Fiber* f, State s) {
  f->state = s;
  for (size_t p = g_pos + 1; p < g_order.size(); ++p) {
    Fiber* next = &g_fibers[g_order[p]];
    if (next->state == State::Ready) {
      g_pos = p;
      switch_fiber(f, next);
      return;
    }
  }
  switch_to_scheduler(f);
}

// Completes the warp's pending collective when every lane it waits for has arrived: computed here (the args of the
// waiting lanes stay valid on their stacks), the waiting lanes made ready. Returns whether it completed.
bool try_complete(WarpSlot& w, int warp) {
  if (w.arrived != w.needed()) return false;
  w.compute(w);
  const unsigned waiting = w.arrived;
  w.arrived = 0;
  w.kind = kNone;
  for (int l = 0; l < 32; ++l)
    if (waiting >> l & 1u) g_fibers[warp * 32 + l].state = State::Ready;
  return true;
}

void thread_exit(Fiber* f) {
  f->state = State::Done;
  ++g_done;
  f->copies.clear();  // copies never waited for: their shared memory ends with the block
  f->copy_head = 0;
  WarpSlot& w = g_warps[f->ctx.warp];
  w.done |= 1u << f->ctx.lane;
  if (w.arrived && (w.mask >> f->ctx.lane & 1u)) {
    if (w.aligned)
      fail_in_fiber(f, format("%s reached by only part of warp %d: lane %d returned while lanes %s wait for it",
                              kind_name(w.kind), f->ctx.warp, f->ctx.lane, lanes_str(w.arrived).c_str()));
    try_complete(w, f->ctx.warp);  // exited lanes of a shuffle's mask are not waited for
  }
  block(f, State::Done);
  abort();  // never resumed
}

// Warp collective over the lanes of `mask`: the last of them to arrive computes it for all and goes on; the others
// resume afterwards. aligned (ldmatrix, mma): every lane of the warp must execute it. Otherwise (shuffles,
// __syncwarp) lanes of the mask that have exited or do not exist are not waited for (reading one is an error).
void collective(Fiber* f, int kind, unsigned mask, bool aligned, void* args, void (*compute)(WarpSlot&)) {
  WarpSlot& w = g_warps[f->ctx.warp];
  const unsigned bit = 1u << f->ctx.lane;
  if (!(mask & bit)) fail_in_fiber(f, format("%s with a mask (0x%08x) without the calling lane", kind_name(kind), mask));
  if (aligned && w.lanes != 0xffffffffu)
    fail_in_fiber(f, format("%s in warp %d, which has only lanes %s (the block ends mid-warp)", kind_name(kind),
                            f->ctx.warp, lanes_str(w.lanes).c_str()));
  if (aligned && w.done)
    fail_in_fiber(f, format("%s reached by only part of warp %d: lanes %s have returned", kind_name(kind),
                            f->ctx.warp, lanes_str(w.done).c_str()));
  if (w.arrived == 0) {
    w.kind = kind;
    w.mask = mask;
    w.aligned = aligned;
    w.compute = compute;
  } else if (w.kind != kind || w.mask != mask) {
    fail_in_fiber(f, format("lanes of warp %d at different warp collectives: lanes %s wait at %s (mask 0x%08x), "
                            "lane %d reached %s (mask 0x%08x)",
                            f->ctx.warp, lanes_str(w.arrived).c_str(), kind_name(w.kind), w.mask, f->ctx.lane,
                            kind_name(kind), mask));
  }
  w.args[f->ctx.lane] = args;
  w.arrived |= bit;
  if (try_complete(w, f->ctx.warp)) {
    f->state = State::Ready;  // (try_complete made every arrived lane ready; this one simply goes on)
    return;
  }
  f->what = kind_name(kind);
  block(f, State::AtWarp);
}

// ---- collectives --------------------------------------------------------------------------------------------------
struct HalfTable {
  float v[65536];
  HalfTable() {
    for (int i = 0; i < 65536; ++i) v[i] = __half2float(__half{static_cast<uint16_t>(i)});
  }
};
const HalfTable g_half_table;

inline float b16_to_float(uint16_t v, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{v}) : g_half_table.v[v];
}

void compute_ldmatrix(WarpSlot& w) {
  uint16_t m[4][8][8];  // matrix, row, column
  const bool trans = static_cast<LdmArgs*>(w.args[0])->trans;
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<LdmArgs*>(w.args[l]);
    if (a->trans != trans) kernel_error("ldmatrix: lanes disagree on .trans");
    std::memcpy(m[l / 8][l % 8], a->row, 16);  // lane l: row l % 8 of matrix l / 8
  }
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<LdmArgs*>(w.args[l]);
    const int g = l / 4, t = l % 4;  // row g, columns 2t and 2t + 1 (of the transpose with .trans)
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = trans ? m[i][2 * t][g] : m[i][g][2 * t];
      const uint16_t hi = trans ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
      a->r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    }
  }
}

void compute_mma16816(WarpSlot& w) {
  float A[16][16], B[16][8], C[16][8];
  const bool bf16 = static_cast<MmaArgs*>(w.args[0])->bf16;
  for (int l = 0; l < 32; ++l) {
    auto* p = static_cast<MmaArgs*>(w.args[l]);
    if (p->bf16 != bf16) kernel_error("mma.m16n8k16: lanes disagree on the operand type");
    const int g = l / 4, t = l % 4;
    auto lo = [&](uint32_t r) { return b16_to_float(static_cast<uint16_t>(r & 0xffffu), bf16); };
    auto hi = [&](uint32_t r) { return b16_to_float(static_cast<uint16_t>(r >> 16), bf16); };
    // A (row-major fragment): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); low half first
    A[g][2 * t] = lo(p->a[0]), A[g][2 * t + 1] = hi(p->a[0]);
    A[g + 8][2 * t] = lo(p->a[1]), A[g + 8][2 * t + 1] = hi(p->a[1]);
    A[g][2 * t + 8] = lo(p->a[2]), A[g][2 * t + 9] = hi(p->a[2]);
    A[g + 8][2 * t + 8] = lo(p->a[3]), A[g + 8][2 * t + 9] = hi(p->a[3]);
    // B (column fragment): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
    B[2 * t][g] = lo(p->b[0]), B[2 * t + 1][g] = hi(p->b[0]);
    B[2 * t + 8][g] = lo(p->b[1]), B[2 * t + 9][g] = hi(p->b[1]);
    // C/D: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
    C[g][2 * t] = p->d[0], C[g][2 * t + 1] = p->d[1], C[g + 8][2 * t] = p->d[2], C[g + 8][2 * t + 1] = p->d[3];
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = C[i][j];
      for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];  // products exact in fp32
      C[i][j] = s;
    }
  for (int l = 0; l < 32; ++l) {
    auto* p = static_cast<MmaArgs*>(w.args[l]);
    const int g = l / 4, t = l % 4;
    p->d[0] = C[g][2 * t], p->d[1] = C[g][2 * t + 1], p->d[2] = C[g + 8][2 * t], p->d[3] = C[g + 8][2 * t + 1];
  }
}

float tf32_value(uint32_t u, int lane, const char* which) {
  if ((u & 0x1fffu) && (u & 0x7f800000u) != 0x7f800000u)
    kernel_error("mma.m16n8k8.tf32: lane %d operand %s = 0x%08x is not a tf32 value (low 13 bits set: convert "
                 "with cvt.rna.tf32.f32)",
                 lane, which, u);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void compute_mma1688(WarpSlot& w) {
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    auto* p = static_cast<MmaArgs*>(w.args[l]);
    const int g = l / 4, t = l % 4;
    // A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B: b0 (k = t, n = g), b1 (k = t+4, n = g)
    A[g][t] = tf32_value(p->a[0], l, "a0"), A[g + 8][t] = tf32_value(p->a[1], l, "a1");
    A[g][t + 4] = tf32_value(p->a[2], l, "a2"), A[g + 8][t + 4] = tf32_value(p->a[3], l, "a3");
    B[t][g] = tf32_value(p->b[0], l, "b0"), B[t + 4][g] = tf32_value(p->b[1], l, "b1");
    C[g][2 * t] = p->d[0], C[g][2 * t + 1] = p->d[1], C[g + 8][2 * t] = p->d[2], C[g + 8][2 * t + 1] = p->d[3];
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = C[i][j];
      for (int k = 0; k < 8; ++k) s += A[i][k] * B[k][j];  // tf32 products exact in fp32
      C[i][j] = s;
    }
  for (int l = 0; l < 32; ++l) {
    auto* p = static_cast<MmaArgs*>(w.args[l]);
    const int g = l / 4, t = l % 4;
    p->d[0] = C[g][2 * t], p->d[1] = C[g][2 * t + 1], p->d[2] = C[g + 8][2 * t], p->d[3] = C[g + 8][2 * t + 1];
  }
}

void compute_shfl(WarpSlot& w) {
  for (int l = 0; l < 32; ++l) {
    if (!(w.arrived >> l & 1u)) continue;
    auto* p = static_cast<ShflArgs*>(w.args[l]);
    const int width = p->width, base = l / width * width;
    int src;
    switch (p->mode) {
      case 0: src = base + (p->arg % width + width) % width; break;          // __shfl_sync
      case 1: src = l - p->arg >= base ? l - p->arg : l; break;              // __shfl_up_sync
      case 2: src = l + p->arg < base + width ? l + p->arg : l; break;       // __shfl_down_sync
      default: src = (l ^ p->arg) < base + width && (l ^ p->arg) >= base ? (l ^ p->arg) : l;  // xor
    }
    if (!(w.arrived >> src & 1u))
      kernel_error("__shfl_*_sync: lane %d reads lane %d, which %s", l, src,
                   !(w.mask >> src & 1u) ? "is not in the mask" : !(w.lanes >> src & 1u) ? "does not exist (the block "
                   "ends mid-warp)" : "has exited");
    p->out = static_cast<ShflArgs*>(w.args[src])->in;
  }
}

void compute_nothing(WarpSlot&) {}

// ---- deadlock report ----------------------------------------------------------------------------------------------
std::string describe_block() {
  std::string s;
  int i = 0;
  const int n = g_nthreads;
  while (i < n) {
    const Fiber& f = g_fibers[i];
    int j = i;
    auto same = [&](const Fiber& o) {
      return o.state == f.state && (f.state != State::AtBarrier || (o.line == f.line)) &&
             (f.state != State::AtWarp || o.what == f.what);
    };
    while (j + 1 < n && same(g_fibers[j + 1])) ++j;
    s += format("\n  threads %d-%d: ", i, j);
    switch (f.state) {
      case State::Done: s += "returned"; break;
      case State::Ready: s += "ready"; break;
      case State::AtBarrier: s += format("at __syncthreads (%s:%d)", f.file, f.line); break;
      case State::AtWarp: s += format("at %s", f.what); break;
    }
    i = j + 1;
  }
  return s;
}

std::vector<int> schedule_order(int n) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const char* env = getenv("SEG3D_SIMT_SCHEDULE");
  const std::string mode = env ? env : "";
  if (mode.empty() || mode == "forward") return order;
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
    return order;
  }
  if (mode.rfind("random", 0) == 0) {
    unsigned seed = 0;
    if (mode.size() > 7 && mode[6] == ':') seed = static_cast<unsigned>(strtoul(mode.c_str() + 7, nullptr, 10));
    seed ^= detail::g_block_idx.x * 0x9e3779b9u ^ detail::g_block_idx.y * 0x85ebca6bu ^ detail::g_block_idx.z;
    std::mt19937 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    return order;
  }
  throw std::runtime_error("SEG3D_SIMT_SCHEDULE must be forward, reverse or random[:seed], got '" + mode + "'");
}

void run_block(const dim3& block) {
  const int n = g_nthreads;
  const char* cp_mode = getenv("SEG3D_SIMT_CP_ASYNC");
  g_cp_async_early = cp_mode && std::string(cp_mode) == "early";
  if (cp_mode && !g_cp_async_early && std::string(cp_mode) != "late" && *cp_mode)
    throw std::runtime_error("SEG3D_SIMT_CP_ASYNC must be early or late, got '" + std::string(cp_mode) + "'");
  std::memset(g_smem, 0xFF, g_smem_bytes);  // NaN in fp32, fp16 and bf16: a read of what nobody wrote shows
  std::memset(g_smem + g_smem_bytes, kCanary, kCanaryBytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.ctx.thread_idx = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    f.ctx.linear = i;
    f.ctx.lane = i % 32;
    f.ctx.warp = i / 32;
    f.state = State::Ready;
    f.copies.clear();
    f.copy_head = 0;
    f.groups = 0;
    init_fiber(f, i);
  }
  for (size_t w = 0; w < g_warps.size(); ++w) {
    WarpSlot& s = g_warps[w];
    s.kind = kNone;
    s.mask = s.arrived = s.done = 0;
    const int lanes = std::min(32, n - static_cast<int>(w) * 32);
    s.lanes = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
  }
  g_done = g_at_barrier = 0;
  g_bar_file = nullptr;
  g_order = schedule_order(n);
  for (;;) {  // rounds: the first ready thread runs, and each thread that stops hands over to the next ready one
    int ran = 0;
    for (size_t p = 0; p < g_order.size(); ++p) {
      Fiber& f = g_fibers[g_order[p]];
      if (f.state != State::Ready) continue;
      g_pos = p;
      resume(&f);  // returns at the end of the round
      ++ran;
      break;
    }
    if (g_failed) return;
    if (g_done == n) break;
    if (g_at_barrier > 0 && g_at_barrier == n - g_done) {
      for (int i = 0; i < n; ++i)
        if (g_fibers[i].state == State::AtBarrier) g_fibers[i].state = State::Ready;
      g_at_barrier = 0;
      g_bar_file = nullptr;
      continue;
    }
    if (ran == 0) {
      g_failed = true;
      g_error = format("block (%u, %u, %u) cannot make progress (deadlock):", detail::g_block_idx.x,
                       detail::g_block_idx.y, detail::g_block_idx.z) +
                describe_block();
      return;
    }
  }
  for (size_t i = 0; i < kCanaryBytes; ++i)
    if (g_smem[g_smem_bytes + i] != kCanary) {
      g_failed = true;
      g_error = format("block (%u, %u, %u) wrote past the end of its %zu bytes of dynamic shared memory (byte %zu)",
                       detail::g_block_idx.x, detail::g_block_idx.y, detail::g_block_idx.z, g_smem_bytes,
                       g_smem_bytes + i);
      return;
    }
}

void set_error(cudaError_t e) { g_last_error = e; }

}  // namespace

// ---- API ----------------------------------------------------------------------------------------------------------
void kernel_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  if (g_running) fail_in_fiber(g_running, msg);
  throw std::runtime_error("simt: " + msg);
}

void syncthreads(const char* file, int line) {
  Fiber* f = current("__syncthreads");
  if (g_at_barrier == 0) {
    g_bar_file = file;
    g_bar_line = line;
  } else if (g_bar_line != line || std::strcmp(g_bar_file, file) != 0) {
    fail_in_fiber(f, format("__syncthreads at %s:%d while other threads wait at %s:%d (a barrier in divergent "
                            "code)",
                            file, line, g_bar_file, g_bar_line));
  }
  f->file = file;
  f->line = line;
  ++g_at_barrier;
  block(f, State::AtBarrier);
}

unsigned char* dynamic_smem() {
  current("dynamic shared memory");
  return g_smem;
}

void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid) {
  Fiber* f = current("cp.async");
  auto* dst = static_cast<unsigned char*>(smem_dst);
  auto* src = static_cast<const unsigned char*>(gmem_src);
  if (bytes != 4 && bytes != 8 && bytes != 16) fail_in_fiber(f, format("cp.async of %d bytes (4, 8 or 16)", bytes));
  if (reinterpret_cast<uintptr_t>(dst) % bytes)
    fail_in_fiber(f, format("cp.async: shared address %p (offset %td) is not aligned to its %d bytes", smem_dst,
                            dst - g_smem, bytes));
  if (reinterpret_cast<uintptr_t>(src) % bytes)
    fail_in_fiber(f, format("cp.async: global address %p is not aligned to its %d bytes", gmem_src, bytes));
  if (dst < g_smem || dst + bytes > g_smem + g_smem_bytes)
    fail_in_fiber(f, format("cp.async: destination %p (offset %td) is outside the block's %zu bytes of dynamic "
                            "shared memory",
                            smem_dst, dst - g_smem, g_smem_bytes));
  if (valid && src + bytes > g_smem && src < g_smem + g_smem_cap)
    fail_in_fiber(f, format("cp.async: source %p is in shared memory", gmem_src));
  if (g_cp_async_early) {
    if (valid) std::memcpy(dst, src, bytes);
    else std::memset(dst, 0, bytes);
    return;
  }
  f->copies.push_back(Copy{dst, src, bytes, valid, f->groups});
}

void cp_async_commit() { ++current("cp.async.commit_group")->groups; }

void cp_async_wait(int n) {
  Fiber* f = current("cp.async.wait_group");
  if (n < 0) fail_in_fiber(f, format("cp.async.wait_group %d", n));
  // groups 0 .. groups - 1 are committed; all but the n most recent must be complete
  const long long limit = static_cast<long long>(f->groups) - n;
  while (f->copy_head < f->copies.size() && static_cast<long long>(f->copies[f->copy_head].group) < limit) {
    const Copy& c = f->copies[f->copy_head++];
    if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
    else std::memset(c.dst, 0, c.bytes);
  }
  if (f->copy_head == f->copies.size()) {
    f->copies.clear();
    f->copy_head = 0;
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans) {
  Fiber* f = current("ldmatrix");
  auto* row = static_cast<const unsigned char*>(smem_row);
  if (reinterpret_cast<uintptr_t>(row) % 16)
    fail_in_fiber(f, format("ldmatrix: row address %p (shared offset %td) is not 16-byte aligned", smem_row,
                            row - g_smem));
  if (row < g_smem || row + 16 > g_smem + g_smem_bytes)
    fail_in_fiber(f, format("ldmatrix: row address %p (offset %td) is outside the block's %zu bytes of dynamic "
                            "shared memory",
                            smem_row, row - g_smem, g_smem_bytes));
  LdmArgs args{row, r, trans};
  collective(f, kLdmatrix, 0xffffffffu, true, &args, compute_ldmatrix);
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  MmaArgs args{d, a, b, bf16};
  collective(current("mma.sync"), kMma16816, 0xffffffffu, true, &args, compute_mma16816);
}

void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  MmaArgs args{d, a, b, false};
  collective(current("mma.sync"), kMma1688, 0xffffffffu, true, &args, compute_mma1688);
}

uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width) {
  Fiber* f = current("__shfl_*_sync");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail_in_fiber(f, format("__shfl_*_sync: width %d is not a power of two <= 32", width));
  ShflArgs args{bits, 0, mode, arg, width};
  collective(f, kShfl, mask, false, &args, compute_shfl);
  return args.out;
}

void syncwarp(unsigned mask) { collective(current("__syncwarp"), kSyncwarp, mask, false, nullptr, compute_nothing); }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* ctx) {
  if (g_in_launch) throw std::runtime_error("simt: a kernel launch from inside a simulated kernel");
  if (g_unchecked_failure) {  // reported once, here; the next launch starts clean
    g_unchecked_failure = false;
    g_last_error = cudaSuccess;
    throw std::runtime_error("simt: a launch after a failed launch whose error nobody read (cudaGetLastError): " +
                             g_failure_text);
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || !threads || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (smem_bytes > max_dynamic_smem()) {
    set_error(cudaErrorInvalidValue);
    return;
  }
  if (smem_bytes > kDefaultSmem) {
    auto it = g_max_dynamic_smem.find(kernel);
    if (it == g_max_dynamic_smem.end() || static_cast<size_t>(it->second) < smem_bytes) {
      set_error(cudaErrorInvalidValue);  // needs cudaFuncAttributeMaxDynamicSharedMemorySize first
      return;
    }
  }
  const int n = static_cast<int>(threads);
  ensure_stacks(n);
  if (static_cast<int>(g_fibers.size()) < n) g_fibers.resize(n);
  g_warps.assign((n + 31) / 32, WarpSlot{});
  if (smem_bytes + kCanaryBytes > g_smem_cap) {
    free(g_smem);
    g_smem_cap = (smem_bytes + kCanaryBytes + 4095) / 4096 * 4096;
    g_smem = static_cast<unsigned char*>(aligned_alloc(128, g_smem_cap));
    if (!g_smem) throw std::runtime_error("simt: cannot allocate shared memory");
  }
  g_smem_bytes = smem_bytes;
  g_nthreads = n;
  g_body = body;
  g_body_ctx = ctx;
  g_failed = false;
  g_error.clear();
  g_in_launch = true;
  detail::g_grid_dim = grid;
  detail::g_block_dim = block;
  for (unsigned z = 0; z < grid.z && !g_failed; ++z)
    for (unsigned y = 0; y < grid.y && !g_failed; ++y)
      for (unsigned x = 0; x < grid.x && !g_failed; ++x) {
        detail::g_block_idx = uint3{x, y, z};
        try {
          run_block(block);
        } catch (...) {
          g_in_launch = false;
          detail::g_cur = nullptr;
          throw;
        }
      }
  g_in_launch = false;
  detail::g_cur = nullptr;
  if (g_failed) {
    g_failure_text = "simulated kernel failed: " + g_error;
    g_unchecked_failure = true;
    set_error(cudaErrorLaunchFailure);
  }
}

cudaError_t set_func_attribute(const void* kernel, int attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > max_dynamic_smem()) return cudaErrorInvalidValue;
    g_max_dynamic_smem[kernel] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return cudaErrorInvalidValue;
}

cudaError_t peek_last_error() { return g_last_error; }

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  g_unchecked_failure = false;
  return e;
}

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return g_failure_text.c_str();
  }
  return "unknown error";
}

cudaError_t set_device(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t device_attribute(int* value, int attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: {
      const char* env = getenv("SEG3D_SIMT_SMS");
      *value = env && atoi(env) > 0 ? atoi(env) : 132;
      break;
    }
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(max_dynamic_smem()); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

const char* context_switch_kind() { return kSwitchName; }

}  // namespace simt
