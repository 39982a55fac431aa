// The SIMT engine of the emulated CUDA device: runs a grid of host-compiled kernels (see
// emu/cuda_shim.h) with the semantics of a GPU's threads, barriers and warps.
//
// Fiber engine (default): every CUDA thread of a block is a user-level fiber with its own stack;
// a hand-written x86-64 context switch (callee-saved registers and rsp, no system call) moves
// between them. A block's fibers run on one OS thread, switching only at __syncthreads and warp
// operations (run queue order: forward, reverse or random, TPO_EMU_SCHEDULE); blocks are spread
// over TPO_EMU_WORKERS OS threads. Threads engine (racecheck build, TPO_EMU_ENGINE=threads): one
// OS thread per CUDA thread with mutex/condvar rendezvous, so ThreadSanitizer sees real threads.
// Both share the rendezvous logic (class Block) and its checks.
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emu_rt.h"
#include "engine.h"

#ifdef TPO_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef TPO_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif
#ifdef TPO_EMU_VALGRIND
#include <valgrind/valgrind.h>
#endif

#if !defined(__x86_64__)
#error "the fiber engine's context switch is written for x86-64"
#endif

// ---- context switch ---------------------------------------------------------------------------
// tpo_emu_swap(save, next): pushes the callee-saved registers, stores rsp in *save, loads next as
// rsp, pops the registers saved there and returns into that context.
// tpo_emu_fiber_start: the first return of a new fiber lands here, with the entry function in r13
// and its argument in r12; the entry never returns.
extern "C" void tpo_emu_swap(void** save, void* next);
extern "C" void tpo_emu_fiber_start();
asm(R"(
    .text
    .globl tpo_emu_swap
    .hidden tpo_emu_swap
    .type tpo_emu_swap, @function
tpo_emu_swap:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size tpo_emu_swap, .-tpo_emu_swap

    .globl tpo_emu_fiber_start
    .hidden tpo_emu_fiber_start
    .type tpo_emu_fiber_start, @function
tpo_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size tpo_emu_fiber_start, .-tpo_emu_fiber_start
)");

