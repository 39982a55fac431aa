// Tests of the SIMT engine itself: small kernels that must run correctly, kernels that must fail
// with a given message, the real kernels (through the registry) against a double reference and
// across schedules, and a launch-rate measurement. Compiled with emu/cuda_shim.h force-included
// and linked with libtpo_emu.a of one mode (see emu/test-engine.sh).
//
//   engine_tests                 every in-process case (pass and expected-failure)
//   engine_tests CASE...         the named cases only (the sanitizer cases are run this way)
//   engine_tests --bench         launches per second of representative launches
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "registry_support.h"
#include "tpo_common.cuh"

// ------------------------------------------------------------------------------------------------
// Kernels that must run correctly.
__global__ void k_block_sum(const int* in, int n, int* out) {
    __shared__ int sh[1024];
    int acc = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += in[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = sh[0];
}

// The kernels' own BlockGroup: every thread receives sum, max and count of the block's slice.
__global__ void k_group_reduce(const float* in, int n, float* out) {
    __shared__ float scratch[33];
    const BlockGroup g{(int)threadIdx.x, scratch};
    const float* x = in + (size_t)blockIdx.x * n;
    float s = 0.f, m = neg_inf();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        s += x[i];
        m = fmaxf(m, x[i]);
    }
    const float S = g.sum(s), M = g.max(m);
    const int c = g.isum(1);
    float* o = out + ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 3;
    o[0] = S;
    o[1] = M;
    o[2] = (float)c;
}

// The kernels' own WarpGroup: each warp sums its own slice of 32 * 5 values.
__global__ void k_warp_reduce(const float* in, float* out) {
    const WarpGroup g{(int)(threadIdx.x & 31)};
    const int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    float s = 0.f;
    for (int i = g.rank; i < 160; i += 32) s += in[w * 160 + i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = g.sum(s);
}

__global__ void k_shuffles(long long* out) {
    const unsigned full = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    long long* o = out + threadIdx.x * 8;
    o[0] = __shfl_xor_sync(full, lane * 10, 5);
    o[1] = __shfl_down_sync(full, lane, 3);
    o[2] = __shfl_up_sync(full, lane, 4);
    o[3] = __shfl_sync(full, lane * 2, 7);
    o[4] = __shfl_sync(full, lane, lane + 1, 8);
    o[5] = __ballot_sync(full, lane & 1);
    o[6] = __any_sync(full, lane == 31) + 2 * __all_sync(full, lane < 32) + 4 * __all_sync(full, lane < 31);
    __syncwarp();
    o[7] = (long long)__shfl_xor_sync(full, (double)lane + 0.5, 16);
}

// blockDim 40: the second warp has 8 lanes and names exactly those.
__global__ void k_partial_warp(int* out) {
    const unsigned left = blockDim.x - (threadIdx.x & ~31u);
    const unsigned mask = left >= 32 ? 0xffffffffu : ((1u << left) - 1u);
    int v = threadIdx.x;
    for (int o = 1; o < 8; o <<= 1) v += __shfl_xor_sync(mask, v, o);
    // Emulated __activemask(): the lanes of the warp that exist and have not exited.
    const bool active = __activemask() == mask;
    __syncthreads();
    out[threadIdx.x] = v + (int)active * 100000;
}

__global__ void k_atomics(unsigned long long* maxw, int* counter, unsigned* bits) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(counter, 1);
    atomicMax(maxw, (unsigned long long)t * 3);
    atomicOr(bits, 1u << (t % 32));
    atomicSub(counter + 1, 2);
}

// Each block sees only its own __shared__ variable, also with blocks on several OS threads.
__global__ void k_shared_isolation(int* out) {
    __shared__ int v;
    if (threadIdx.x == 0) v = blockIdx.x;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
    __syncthreads();
}

__global__ void k_index3d(unsigned* out) {
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    out[b * nt + t] = (blockIdx.z << 24) | (blockIdx.y << 20) | (blockIdx.x << 16) | (threadIdx.z << 12) | (threadIdx.y << 8) |
                      threadIdx.x;
}

__global__ void k_sync_preds(int* out) {
    const int c = __syncthreads_count(threadIdx.x % 3 == 0);
    const int a = __syncthreads_and(threadIdx.x < 1000);
    const int o = __syncthreads_or(threadIdx.x == 5);
    const int z = __syncthreads_or(0);
    out[threadIdx.x] = c * 1000 + a * 100 + o * 10 + z;
}

