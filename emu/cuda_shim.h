// Force-included (`-include emu/cuda_shim.h -DTPO_EMU`) when kernels/*.cu are compiled as host C++
// for the emulated device: CUDA's keywords, built-in variables and device intrinsics, mapped onto
// the SIMT engine (emu/engine.cpp) that runs each CUDA thread as a fiber.
#pragma once
#ifndef TPO_EMU
#error "emu/cuda_shim.h is for the TPO_EMU build (-DTPO_EMU)"
#endif

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "emu_rt.h"

// ---- keywords -------------------------------------------------------------------------------
#ifdef TPO_EMU_SCAN
// emu/gen_registry.sh preprocesses the kernels with this to find every kernel.
#define __global__ __tpo_emu_global__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline
#define __launch_bounds__(...)
// __restrict__ is a GCC keyword already.
// __shared__: one object per block. A block runs on one OS thread in the fiber engine, and one
// block runs at a time per OS thread, so a thread-local static is exactly that. In the racecheck
// build (one OS thread per CUDA thread) it is a plain static and blocks run one at a time.
#ifdef TPO_EMU_SHARED_STATIC
#define __shared__ static
#else
#define __shared__ static thread_local
#endif
#define __constant__ static const

// ---- built-in variables -----------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::tpo_emu::tls_cur->threadIdx))
#define blockIdx (static_cast<const uint3&>(::tpo_emu::tls_cur->blockIdx))
#define blockDim (static_cast<const dim3&>(::tpo_emu::tls_cur->blockDim))
#define gridDim (static_cast<const dim3&>(::tpo_emu::tls_cur->gridDim))
#define warpSize 32

#define TPO_EMU_STR2(x) #x
#define TPO_EMU_STR(x) TPO_EMU_STR2(x)
#define TPO_EMU_SITE (__FILE__ ":" TPO_EMU_STR(__LINE__))

// ---- vector types (CUDA's sizes and alignments) ---------------------------------------------
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// ---- barriers, warp operations, traps ----------------------------------------------------------
#define __syncthreads() ((void)::tpo_emu::barrier(::tpo_emu::BAR_SYNC, 1, TPO_EMU_SITE))
#define __syncthreads_count(p) ::tpo_emu::barrier(::tpo_emu::BAR_COUNT, (p) ? 1 : 0, TPO_EMU_SITE)
#define __syncthreads_and(p) ::tpo_emu::barrier(::tpo_emu::BAR_AND, (p) ? 1 : 0, TPO_EMU_SITE)
#define __syncthreads_or(p) ::tpo_emu::barrier(::tpo_emu::BAR_OR, (p) ? 1 : 0, TPO_EMU_SITE)
#define __trap() ::tpo_emu::trap("__trap()", TPO_EMU_SITE)
#undef assert
#define assert(e) ((e) ? (void)0 : ::tpo_emu::trap("assertion failed: " #e, TPO_EMU_SITE))

namespace tpo_emu {
// `__shfl_xor_sync(m, v, o)` expands to `WarpCall(WARP_SHFL_XOR, site)(m, v, o)`: the call site is
// recorded and the optional width/mask arguments keep their CUDA defaults.
struct WarpCall {
    int kind;
    const char* site;
    template <typename T>
    T operator()(unsigned mask, T v, int arg, int width = 32) const {
        static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 8 bytes");
        uint64_t bits = 0;
        std::memcpy(&bits, &v, sizeof(T));
        bits = warp_op(kind, mask, bits, arg, width, site);
        T r;
        std::memcpy(&r, &bits, sizeof(T));
        return r;
    }
};
struct VoteCall {
    int kind;
    const char* site;
    uint64_t operator()(unsigned mask, int pred) const { return warp_op(kind, mask, pred ? 1 : 0, 0, 32, site); }
};
struct SyncwarpCall {
    const char* site;
    void operator()(unsigned mask = 0xffffffffu) const { (void)warp_op(WARP_SYNC, mask, 0, 0, 32, site); }
};
}  // namespace tpo_emu