namespace tpo_emu {

thread_local ThreadCtx* tls_cur = nullptr;

namespace {

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

const char* op_name(int op) {
    switch (op) {
    case WARP_SHFL_IDX: return "__shfl_sync";
    case WARP_SHFL_UP: return "__shfl_up_sync";
    case WARP_SHFL_DOWN: return "__shfl_down_sync";
    case WARP_SHFL_XOR: return "__shfl_xor_sync";
    case WARP_SYNC: return "__syncwarp";
    case WARP_BALLOT: return "__ballot_sync";
    case WARP_ANY: return "__any_sync";
    case WARP_ALL: return "__all_sync";
    }
    return "warp operation";
}
const char* bar_name(int k) {
    switch (k) {
    case BAR_COUNT: return "__syncthreads_count";
    case BAR_AND: return "__syncthreads_and";
    case BAR_OR: return "__syncthreads_or";
    }
    return "__syncthreads";
}
bool same_site(const char* a, const char* b) { return a == b || (a && b && std::strcmp(a, b) == 0); }
std::string xyz(uint3 v) { return fmt("(%u,%u,%u)", v.x, v.y, v.z); }

// ---- configuration ------------------------------------------------------------------------------
enum class Sched { Forward, Reverse, Random };
struct Config {
    bool threads = false;
    Sched sched = Sched::Forward;
    uint64_t seed = 0;
    unsigned workers = 1;
    size_t stack_bytes = 0;
};

bool read_config(Config& c, std::string& err) {
    const char* e = getenv("TPO_EMU_ENGINE");
    if (e && *e) {
        if (!strcmp(e, "threads")) c.threads = true;
        else if (!strcmp(e, "fibers")) c.threads = false;
        else return err = fmt("TPO_EMU_ENGINE=%s: expected fibers or threads", e), false;
    } else {
#ifdef TPO_EMU_TSAN
        c.threads = true;  // the racecheck build's purpose
#endif
    }
#ifndef TPO_EMU_SHARED_STATIC
    if (c.threads)
        return err = "TPO_EMU_ENGINE=threads needs the racecheck build (emu/build-kernels.sh racecheck), where "
                     "__shared__ is one object per kernel",
               false;
#endif
    const char* s = getenv("TPO_EMU_SCHEDULE");
    if (s && *s) {
        if (!strcmp(s, "forward")) c.sched = Sched::Forward;
        else if (!strcmp(s, "reverse")) c.sched = Sched::Reverse;
        else if (!strncmp(s, "random:", 7)) {
            char* end = nullptr;
            c.seed = strtoull(s + 7, &end, 10);
            if (end == s + 7 || *end) return err = fmt("TPO_EMU_SCHEDULE=%s: expected random:SEED (an integer)", s), false;
            c.sched = Sched::Random;
        } else {
            return err = fmt("TPO_EMU_SCHEDULE=%s: expected forward, reverse or random:SEED", s), false;
        }
    }
    unsigned hw = std::thread::hardware_concurrency();
    c.workers = hw ? hw : 1;
    const char* w = getenv("TPO_EMU_WORKERS");
    if (w && *w) {
        char* end = nullptr;
        long v = strtol(w, &end, 10);
        if (*end || v < 1 || v > 64) return err = fmt("TPO_EMU_WORKERS=%s: expected 1 to 64", w), false;
        c.workers = (unsigned)v;
    }
#ifdef TPO_EMU_SHARED_STATIC
    c.workers = 1;  // __shared__ is a plain static: one block at a time
#endif
#ifdef TPO_EMU_ASAN
    size_t kb = 256;
#else
    size_t kb = 64;
#endif
    const char* st = getenv("TPO_EMU_STACK_KB");
    if (st && *st) {
        char* end = nullptr;
        long v = strtol(st, &end, 10);
        if (*end || v < 16 || v > 65536) return err = fmt("TPO_EMU_STACK_KB=%s: expected 16 to 65536", st), false;
        kb = (size_t)v;
    }
    c.stack_bytes = kb * 1024;
    return true;
}

// ---- block state shared by both engines ---------------------------------------------------------
enum Wait : uint8_t { RUNNING = 0, AT_BARRIER, AT_WARP, EXITED };

struct Block;

// A saved execution context (fiber engine).
struct Ctx {
    void* sp = nullptr;
    void* stack_lo = nullptr;
    size_t stack_size = 0;
    void* asan_fake = nullptr;
    void* tsan_fiber = nullptr;
    ThreadCtx* tls = nullptr;
};

struct Thread : ThreadCtx {
    Block* blk = nullptr;
    unsigned linear = 0, lane = 0, warp = 0;
    Wait wait = RUNNING;
    const char* site = nullptr;  // where it waits (AT_BARRIER/AT_WARP)
    int op = 0;
    unsigned mask = 0;
    int arg = 0;
    uint64_t val = 0, res = 0;
    Ctx ctx;
};

struct PendingOp {
    unsigned mask, arrived;
    int op, width;
    const char* site;
    unsigned first_lane;
};

struct Warp {
    unsigned exist = 0, exited = 0;
    int nops = 0;
    PendingOp ops[32];
};

struct Abort {};  // unwinds an OS thread of the threads engine after a failure

struct Block {
    const EmuLaunch* L = nullptr;
    unsigned n = 0, nwarps = 0;
    Thread* th = nullptr;  // n threads
    Warp warps[32];
    // __syncthreads
    unsigned bar_arrived = 0, bar_first = 0;
    int bar_kind = 0, bar_acc = 0;
    const char* bar_site = nullptr;
    std::vector<unsigned> bar_waiters;
    unsigned live = 0, nexited = 0;
    bool failed = false;
    std::string msg;
    std::mutex mu;      // threads engine only
    bool locking = false;

    virtual ~Block() = default;
    // t waits until another thread wakes it (t->wait back to RUNNING).
    virtual void park(Thread* t, std::unique_lock<std::mutex>& lk) = 0;
    virtual void wake(Thread* t) = 0;
    // Wakes t to run before the threads already runnable (the lanes of a warp whose operation
    // completed: they go on while their stacks are in cache).
    virtual void wake_soon(Thread* t) { wake(t); }
    // t may give way to another runnable thread (random schedules).
    virtual void yield(Thread* t) {}
    [[noreturn]] virtual void fail_now(Thread* t, std::unique_lock<std::mutex>& lk) = 0;

    std::unique_lock<std::mutex> guard() {
        return locking ? std::unique_lock<std::mutex>(mu) : std::unique_lock<std::mutex>();
    }

    void reset(const EmuLaunch* launch, uint3 bid, Thread* threads) {
        L = launch;
        th = threads;
        const unsigned bx = L->block[0], by = L->block[1], bz = L->block[2];
        n = bx * by * bz;
        nwarps = (n + 31) / 32;
        for (unsigned w = 0; w < nwarps; w++) {
            const unsigned lanes = std::min(32u, n - w * 32);
            warps[w].exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
            warps[w].exited = 0;
            warps[w].nops = 0;
        }
        for (unsigned i = 0; i < n; i++) {
            Thread& t = th[i];
            t.threadIdx = uint3{i % bx, (i / bx) % by, i / (bx * by)};
            t.blockIdx = bid;
            t.blockDim = dim3(bx, by, bz);
            t.gridDim = dim3(L->grid[0], L->grid[1], L->grid[2]);
            t.blk = this;
            t.linear = i;
            t.lane = i & 31;
            t.warp = i >> 5;
            t.wait = RUNNING;
            t.site = nullptr;
            t.ctx.tls = &t;
        }
        bar_arrived = 0;
        bar_site = nullptr;
        bar_waiters.clear();
        bar_waiters.reserve(n);
        live = n;
        nexited = 0;
        failed = false;
        msg.clear();
    }