// ------------------------------------------------------------------------------------------------
// Kernels that must fail.
__global__ void f_barrier_in_branch(int*) {
    if (threadIdx.x < 32) __syncthreads();
}
__global__ void f_two_barriers(int* o) {
    if (threadIdx.x & 1) {
        __syncthreads();
    } else {
        o[threadIdx.x] = 0;
        __syncthreads();
    }
}
__global__ void f_barrier_after_exit(int* o) {
    if (threadIdx.x >= 480) return;
    o[threadIdx.x] = 1;
    __syncthreads();
}
__global__ void f_shfl_exited_lane(int* o) {
    if ((threadIdx.x & 31) >= 16) return;
    o[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void f_deadlock(int* o) {
    if ((threadIdx.x & 31) < 16) __syncthreads();
    else o[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void f_xor32(float* o) {
    float v = 1.f;
    for (int off = 32; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    o[threadIdx.x] = v;
}
__global__ void f_mask_beyond(int* o) { o[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1); }
__global__ void f_mask_without_self(int* o) { o[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1); }
__global__ void f_mixed_ops(int* o) {
    if ((threadIdx.x & 31) < 16) o[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    else __syncwarp();
}
__global__ void f_trap(int*) {
    if (threadIdx.x == 7 && blockIdx.x == 2) __trap();
}
__global__ void f_assert(int*) { assert(threadIdx.x < 100); }
__global__ void f_fail_blocks(int*) {
    if ((blockIdx.x == 3 || blockIdx.x == 5) && threadIdx.x == 1) __trap();
}

// ------------------------------------------------------------------------------------------------
// Kernels for the sanitizer builds (each run in its own process).
__global__ void s_race_shared(int* o) {
    __shared__ int x;
    if (threadIdx.x == 0) x = 42;
    o[threadIdx.x] = x;  // missing __syncthreads between thread 0's write and the others' reads
}
__global__ void s_race_global(int* o) { o[0] = threadIdx.x; }
__global__ void s_read(const float* in, float* o) { o[threadIdx.x] = in[threadIdx.x] * 2.f; }
__global__ void s_branch_on(const float* in, float* o) {
    if (in[threadIdx.x] > 0.f) o[threadIdx.x] = 1.f;
    else o[threadIdx.x] = 2.f;
}
__global__ void s_load16(const float* in, float* o) {
    const uint4 v = *reinterpret_cast<const uint4*>(in + 1 + 4 * threadIdx.x);  // in + 1: misaligned
    o[threadIdx.x] = __uint_as_float(v.x);
}

// ------------------------------------------------------------------------------------------------
namespace {

struct Result {
    int rc;
    std::string msg;
};

template <auto F>
EmuKernel entry(const char* name) {
    using E = tpo_emu::KernelEntry<F>;
    return EmuKernel{name, &E::thunk, E::num_params, E::sizes};
}

template <typename... A>
Result launch(const EmuKernel& k, dim3 grid, dim3 block, A... a) {
    void* args[] = {(void*)&a..., nullptr};
    EmuLaunch L{&k, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, 0, args};
    char err[1024] = {0};
    int rc = emu_run(&L, err, sizeof err);
    return Result{rc, err};
}

#define K(f) entry<&f>(#f)

bool ok_run(const Result& r, std::string& why) {
    if (r.rc != 0) why = "launch failed: " + r.msg;
    return r.rc == 0;
}
bool expect_fail(const Result& r, std::vector<const char*> parts, std::string& why) {
    if (r.rc == 0) {
        why = "launch succeeded, expected an error";
        return false;
    }
    if (r.msg.find('\n') != std::string::npos) {
        why = "message is not one line: " + r.msg;
        return false;
    }
    // Under the threads engine the OS decides which thread arrives first, so only the kernel's
    // name and the kind of error are checked there; the fiber engine's schedule is deterministic.
    static const bool threads = std::strstr(emu_engine_name(), "threads engine") != nullptr;
    if (threads && r.msg.rfind("kernel ", 0) != 0) {
        why = "message does not name the kernel: " + r.msg;
        return false;
    }
    for (const char* p : parts)
        if (!threads && r.msg.find(p) == std::string::npos) {
            why = std::string("message lacks \"") + p + "\": " + r.msg;
            return false;
        }
    printf("    message: %s\n", r.msg.c_str());
    return true;
}

bool t_block_sum(std::string& why) {
    for (unsigned bd : {32u, 256u, 1024u}) {
        const int n = 5000;
        std::vector<int> in(n);
        long long want = 0;
        for (int i = 0; i < n; i++) want += in[i] = (i * 7919) % 1000 - 300;
        std::vector<int> out(3, 0);
        if (!ok_run(launch(K(k_block_sum), dim3(3), dim3(bd), (const int*)in.data(), n, out.data()), why)) return false;
        for (int b = 0; b < 3; b++)
            if (out[b] != want) return why = "block " + std::to_string(b) + " sum " + std::to_string(out[b]) + " != " + std::to_string(want), false;
    }
    return true;
}

bool t_group_reduce(std::string& why) {
    for (unsigned bd : {32u, 64u, 512u, 1024u}) {
        const int n = 3001, B = 4;
        std::vector<float> in((size_t)n * B);
        std::mt19937 r(bd);
        for (auto& v : in) v = (float)(r() % 20001) / 100.f - 100.f;
        std::vector<float> out((size_t)B * bd * 3);
        if (!ok_run(launch(K(k_group_reduce), dim3(B), dim3(bd), (const float*)in.data(), n, out.data()), why)) return false;
        for (int b = 0; b < B; b++) {
            double s = 0;
            float m = -INFINITY;
            for (int i = 0; i < n; i++) {
                s += in[(size_t)b * n + i];
                m = std::max(m, in[(size_t)b * n + i]);
            }
            for (unsigned t = 0; t < bd; t++) {
                const float* o = &out[((size_t)b * bd + t) * 3];
                if (std::fabs(o[0] - s) > 1e-3 * (1 + std::fabs(s)) || o[1] != m || o[2] != (float)bd)
                    return why = "block dim " + std::to_string(bd) + " block " + std::to_string(b) + " thread " + std::to_string(t) +
                                 ": got (" + std::to_string(o[0]) + "," + std::to_string(o[1]) + "," + std::to_string(o[2]) +
                                 ") want (" + std::to_string(s) + "," + std::to_string(m) + "," + std::to_string(bd) + ")",
                           false;
                if (o[0] != out[(size_t)b * bd * 3]) return why = "threads of a block received different sums", false;
            }
        }
    }
    return true;
}

bool t_warp_reduce(std::string& why) {
    const int blocks = 3, bd = 256, nw = blocks * bd / 32;
    std::vector<float> in((size_t)nw * 160), out((size_t)blocks * bd);
    for (size_t i = 0; i < in.size(); i++) in[i] = (float)(i % 97);
    if (!ok_run(launch(K(k_warp_reduce), dim3(blocks), dim3(bd), (const float*)in.data(), out.data()), why)) return false;
    for (int w = 0; w < nw; w++) {
        float s = 0;
        for (int i = 0; i < 160; i++) s += in[w * 160 + i];
        for (int l = 0; l < 32; l++)
            if (out[w * 32 + l] != s) return why = "warp " + std::to_string(w) + " got " + std::to_string(out[w * 32 + l]), false;
    }
    return true;
}

bool t_shuffles(std::string& why) {
    const unsigned bd = 96;
    std::vector<long long> out(bd * 8, -1);
    if (!ok_run(launch(K(k_shuffles), dim3(1), dim3(bd), out.data()), why)) return false;
    for (unsigned t = 0; t < bd; t++) {
        const long long lane = t & 31;
        const long long want[8] = {(lane ^ 5) * 10,
                                   lane + 3 < 32 ? lane + 3 : lane,
                                   lane >= 4 ? lane - 4 : lane,
                                   14,
                                   (lane & ~7LL) + ((lane + 1) & 7),
                                   (long long)0xaaaaaaaaLL,
                                   3,
                                   lane ^ 16};
        for (int k = 0; k < 8; k++)
            if (out[t * 8 + k] != want[k])
                return why = "thread " + std::to_string(t) + " result " + std::to_string(k) + ": " + std::to_string(out[t * 8 + k]) +
                             " != " + std::to_string(want[k]),
                       false;
    }
    return true;
}

bool t_partial_warp(std::string& why) {
    std::vector<int> out(40);
    if (!ok_run(launch(K(k_partial_warp), dim3(1), dim3(40), out.data()), why)) return false;
    for (int t = 0; t < 40; t++) {
        const int base = t & ~7;
        const int want = 8 * base + 28 + 100000;
        if (out[t] != want) return why = "thread " + std::to_string(t) + ": " + std::to_string(out[t]) + " != " + std::to_string(want), false;
    }
    return true;
}

bool t_atomics(std::string& why) {
    unsigned long long m = 0;
    int counter[2] = {0, 0};
    unsigned bits = 0;
    if (!ok_run(launch(K(k_atomics), dim3(64), dim3(256), &m, counter, &bits), why)) return false;
    if (counter[0] != 64 * 256 || counter[1] != -2 * 64 * 256 || m != (64ull * 256 - 1) * 3 || bits != 0xffffffffu)
        return why = "atomics: counter " + std::to_string(counter[0]) + " max " + std::to_string(m), false;
    return true;
}

bool t_shared_isolation(std::string& why) {
    const int blocks = 64, bd = 128;
    std::vector<int> out(blocks * bd, -1);
    if (!ok_run(launch(K(k_shared_isolation), dim3(blocks), dim3(bd), out.data()), why)) return false;
    for (int i = 0; i < blocks * bd; i++)
        if (out[i] != i / bd) return why = "thread " + std::to_string(i) + " saw another block's shared memory", false;
    return true;
}

bool t_index3d(std::string& why) {
    const dim3 g(3, 2, 2), b(8, 4, 2);
    std::vector<unsigned> out(12 * 64, 0);
    if (!ok_run(launch(K(k_index3d), g, b, out.data()), why)) return false;
    for (unsigned bz = 0; bz < 2; bz++)
        for (unsigned by = 0; by < 2; by++)
            for (unsigned bx = 0; bx < 3; bx++)
                for (unsigned tz = 0; tz < 2; tz++)
                    for (unsigned ty = 0; ty < 4; ty++)
                        for (unsigned tx = 0; tx < 8; tx++) {
                            const unsigned i = (bx + 3 * (by + 2 * bz)) * 64 + tx + 8 * (ty + 4 * tz);
                            const unsigned want = (bz << 24) | (by << 20) | (bx << 16) | (tz << 12) | (ty << 8) | tx;
                            if (out[i] != want) return why = "index " + std::to_string(i), false;
                        }
    return true;
}

bool t_sync_preds(std::string& why) {
    std::vector<int> out(1024);
    if (!ok_run(launch(K(k_sync_preds), dim3(1), dim3(1024), out.data()), why)) return false;
    const int want = 342 * 1000 + 0 * 100 + 10 + 0;
    for (int t = 0; t < 1024; t++)
        if (out[t] != want) return why = "thread " + std::to_string(t) + ": " + std::to_string(out[t]), false;
    return true;
}

std::vector<int> scratch_ints(4096, 0);
std::vector<float> scratch_floats(4096, 0.f);

bool t_fail_barrier_in_branch(std::string& why) {
    return expect_fail(launch(K(f_barrier_in_branch), dim3(2), dim3(64), scratch_ints.data()),
                       {"kernel f_barrier_in_branch, block (0,0,0), thread (32,0,0): thread exited while 32 thread(s) of the block wait at __syncthreads", "engine_tests.cpp:"},
                       why);
}
bool t_fail_two_barriers(std::string& why) {
    return expect_fail(launch(K(f_two_barriers), dim3(1), dim3(64), scratch_ints.data()),
                       {"thread (1,0,0): threads of the block wait at different barriers", "first (0,0,0)"}, why);
}
bool t_fail_barrier_after_exit(std::string& why) {
    return expect_fail(launch(K(f_barrier_after_exit), dim3(1), dim3(512), scratch_ints.data()),
                       {"thread (480,0,0): thread exited while 480 thread(s) of the block wait at __syncthreads"}, why);
}
bool t_fail_shfl_exited_lane(std::string& why) {
    return expect_fail(launch(K(f_shfl_exited_lane), dim3(1), dim3(64), scratch_ints.data()),
                       {"thread (16,0,0): lane 16 exited while lanes 0x0000ffff wait at __shfl_xor_sync"}, why);
}
bool t_fail_deadlock(std::string& why) {
    return expect_fail(launch(K(f_deadlock), dim3(1), dim3(64), scratch_ints.data()),
                       {"deadlock", "32 at __syncthreads", "32 at __shfl_xor_sync mask 0xffffffff"}, why);
}
bool t_fail_xor32(std::string& why) {
    return expect_fail(launch(K(f_xor32), dim3(1), dim3(32), scratch_floats.data()),
                       {"thread (0,0,0): __shfl_xor_sync", "lane 0 reads lane 32 (laneMask 32), out of range"}, why);
}
bool t_fail_mask_beyond(std::string& why) {
    return expect_fail(launch(K(f_mask_beyond), dim3(1), dim3(40), scratch_ints.data()),
                       {"thread (32,0,0)", "names lanes 0xffffff00 beyond blockDim"}, why);
}
bool t_fail_mask_without_self(std::string& why) {
    return expect_fail(launch(K(f_mask_without_self), dim3(1), dim3(32), scratch_ints.data()),
                       {"thread (16,0,0)", "does not name the calling lane 16"}, why);
}
bool t_fail_mixed_ops(std::string& why) {
    return expect_fail(launch(K(f_mixed_ops), dim3(1), dim3(32), scratch_ints.data()),
                       {"thread (16,0,0)", "different warp operations", "__syncwarp", "__shfl_xor_sync"}, why);
}
bool t_fail_trap(std::string& why) {
    return expect_fail(launch(K(f_trap), dim3(4), dim3(32), scratch_ints.data()), {"block (2,0,0), thread (7,0,0): __trap() at"}, why);
}
bool t_fail_assert(std::string& why) {
    return expect_fail(launch(K(f_assert), dim3(1), dim3(128), scratch_ints.data()),
                       {"thread (100,0,0): assertion failed: threadIdx.x < 100"}, why);
}
bool t_fail_first_block(std::string& why) {
    for (int rep = 0; rep < 20; rep++)
        if (!expect_fail(launch(K(f_fail_blocks), dim3(64), dim3(64), scratch_ints.data()), {"block (3,0,0), thread (1,0,0)"}, why))
            return false;
    return true;
}

// ---- the real kernels, through the registry ---------------------------------------------------------
// Mirrors of the parameter structs (as src/cuda mirrors them); their sizes are checked against the
// registry's.
struct TpoParams {
    const void *logp, *logp_old;
    const float *scores, *q_in;
    const long long* offsets;
    float* q_out;
    void* grad;
    float *group_loss, *stats;
    unsigned long long* status;
    long long num_groups, k;
    float inv_eta, zero_std_threshold, grad_coef;
    int anchored, loss_kl, inv_eta_exp;
    const long long* group_ids;
    long long num_items;
};
struct TokenParams {
    const void* logits;
    void* grad_out;
    const unsigned int* tokens;
    float *logp, *lse, *row_max, *log_sum, *entropy;
    const float* token_grad;
    unsigned long long* status;
    long long rows, vocab, ld, col0, row0;
    float inv_tau;
    int pad_;
};

const EmuKernel* find(const char* name, size_t param_size, std::string& why) {
    const EmuKernel* k = emu_find_kernel(name);
    if (!k) {
        why = std::string("registry has no ") + name;
        return nullptr;
    }
    if (k->num_params != 1 || k->param_sizes[0] != param_size) {
        why = std::string(name) + ": parameter sizes differ from the mirror";
        return nullptr;
    }
    return k;
}

Result launch_params(const EmuKernel* k, unsigned grid, unsigned block, void* p) {
    void* args[] = {p};
    EmuLaunch L{k, {grid, 1, 1}, {block, 1, 1}, 0, args};
    char err[1024] = {0};
    int rc = emu_run(&L, err, sizeof err);
    return Result{rc, err};
}

struct FitOut {
    std::vector<float> grad, loss;
    unsigned long long status;
};

bool run_fit(const char* name, unsigned block, const std::vector<float>& l, const std::vector<float>& q, long long B, long long K,
             FitOut& o, std::string& why) {
    const EmuKernel* k = find(name, sizeof(TpoParams), why);
    if (!k) return false;
    o.grad.assign(B * K, 0.f);
    o.loss.assign(B, 0.f);
    o.status = 0;
    TpoParams p{};
    p.logp = l.data();
    p.q_in = q.data();
    p.grad = o.grad.data();
    p.group_loss = o.loss.data();
    p.status = &o.status;
    p.num_groups = B;
    p.num_items = B;
    p.k = K;
    p.inv_eta = 1.f;
    p.grad_coef = 0.5f;
    const bool warp = std::strstr(name, "warp") != nullptr;
    const unsigned grid = warp ? (unsigned)std::min<long long>((B + 7) / 8, 4224) : (unsigned)std::min<long long>(B, 528);
    return ok_run(launch_params(k, grid, block, &p), why);
}

void fit_inputs(long long B, long long K, std::vector<float>& l, std::vector<float>& q) {
    std::mt19937 r(42);
    l.resize(B * K);
    q.resize(B * K);
    for (long long g = 0; g < B; g++) {
        double s = 0;
        for (long long j = 0; j < K; j++) {
            l[g * K + j] = -(float)(r() % 10000) / 1000.f;
            s += q[g * K + j] = (float)(r() % 1000 + 1);
        }
        for (long long j = 0; j < K; j++) q[g * K + j] = (float)(q[g * K + j] / s);
    }
}

bool t_real_fit(std::string& why) {
    const long long B = 37, K = 1000;
    std::vector<float> l, q;
    fit_inputs(B, K, l, q);
    FitOut wo, bo;
    if (!run_fit("tpo_fit_warp_f32_f32", 256, l, q, B, K, wo, why)) return false;
    if (!run_fit("tpo_fit_block_f32_f32", 512, l, q, B, K, bo, why)) return false;
    if (wo.status || bo.status) return why = "status word set", false;
    for (long long g = 0; g < B; g++) {
        double m = -INFINITY, s = 0, qs = 0, loss = 0;
        for (long long j = 0; j < K; j++) m = std::max(m, (double)l[g * K + j]);
        for (long long j = 0; j < K; j++) s += std::exp(l[g * K + j] - m);
        for (long long j = 0; j < K; j++) {
            const double lp = l[g * K + j] - m - std::log(s);
            qs += q[g * K + j];
            loss -= q[g * K + j] * lp;
        }
        for (const FitOut* o : {&wo, &bo}) {
            if (std::fabs(o->loss[g] - loss) > 1e-5 * (1 + std::fabs(loss)))
                return why = "group " + std::to_string(g) + " loss " + std::to_string(o->loss[g]) + " != " + std::to_string(loss), false;
            for (long long j = 0; j < K; j++) {
                const double lp = l[g * K + j] - m - std::log(s);
                const double gr = 0.5 * (qs * std::exp(lp) - q[g * K + j]);
                if (std::fabs(o->grad[g * K + j] - gr) > 1e-6 + 1e-4 * std::fabs(gr))
                    return why = "group " + std::to_string(g) + " grad " + std::to_string(j) + ": " + std::to_string(o->grad[g * K + j]) +
                                 " != " + std::to_string(gr),
                           false;
            }
        }
    }
    return true;
}

// The same launches under every schedule and worker count give identical bits.
bool t_real_schedules(std::string& why) {
    const long long B = 19, K = 777;
    std::vector<float> l, q;
    fit_inputs(B, K, l, q);
    const char* names[] = {"tpo_fit_block_f32_f32", "tpo_fit_warp_f32_f32"};
    FitOut ref[2];
    setenv("TPO_EMU_SCHEDULE", "forward", 1);
    for (int i = 0; i < 2; i++)
        if (!run_fit(names[i], i ? 256 : 512, l, q, B, K, ref[i], why)) return false;
    const char* scheds[] = {"reverse", "random:1", "random:987654321", "forward"};
    const char* workers[] = {"1", "2", "3"};
    bool ok = true;
    for (const char* s : scheds)
        for (const char* w : workers)
            for (int i = 0; i < 2 && ok; i++) {
                setenv("TPO_EMU_SCHEDULE", s, 1);
                setenv("TPO_EMU_WORKERS", w, 1);
                FitOut o;
                if (!run_fit(names[i], i ? 256 : 512, l, q, B, K, o, why)) {
                    ok = false;
                } else if (std::memcmp(o.grad.data(), ref[i].grad.data(), o.grad.size() * 4) ||
                           std::memcmp(o.loss.data(), ref[i].loss.data(), o.loss.size() * 4)) {
                    why = std::string(names[i]) + " differs under schedule " + s + ", workers " + w;
                    ok = false;
                }
            }
    unsetenv("TPO_EMU_SCHEDULE");
    unsetenv("TPO_EMU_WORKERS");
    return ok;
}

bool run_token_fwd(long long rows, long long V, const std::vector<float>& z, const std::vector<unsigned>& tok, std::vector<float>& logp,
                   std::vector<float>& lse, std::string& why, unsigned grid = 0) {
    const EmuKernel* k = find("tpo_token_fwd_f32", sizeof(TokenParams), why);
    if (!k) return false;
    std::vector<float> rm(rows), ls(rows), ent(rows);
    logp.assign(rows, 0.f);
    lse.assign(rows, 0.f);
    unsigned long long status = 0;
    TokenParams p{};
    p.logits = z.data();
    p.tokens = tok.data();
    p.logp = logp.data();
    p.lse = lse.data();
    p.row_max = rm.data();
    p.log_sum = ls.data();
    p.entropy = ent.data();
    p.status = &status;
    p.rows = rows;
    p.vocab = V;
    p.ld = V;
    p.inv_tau = 1.f;
    if (!ok_run(launch_params(k, grid ? grid : (unsigned)rows, 256, &p), why)) return false;
    if (status) return why = "status word set", false;
    return true;
}

bool t_real_token_fwd(std::string& why) {
    const long long rows = 5, V = 50021;  // odd V: scalar head and tail around the 16-byte vectors
    std::vector<float> z(rows * V);
    std::mt19937 r(7);
    for (auto& v : z) v = (float)(r() % 20000) / 1000.f - 10.f;
    std::vector<unsigned> tok(rows);
    for (long long t = 0; t < rows; t++) tok[t] = (unsigned)(r() % V);
    std::vector<float> logp, lse;
    if (!run_token_fwd(rows, V, z, tok, logp, lse, why)) return false;
    for (long long t = 0; t < rows; t++) {
        double m = -INFINITY, s = 0;
        for (long long v = 0; v < V; v++) m = std::max(m, (double)z[t * V + v]);
        for (long long v = 0; v < V; v++) s += std::exp(z[t * V + v] - m);
        const double want = z[t * V + tok[t]] - m - std::log(s), wl = m + std::log(s);
        if (std::fabs(logp[t] - want) > 1e-4 * (1 + std::fabs(want)) || std::fabs(lse[t] - wl) > 1e-5 * (1 + std::fabs(wl)))
            return why = "row " + std::to_string(t) + " logp " + std::to_string(logp[t]) + " != " + std::to_string(want), false;
    }
    return true;
}

struct Case {
    const char* name;
    bool (*fn)(std::string&);
};
const Case kCases[] = {
    {"block_sum", t_block_sum},
    {"group_reduce", t_group_reduce},
    {"warp_reduce", t_warp_reduce},
    {"shuffles", t_shuffles},
    {"partial_warp", t_partial_warp},
    {"atomics", t_atomics},
    {"shared_isolation", t_shared_isolation},
    {"index3d", t_index3d},
    {"sync_preds", t_sync_preds},
    {"fail_barrier_in_branch", t_fail_barrier_in_branch},
    {"fail_two_barriers", t_fail_two_barriers},
    {"fail_barrier_after_exit", t_fail_barrier_after_exit},
    {"fail_shfl_exited_lane", t_fail_shfl_exited_lane},
    {"fail_deadlock", t_fail_deadlock},
    {"fail_xor32", t_fail_xor32},
    {"fail_mask_beyond", t_fail_mask_beyond},
    {"fail_mask_without_self", t_fail_mask_without_self},
    {"fail_mixed_ops", t_fail_mixed_ops},
    {"fail_trap", t_fail_trap},
    {"fail_assert", t_fail_assert},
    {"fail_first_block", t_fail_first_block},
    {"real_fit", t_real_fit},
    {"real_schedules", t_real_schedules},
    {"real_token_fwd", t_real_token_fwd},
};

// Sanitizer cases: each is expected to be reported by the sanitizer (the process then fails).
int sanitizer_case(const std::string& name) {
    if (name == "race_shared") {
        std::vector<int> o(64);
        return launch(K(s_race_shared), dim3(1), dim3(64), o.data()).rc;
    }
    if (name == "race_global") {
        std::vector<int> o(64);
        return launch(K(s_race_global), dim3(1), dim3(64), o.data()).rc;
    }
    if (name == "oob_read") {
        float* in = (float*)malloc(64 * sizeof(float));
        for (int i = 0; i < 64; i++) in[i] = (float)i;
        std::vector<float> o(65);
        Result r = launch(K(s_read), dim3(1), dim3(65), (const float*)in, o.data());  // thread 64 reads past the end
        free(in);
        return r.rc;
    }
    if (name == "uninit_read") {
        float* in = (float*)malloc(64 * sizeof(float));
        for (int i = 0; i < 63; i++) in[i] = (float)i;  // in[63] never written
        std::vector<float> o(64);
        Result r = launch(K(s_branch_on), dim3(1), dim3(64), (const float*)in, o.data());
        free(in);
        return r.rc;
    }
    if (name == "misaligned_load16") {
        alignas(16) static float in[4 * 32 + 8];
        std::vector<float> o(32);
        return launch(K(s_load16), dim3(1), dim3(32), (const float*)in, o.data()).rc;
    }
    return -1;
}

int bench() {
    std::string why;
    auto time_it = [&](const char* what, int reps, const std::function<bool()>& f) {
        if (!f()) return false;  // warm-up (stacks mapped, pages touched)
        const auto t0 = std::chrono::steady_clock::now();
        const std::clock_t c0 = std::clock();
        for (int i = 0; i < reps; i++)
            if (!f()) return false;
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
        const double cpu = (double)(std::clock() - c0) / CLOCKS_PER_SEC / reps;
        // CPU time (all workers) as well as wall time: on a shared machine the wall time says more
        // about the neighbours than about the engine.
        printf("%-66s %9.2f ms/launch (%6.2f launches/s), %9.2f ms CPU/launch\n", what, s * 1e3, 1.0 / s, cpu * 1e3);
        return true;
    };
    {
        const long long B = 4096, K = 64;
        std::vector<float> l, q;
        fit_inputs(B, K, l, q);
        FitOut o;
        if (!time_it("tpo_fit_warp_f32_f32  B=4096 K=64   (grid 512 x 256 threads)", 5,
                     [&] { return run_fit("tpo_fit_warp_f32_f32", 256, l, q, B, K, o, why); }))
            goto fail;
        if (!time_it("tpo_fit_block_f32_f32 B=4096 K=64   (grid 528 x 512 threads)", 3,
                     [&] { return run_fit("tpo_fit_block_f32_f32", 512, l, q, B, K, o, why); }))
            goto fail;
    }
    {
        const long long B = 8, K = 4096;
        std::vector<float> l, q;
        fit_inputs(B, K, l, q);
        FitOut o;
        if (!time_it("tpo_fit_block_f32_f32 B=8 K=4096    (grid 8 x 512 threads)", 20,
                     [&] { return run_fit("tpo_fit_block_f32_f32", 512, l, q, B, K, o, why); }))
            goto fail;
    }
    {
        const long long rows = 16, V = 262144;
        std::vector<float> z(rows * V);
        for (size_t i = 0; i < z.size(); i++) z[i] = (float)(i % 1000) / 100.f;
        std::vector<unsigned> tok(rows, 5);
        std::vector<float> logp, lse;
        if (!time_it("tpo_token_fwd_f32     rows=16 V=262144 (grid 16 x 256 threads)", 3,
                     [&] { return run_token_fwd(rows, V, z, tok, logp, lse, why); }))
            goto fail;
    }
    printf("engine: %s\n", emu_engine_name());
    return 0;
fail:
    fprintf(stderr, "bench failed: %s\n", why.c_str());
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && !strcmp(argv[1], "--bench")) return bench();
    printf("engine: %s\n", emu_engine_name());
    std::vector<std::string> names(argv + 1, argv + argc);
    int failed = 0, run = 0;
    for (const std::string& n : names) {
        const int rc = sanitizer_case(n);
        if (rc >= 0) {
            // Reached only when the sanitizer did not stop the process.
            printf("sanitizer case %s ran to the end (launch rc %d)\n", n.c_str(), rc);
            return 3;
        }
    }
    for (const Case& c : kCases) {
        if (!names.empty() && std::find(names.begin(), names.end(), c.name) == names.end()) continue;
        std::string why;
        run++;
        const bool ok = c.fn(why);
        printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", c.name, ok ? "" : ": ", ok ? "" : why.c_str());
        failed += !ok;
    }
    if (run == 0) {
        fprintf(stderr, "no case matched\n");
        return 2;
    }
    printf("%d of %d engine cases passed\n", run - failed, run);
    return failed ? 1 : 0;
}