#define __shfl_sync ::tpo_emu::WarpCall{::tpo_emu::WARP_SHFL_IDX, TPO_EMU_SITE}
#define __shfl_up_sync ::tpo_emu::WarpCall{::tpo_emu::WARP_SHFL_UP, TPO_EMU_SITE}
#define __shfl_down_sync ::tpo_emu::WarpCall{::tpo_emu::WARP_SHFL_DOWN, TPO_EMU_SITE}
#define __shfl_xor_sync ::tpo_emu::WarpCall{::tpo_emu::WARP_SHFL_XOR, TPO_EMU_SITE}
#define __syncwarp ::tpo_emu::SyncwarpCall{TPO_EMU_SITE}
#define __ballot_sync(mask, p) ((unsigned)::tpo_emu::VoteCall{::tpo_emu::WARP_BALLOT, TPO_EMU_SITE}((mask), (p)))
#define __any_sync(mask, p) ((int)::tpo_emu::VoteCall{::tpo_emu::WARP_ANY, TPO_EMU_SITE}((mask), (p)))
#define __all_sync(mask, p) ((int)::tpo_emu::VoteCall{::tpo_emu::WARP_ALL, TPO_EMU_SITE}((mask), (p)))
#define __activemask() (::tpo_emu::active_mask())
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

// ---- atomics (truly atomic: blocks run in parallel on several OS threads) --------------------
#define TPO_EMU_ATOMIC_INT(T)                                                                           \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                  \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                  \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                  \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                    \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                  \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }                \
    inline T atomicCAS(T* p, T cmp, T v) {                                                                \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
        return cmp;                                                                                       \
    }                                                                                                     \
    inline T atomicMax(T* p, T v) {                                                                       \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                     \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                 \
        return old;                                                                                       \
    }                                                                                                     \
    inline T atomicMin(T* p, T v) {                                                                       \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                     \
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                 \
        return old;                                                                                       \
    }
TPO_EMU_ATOMIC_INT(int)
TPO_EMU_ATOMIC_INT(unsigned int)
TPO_EMU_ATOMIC_INT(long long)
TPO_EMU_ATOMIC_INT(unsigned long long)
#undef TPO_EMU_ATOMIC_INT
inline unsigned int atomicInc(unsigned int* p, unsigned int lim) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, old >= lim ? 0u : old + 1u, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// ---- math -------------------------------------------------------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __saturatef(float x) { return x >= 1.f ? 1.f : (x > 0.f ? x : 0.f); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

namespace tpo_emu {
// Flush a subnormal f32 to a zero of the same sign (the .ftz of PTX).
inline float ftz(float x) {
    unsigned int u = __float_as_uint(x);
    return (u & 0x7f800000u) == 0 ? __uint_as_float(u & 0x80000000u) : x;
}
// ex2.approx.ftz.f32: 2^x, max error 2 ulp (PTX ISA); the host's exp2f is within 1 ulp.
inline float ex2_approx_ftz(float x) { return ftz(exp2f(ftz(x))); }
// lg2.approx.ftz.f32: log2(x), subnormal inputs are zero (-inf).
inline float lg2_approx_ftz(float x) { return log2f(ftz(x)); }

// cvt.f32.f16: exact.
inline float cvt_f32_f16(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
// cvt.rn.f16.f32: round to nearest even, subnormal results kept, overflow to inf; a NaN input
// gives the canonical NaN 0x7fff.
inline unsigned short cvt_rn_f16_f32(float x) {
    if (x != x) return 0x7fff;
    _Float16 v = (_Float16)x;  // GCC converts with round-to-nearest-even
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
// cvt.rn.bf16.f32: round to nearest even; a NaN input gives the canonical NaN 0x7fff.
inline unsigned short cvt_rn_bf16_f32(float x) {
    if (x != x) return 0x7fff;
    unsigned int u = __float_as_uint(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
}  // namespace tpo_emu

// The fast-math intrinsics, as the device computes them (through ex2/lg2.approx.ftz).
inline float __expf(float x) { return ::tpo_emu::ex2_approx_ftz(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return ::tpo_emu::ex2_approx_ftz(x * 3.3219280948873622f); }
inline float __logf(float x) { return ::tpo_emu::lg2_approx_ftz(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return ::tpo_emu::lg2_approx_ftz(x); }
inline float __powf(float a, float b) { return ::tpo_emu::ex2_approx_ftz(b * ::tpo_emu::lg2_approx_ftz(a)); }