    std::string who(const Thread* t) const {
        return fmt("kernel %s, block %s, thread %s: ", L->kernel->name ? L->kernel->name : "?",
                   xyz(t->blockIdx).c_str(), xyz(t->threadIdx).c_str());
    }
    std::string tid(unsigned linear) const { return xyz(th[linear].threadIdx); }

    [[noreturn]] void fail(Thread* t, const std::string& what, std::unique_lock<std::mutex>& lk) {
        if (!failed) {
            failed = true;
            msg = who(t) + what;
        }
        fail_now(t, lk);
        __builtin_unreachable();
    }

    // Who waits where, for a deadlock.
    std::string waiting_summary() const {
        struct G {
            Wait w;
            int op;
            const char* site;
            unsigned mask, count, first;
        };
        std::vector<G> gs;
        for (unsigned i = 0; i < n; i++) {
            const Thread& t = th[i];
            if (t.wait != AT_BARRIER && t.wait != AT_WARP) continue;
            bool found = false;
            for (auto& g : gs)
                if (g.w == t.wait && g.op == t.op && same_site(g.site, t.site) && (t.wait == AT_BARRIER || g.mask == t.mask)) {
                    g.count++;
                    found = true;
                    break;
                }
            if (!found) gs.push_back(G{t.wait, t.op, t.site, t.mask, 1, i});
        }
        std::string s;
        for (size_t k = 0; k < gs.size() && k < 4; k++) {
            const G& g = gs[k];
            if (k) s += "; ";
            if (g.w == AT_BARRIER)
                s += fmt("%u at %s (%s, first %s)", g.count, bar_name(g.op), g.site, tid(g.first).c_str());
            else
                s += fmt("%u at %s mask 0x%08x (%s, first %s)", g.count, op_name(g.op), g.mask, g.site, tid(g.first).c_str());
        }
        if (gs.size() > 4) s += fmt("; and %zu more groups", gs.size() - 4);
        return s;
    }
    std::string deadlock_msg() const {
        return fmt("deadlock: no thread of the block can run; %u live threads wait: %s", live, waiting_summary().c_str());
    }

    int barrier(Thread* t, int kind, int pred, const char* site) {
        auto lk = guard();
        if (failed) fail_now(t, lk);
        if (nexited > 0) {
            unsigned ex = 0;
            while (ex < n && th[ex].wait != EXITED) ex++;
            fail(t, fmt("%s (%s) reached by %u of %u threads of the block: thread %s exited before it (every thread of the block must reach it)",
                        bar_name(kind), site, n - nexited, n, tid(ex).c_str()),
                 lk);
        }
        if (bar_arrived == 0) {
            bar_site = site;
            bar_kind = kind;
            bar_first = t->linear;
            bar_acc = kind == BAR_AND ? 1 : 0;
        } else if (!same_site(site, bar_site) || kind != bar_kind) {
            fail(t, fmt("threads of the block wait at different barriers: this thread at %s (%s), %u other(s) at %s (%s, first %s)",
                        bar_name(kind), site, bar_arrived, bar_name(bar_kind), bar_site, tid(bar_first).c_str()),
                 lk);
        }
        if (kind == BAR_COUNT) bar_acc += pred;
        else if (kind == BAR_AND) bar_acc &= pred;
        else if (kind == BAR_OR) bar_acc |= pred;
        t->op = kind;
        t->site = site;
        bar_arrived++;
        if (bar_arrived == live) {
            const int result = bar_acc;
            bar_arrived = 0;
            for (unsigned w : bar_waiters) {
                th[w].res = (uint64_t)(int64_t)result;
                th[w].wait = RUNNING;
                wake(&th[w]);
            }
            bar_waiters.clear();
            yield(t);
            return result;
        }
        t->wait = AT_BARRIER;
        bar_waiters.push_back(t->linear);
        park(t, lk);
        return (int)(int64_t)t->res;
    }

    uint64_t warp_op(Thread* t, int kind, unsigned mask, uint64_t val, int arg, int width, const char* site) {
        auto lk = guard();
        if (failed) fail_now(t, lk);
        const unsigned lane = t->lane, bit = 1u << lane;
        Warp& w = warps[t->warp];
        const char* name = op_name(kind);
        if (!(mask & bit))
            fail(t, fmt("%s (%s) with mask 0x%08x, which does not name the calling lane %u", name, site, mask, lane), lk);
        if (mask & ~w.exist)
            fail(t, fmt("%s (%s) with mask 0x%08x names lanes 0x%08x beyond blockDim (warp %u has lanes 0x%08x)", name, site,
                        mask, mask & ~w.exist, t->warp, w.exist),
                 lk);
        if (mask & w.exited) {
            const unsigned l = __builtin_ctz(mask & w.exited);
            fail(t, fmt("%s (%s) with mask 0x%08x names lane %u (thread %s), which has exited", name, site, mask, l,
                        tid(t->warp * 32 + l).c_str()),
                 lk);
        }
        if (kind <= WARP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
            fail(t, fmt("%s (%s) with width %d: must be a power of two from 1 to 32", name, site, width), lk);
        PendingOp* p = nullptr;
        for (int i = 0; i < w.nops; i++)
            if (w.ops[i].mask & mask) {
                p = &w.ops[i];
                break;
            }
        if (!p) {
            p = &w.ops[w.nops++];
            *p = PendingOp{mask, 0, kind, width, site, lane};
        } else if (p->mask != mask || p->op != kind || p->width != width) {
            fail(t, fmt("lanes of warp %u meet at different warp operations: lane %u at %s (%s) mask 0x%08x, lane %u waits at %s (%s) mask 0x%08x",
                        t->warp, lane, name, site, mask, p->first_lane, op_name(p->op), p->site, p->mask),
                 lk);
        }
        t->op = kind;
        t->mask = mask;
        t->site = site;
        t->val = val;
        t->arg = arg;
        p->arrived |= bit;
        if (p->arrived != mask) {
            t->wait = AT_WARP;
            park(t, lk);
            return t->res;
        }
        // Everyone named has arrived: compute every lane's result.
        Thread* base = &th[t->warp * 32];
        uint64_t votes = 0;
        for (unsigned m = mask; m; m &= m - 1) {
            const unsigned l = __builtin_ctz(m);
            if (base[l].val) votes |= 1ull << l;
        }
        for (unsigned m = mask; m; m &= m - 1) {
            const unsigned l = __builtin_ctz(m);
            Thread& d = base[l];
            unsigned src = l;
            const unsigned seg = l & ~(unsigned)(width - 1), top = seg + (unsigned)width - 1;
            switch (kind) {
            case WARP_SHFL_IDX: src = seg + ((unsigned)d.arg & (unsigned)(width - 1)); break;
            case WARP_SHFL_UP:
                src = (uint64_t)(l - seg) < (uint64_t)(unsigned)d.arg ? l : l - (unsigned)d.arg;
                break;
            case WARP_SHFL_DOWN:
                src = (uint64_t)l + (uint64_t)(unsigned)d.arg > top ? l : l + (unsigned)d.arg;
                break;
            case WARP_SHFL_XOR:
                if (d.arg < 0 || (l ^ (unsigned)d.arg) > 31)
                    fail(&d, fmt("%s (%s): lane %u reads lane %u (laneMask %d), out of range of the warp", name, d.site, l,
                                 l ^ (unsigned)d.arg, d.arg),
                         lk);
                src = l ^ (unsigned)d.arg;
                if (src > top) src = l;  // a later group of `width` lanes: own value, as documented
                break;
            case WARP_SYNC: d.res = 0; continue;
            case WARP_BALLOT: d.res = votes; continue;
            case WARP_ANY: d.res = votes != 0; continue;
            case WARP_ALL: {
                uint64_t all = 0;
                for (unsigned mm = mask; mm; mm &= mm - 1) all |= 1ull << __builtin_ctz(mm);
                d.res = votes == all;
                continue;
            }
            }
            if (!(mask >> src & 1u))
                fail(&d, fmt("%s (%s): lane %u reads lane %u, which is not in the mask 0x%08x", name, d.site, l, src, mask), lk);
            d.res = base[src].val;
        }
        *p = w.ops[--w.nops];
        for (unsigned m = mask & ~bit; m;) {  // highest lane first: woken to the front, lane order kept
            const unsigned l = 31 - __builtin_clz(m);
            m &= ~(1u << l);
            Thread& d = base[l];
            d.wait = RUNNING;
            wake_soon(&d);
        }
        yield(t);
        return t->res;
    }

    // The kernel returned in thread t: a barrier or warp operation still waiting for it is an error.
    void exited(Thread* t, std::unique_lock<std::mutex>& lk) {
        if (failed) fail_now(t, lk);
        t->wait = EXITED;
        nexited++;
        live--;
        Warp& w = warps[t->warp];
        w.exited |= 1u << t->lane;
        if (bar_arrived > 0)
            fail(t, fmt("thread exited while %u thread(s) of the block wait at %s (%s, first %s): every thread of the block must reach it",
                        bar_arrived, bar_name(bar_kind), bar_site, tid(bar_first).c_str()),
                 lk);
        for (int i = 0; i < w.nops; i++)
            if (w.ops[i].mask & (1u << t->lane))
                fail(t, fmt("lane %u exited while lanes 0x%08x wait at %s (%s) with mask 0x%08x, which names it", t->lane,
                            w.ops[i].arrived, op_name(w.ops[i].op), w.ops[i].site, w.ops[i].mask),
                     lk);
    }
};

Thread* current() {
    ThreadCtx* c = tls_cur;
    if (!c) {
        fprintf(stderr, "tpo emu: a CUDA intrinsic was called outside an emulated kernel launch\n");
        abort();
    }
    return static_cast<Thread*>(c);
}

// ---- fiber engine ---------------------------------------------------------------------------------
const size_t kMaxThreads = 1024;
const size_t kGuard = 4096;

struct StackSet {
    char* base = nullptr;
    size_t per = 0, count = 0, total = 0;
    bool dirty = false;  // an abandoned block left frames (and ASan redzones) behind
    bool create(size_t per_bytes, size_t n, std::string& err) {
        per = (per_bytes + 4095) & ~(size_t)4095;
        count = n;
        total = (per + kGuard) * count;
        void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            err = fmt("cannot map %zu bytes of fiber stacks: %s", total, strerror(errno));
            return false;
        }
        base = (char*)m;
        for (size_t i = 0; i < count; i++) {
            mprotect(base + i * (per + kGuard), kGuard, PROT_NONE);  // guard page below each stack
#ifdef TPO_EMU_VALGRIND
            VALGRIND_STACK_REGISTER(lo(i), lo(i) + per);
#endif
        }
        return true;
    }
    char* lo(size_t i) const { return base + i * (per + kGuard) + kGuard; }
};

struct RunQueue {
    std::vector<unsigned> buf;
    size_t head = 0, count = 0, mask = 0;  // a ring of a power-of-two size
    Sched pol = Sched::Forward;
    std::mt19937_64 rng;
    void reset(size_t n, Sched p, uint64_t seed) {
        size_t cap = 1;
        while (cap < n + 1) cap <<= 1;
        if (buf.size() < cap) buf.resize(cap);
        mask = cap - 1;
        head = count = 0;
        pol = p;
        if (p == Sched::Random) rng.seed(seed);
    }
    void push(unsigned x) { buf[(head + count++) & mask] = x; }
    void push_front(unsigned x) {
        head = (head - 1) & mask;
        buf[head] = x;
        count++;
    }
    bool pop(unsigned& x) {
        if (!count) return false;
        if (pol == Sched::Reverse) {
            x = buf[(head + --count) & mask];
            return true;
        }
        if (pol == Sched::Random) {
            const size_t k = (head + rng() % count) & mask;
            std::swap(buf[k], buf[head]);
        }
        x = buf[head];
        head = (head + 1) & mask;
        count--;
        return true;
    }
};

void fiber_main(Thread* t);

struct FiberBlock : Block {
    std::unique_ptr<Thread[]> store{new Thread[kMaxThreads]};
    StackSet stacks;
    Ctx main;
    RunQueue q;
    Thread* running = nullptr;
    bool random = false;

    bool init(size_t stack_bytes, std::string& err) { return stacks.create(stack_bytes, kMaxThreads, err); }

    void switch_to(Ctx* from, Ctx* to, bool from_done) {
        tls_cur = to->tls;
#ifdef TPO_EMU_ASAN
        __sanitizer_start_switch_fiber(from_done ? nullptr : &from->asan_fake, to->stack_lo, to->stack_size);
#endif
#ifdef TPO_EMU_TSAN
        __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
        tpo_emu_swap(&from->sp, to->sp);
#ifdef TPO_EMU_ASAN
        __sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr);
#endif
    }

    // Runs the next runnable thread (from t, which waits or has exited); back to the launcher
    // when none is left.
    void run_next(Thread* t, bool t_done) {
        unsigned next;
        if (failed) {
            switch_to(&t->ctx, &main, true);
            __builtin_unreachable();
        }
        if (!q.pop(next)) {
            if (live > 0) {
                std::unique_lock<std::mutex> none;
                fail(t, deadlock_msg(), none);
            }
            switch_to(&t->ctx, &main, true);
            __builtin_unreachable();
        }
        Thread* to = &th[next];
        if (to == t) return;
        running = to;
        switch_to(&t->ctx, &to->ctx, t_done);
        running = t;
    }

    void park(Thread* t, std::unique_lock<std::mutex>&) override { run_next(t, false); }
    void wake(Thread* t) override { q.push(t->linear); }
    void wake_soon(Thread* t) override {
        if (q.pol == Sched::Forward) q.push_front(t->linear);
        else q.push(t->linear);  // reverse pops the most recent first already; random ignores order
    }
    void yield(Thread* t) override {
        if (!random) return;
        q.push(t->linear);
        run_next(t, false);
    }
    [[noreturn]] void fail_now(Thread* t, std::unique_lock<std::mutex>&) override {
        switch_to(&t->ctx, &main, true);  // never resumed: the block is abandoned
        __builtin_unreachable();
    }

    void run(const EmuLaunch* launch, uint3 bid, const Config& c, uint64_t block_seed) {
        reset(launch, bid, store.get());
        random = c.sched == Sched::Random;
#ifdef TPO_EMU_ASAN
        if (stacks.dirty) {
            for (size_t i = 0; i < stacks.count; i++) __asan_unpoison_memory_region(stacks.lo(i), stacks.per);
            stacks.dirty = false;
        }
#endif
        for (unsigned i = 0; i < n; i++) {
            Thread& t = th[i];
            char* lo = stacks.lo(i);
            // Stack tops staggered by a multiple of 64 bytes: at one stride, every fiber's hot frame
            // would fall in the same cache sets (the stride is a multiple of 4 KiB).
            char* top = lo + stacks.per - (size_t)((i * 1088u) % 16384u);
#ifdef TPO_EMU_ASAN
            // The frames of the previous fiber's entry and exit path never returned: clear their
            // redzones (a failed block's deeper frames are cleared whole, see stacks.dirty).
            __asan_unpoison_memory_region(top - 8192, 8192);
#endif
            void** sp = (void**)(top - 72);  // see tpo_emu_swap: r15 r14 r13 r12 rbx rbp, return address
            sp[0] = nullptr;
            sp[1] = nullptr;
            sp[2] = (void*)&fiber_main;
            sp[3] = (void*)&t;
            sp[4] = nullptr;
            sp[5] = nullptr;
            sp[6] = (void*)&tpo_emu_fiber_start;
            t.ctx.sp = sp;
            t.ctx.stack_lo = lo;
            t.ctx.stack_size = stacks.per;
            t.ctx.asan_fake = nullptr;
#ifdef TPO_EMU_TSAN
            t.ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
        }
        main.tls = nullptr;
        main.asan_fake = nullptr;
#ifdef TPO_EMU_ASAN
        {
            static thread_local void* lo = nullptr;
            static thread_local size_t size = 0;
            if (!lo) {
                pthread_attr_t a;
                pthread_getattr_np(pthread_self(), &a);
                pthread_attr_getstack(&a, &lo, &size);
                pthread_attr_destroy(&a);
            }
            main.stack_lo = lo;
            main.stack_size = size;
        }
#endif
#ifdef TPO_EMU_TSAN
        main.tsan_fiber = __tsan_get_current_fiber();
#endif
        q.reset(n, c.sched, block_seed);
        for (unsigned i = 0; i < n; i++) q.push(i);  // the reverse schedule pops the last first
        unsigned first = 0;
        q.pop(first);
        running = &th[first];
        switch_to(&main, &th[first].ctx, false);
        tls_cur = nullptr;
        running = nullptr;
        if (failed) stacks.dirty = true;
#ifdef TPO_EMU_TSAN
        for (unsigned i = 0; i < n; i++) __tsan_destroy_fiber(th[i].ctx.tsan_fiber);
#endif
    }
};

void fiber_main(Thread* t) {
#ifdef TPO_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    FiberBlock* b = static_cast<FiberBlock*>(t->blk);
    b->L->kernel->thunk(b->L->args);
    std::unique_lock<std::mutex> none;
    b->exited(t, none);
    b->run_next(t, true);
    __builtin_unreachable();
}

std::mutex g_pool_mu;
std::vector<FiberBlock*> g_pool;

FiberBlock* acquire_block(size_t stack_bytes, std::string& err) {
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        for (size_t i = 0; i < g_pool.size(); i++)
            if (g_pool[i]->stacks.per == ((stack_bytes + 4095) & ~(size_t)4095)) {
                FiberBlock* b = g_pool[i];
                g_pool.erase(g_pool.begin() + i);
                return b;
            }
    }
    auto* b = new FiberBlock();
    if (!b->init(stack_bytes, err)) {
        delete b;
        return nullptr;
    }
    return b;
}
void release_block(FiberBlock* b) {
    std::lock_guard<std::mutex> g(g_pool_mu);
    g_pool.push_back(b);
}

// ---- threads engine (racecheck) ------------------------------------------------------------------
struct ThreadBlock : Block {
    std::unique_ptr<Thread[]> store;
    std::unique_ptr<std::condition_variable[]> cv;
    unsigned running = 0;

    void park(Thread* t, std::unique_lock<std::mutex>& lk) override {
        running--;
        if (running == 0 && live > 0) fail(t, deadlock_msg(), lk);
        while (t->wait != RUNNING && !failed) cv[t->linear].wait(lk);
        if (failed) throw Abort{};
    }
    void wake(Thread* t) override {
        running++;
        cv[t->linear].notify_one();
    }
    [[noreturn]] void fail_now(Thread*, std::unique_lock<std::mutex>&) override {
        for (unsigned i = 0; i < n; i++) cv[i].notify_all();
        throw Abort{};
    }
};

void* os_thread_main(void* arg) {
    Thread* t = static_cast<Thread*>(arg);
    ThreadBlock* b = static_cast<ThreadBlock*>(t->blk);
    tls_cur = t;
    try {
        b->L->kernel->thunk(b->L->args);
        auto lk = b->guard();
        b->exited(t, lk);
        b->running--;
        if (b->running == 0 && b->live > 0) b->fail(t, b->deadlock_msg(), lk);
    } catch (Abort&) {
    }
    tls_cur = nullptr;
    return nullptr;
}

std::mutex g_serial_mu;  // builds with a process-wide __shared__ run one launch at a time

// ---- launch ---------------------------------------------------------------------------------------
struct BlockOrder {
    Sched s;
    uint64_t n, a = 1, c = 0;
    BlockOrder(Sched sched, uint64_t count, uint64_t seed) : s(sched), n(count) {
        if (s == Sched::Random && n > 1) {
            std::mt19937_64 r(seed ^ 0x9e3779b97f4a7c15ull);
            c = r() % n;
            do a = r() % n; while (a == 0 || std::gcd(a, n) != 1);
        }
    }
    uint64_t at(uint64_t pos) const {
        if (s == Sched::Reverse) return n - 1 - pos;
        if (s == Sched::Random) return (uint64_t)(((unsigned __int128)a * pos + c) % n);
        return pos;
    }
};

uint3 block_index(const EmuLaunch* L, uint64_t lin) {
    return uint3{(unsigned)(lin % L->grid[0]), (unsigned)((lin / L->grid[0]) % L->grid[1]),
                 (unsigned)(lin / ((uint64_t)L->grid[0] * L->grid[1]))};
}

struct LaunchState {
    const EmuLaunch* L;
    Config c;
    uint64_t nblocks;
    BlockOrder order;
    std::atomic<uint64_t> next{0};
    std::atomic<uint64_t> err_pos{UINT64_MAX};
    std::mutex mu;
    std::string err;
    LaunchState(const EmuLaunch* l, const Config& cfg, uint64_t nb) : L(l), c(cfg), nblocks(nb), order(cfg.sched, nb, cfg.seed) {}
    void record(uint64_t pos, const std::string& m) {
        std::lock_guard<std::mutex> g(mu);
        if (pos < err_pos.load()) {
            err_pos.store(pos);
            err = m;
        }
    }
};

void fiber_worker(LaunchState* s) {
    std::string err;
    FiberBlock* b = acquire_block(s->c.stack_bytes, err);
    if (!b) {
        s->record(0, err);
        return;
    }
    for (;;) {
        const uint64_t pos = s->next.fetch_add(1);
        if (pos >= s->nblocks || pos > s->err_pos.load()) break;
        const uint64_t lin = s->order.at(pos);
        b->run(s->L, block_index(s->L, lin), s->c, s->c.seed * 0x100000001b3ull + lin);
        if (b->failed) s->record(pos, b->msg);
    }
    release_block(b);
}

void threads_launch(LaunchState* s) {
    const EmuLaunch* L = s->L;
    const unsigned n = L->block[0] * L->block[1] * L->block[2];
    ThreadBlock b;
    b.store.reset(new Thread[n]);
    b.cv.reset(new std::condition_variable[n]);
    b.locking = true;
    std::vector<pthread_t> ids(n);
    for (uint64_t pos = 0; pos < s->nblocks; pos++) {
        const uint64_t lin = s->order.at(pos);
        b.reset(L, block_index(L, lin), b.store.get());
        b.running = n;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, s->c.stack_bytes < (256u << 10) ? (256u << 10) : s->c.stack_bytes);
        unsigned started = 0;
        {
            auto lk = b.guard();  // no thread runs its kernel before all exist (deadlock counting)
            for (; started < n; started++)
                if (pthread_create(&ids[started], &attr, os_thread_main, &b.th[started]) != 0) break;
            if (started < n) {
                b.failed = true;
                b.msg = fmt("kernel %s, block %s: cannot start OS thread %u of %u (threads engine)", L->kernel->name,
                            xyz(block_index(L, lin)).c_str(), started, n);
                for (unsigned i = 0; i < n; i++) b.cv[i].notify_all();
            }
        }
        pthread_attr_destroy(&attr);
        for (unsigned i = 0; i < started; i++) pthread_join(ids[i], nullptr);
        if (b.failed) {
            s->record(pos, b.msg);
            return;
        }
    }
}

}  // namespace

int barrier(int kind, int pred, const char* site) {
    Thread* t = current();
    return t->blk->barrier(t, kind, pred, site);
}

uint64_t warp_op(int kind, unsigned mask, uint64_t val, int arg, int width, const char* site) {
    Thread* t = current();
    return t->blk->warp_op(t, kind, mask, val, arg, width, site);
}

unsigned active_mask() {
    Thread* t = current();
    auto lk = t->blk->guard();
    const Warp& w = t->blk->warps[t->warp];
    return w.exist & ~w.exited;
}

void trap(const char* what, const char* site) {
    Thread* t = current();
    auto lk = t->blk->guard();
    t->blk->fail(t, fmt("%s at %s", what, site), lk);
}

}  // namespace tpo_emu

using namespace tpo_emu;

extern "C" const char* emu_engine_name(void) {
    static std::string name;
    static std::once_flag once;
    std::call_once(once, [] {
        Config c;
        std::string err;
        const bool ok = read_config(c, err);
#if defined(TPO_EMU_ASAN)
        const char* build = "memcheck";
#elif defined(TPO_EMU_TSAN)
        const char* build = "racecheck";
#elif defined(TPO_EMU_VALGRIND)
        const char* build = "initcheck";
#else
        const char* build = "default";
#endif
        if (!ok) {
            name = fmt("%s build, invalid configuration: %s", build, err.c_str());
            return;
        }
        const char* sched = c.sched == Sched::Forward ? "forward" : c.sched == Sched::Reverse ? "reverse" : "random";
        name = fmt("%s build, %s engine, %s schedule%s, %u worker(s)", build, c.threads ? "threads" : "fibers", sched,
                   c.sched == Sched::Random ? fmt(" (seed %llu)", (unsigned long long)c.seed).c_str() : "",
                   c.threads ? 1 : c.workers);
    });
    return name.c_str();
}

extern "C" int emu_run(const EmuLaunch* L, char* err, size_t errlen) {
    std::string msg;
    auto out = [&](const std::string& m) {
        if (err && errlen) snprintf(err, errlen, "%s", m.c_str());
        return 1;
    };
    if (!L || !L->kernel || !L->kernel->thunk) return out("emu_run: no kernel");
    const char* kn = L->kernel->name ? L->kernel->name : "?";
    const uint64_t nthreads = (uint64_t)L->block[0] * L->block[1] * L->block[2];
    if (nthreads == 0 || nthreads > kMaxThreads)
        return out(fmt("kernel %s: block (%u,%u,%u) has %llu threads; the engine runs 1 to %zu", kn, L->block[0], L->block[1],
                       L->block[2], (unsigned long long)nthreads, kMaxThreads));
    const uint64_t nblocks = (uint64_t)L->grid[0] * L->grid[1] * L->grid[2];
    if (nblocks == 0) return out(fmt("kernel %s: empty grid (%u,%u,%u)", kn, L->grid[0], L->grid[1], L->grid[2]));
    if (L->kernel->num_params > 0 && !L->args) return out(fmt("kernel %s: no parameter array", kn));
    Config c;
    if (!read_config(c, msg)) return out(msg);
    LaunchState s(L, c, nblocks);
#ifdef TPO_EMU_SHARED_STATIC
    std::lock_guard<std::mutex> serial(g_serial_mu);
#endif
    if (c.threads) {
        threads_launch(&s);
    } else {
        const unsigned workers = (unsigned)std::min<uint64_t>(c.workers, nblocks);
        std::vector<std::thread> extra;
        for (unsigned i = 1; i < workers; i++) extra.emplace_back(fiber_worker, &s);
        fiber_worker(&s);
        for (auto& t : extra) t.join();
    }
    if (s.err_pos.load() != UINT64_MAX) return out(s.err);
    return 0;
}
