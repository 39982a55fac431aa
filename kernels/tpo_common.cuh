// Shared device helpers for the TPO kernels: element conversion, deterministic group
// reductions (a warp or a whole block), and the error word.
#pragma once

#include <stdint.h>

#ifdef TPO_HOST
// Host emulation (tests/host_emulation.rs): the same per-group code compiled as plain C++ and run
// by one "lane", so the kernels' arithmetic and error handling are tested without a GPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#define __device__
#define __forceinline__ inline
// As on the device: 16 bytes, 16-byte aligned (UBSan in the host tests checks the alignment).
struct alignas(16) uint4 { unsigned int x, y, z, w; };
using std::isfinite;
using std::isnan;
using std::min;
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    if (v > old) *p = v;
    return old;
}
#define TPO_UNROLL
#else
#define TPO_UNROLL _Pragma("unroll")
#endif

// ---------------------------------------------------------------------------------------------
// Element types. bf16 and f16 are stored as raw 16-bit patterns and converted with PTX, so the
// kernels need no half-precision headers. All math is f32.
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x.bits) << 16); }
#if defined(TPO_EMU)
// Emulated device (emu/cuda_shim.h): host equivalents of the PTX conversions, same rounding.
__device__ __forceinline__ float to_f32(f16_t x) { return tpo_emu::cvt_f32_f16(x.bits); }
#elif !defined(TPO_HOST)
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
#else
inline float to_f32(f16_t x) { _Float16 h; std::memcpy(&h, &x.bits, 2); return (float)h; }
#endif

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
#if defined(TPO_EMU)
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) { return bf16_t{tpo_emu::cvt_rn_bf16_f32(x)}; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) { return f16_t{tpo_emu::cvt_rn_f16_f32(x)}; }
#elif !defined(TPO_HOST)
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
#else
template <> inline bf16_t from_f32<bf16_t>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16_t r;
    if (std::isnan(x)) {
        r.bits = (unsigned short)((u >> 16) | 0x40);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
        r.bits = (unsigned short)(u >> 16);
    }
    return r;
}
template <> inline f16_t from_f32<f16_t>(float x) {
    _Float16 h = (_Float16)x;
    f16_t r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
#endif

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// ---------------------------------------------------------------------------------------------
// Error word. Codes match src/cuda/status.rs. The word holds ((MAX_INDEX - index) << 8 | code)
// of the smallest offending flat index, via an integer atomicMax: deterministic whatever the
// scheduling (integer atomics only; no float atomics anywhere).
enum TpoErrorCode : unsigned int {
    TPO_OK = 0,
    TPO_BAD_LOGP = 1,         // logp[i] is NaN or +inf
    TPO_BAD_LOGP_OLD = 2,     // logp_old[i] is NaN or +inf
    TPO_BAD_SCORE = 3,        // scores[i] is not finite
    TPO_ALL_EXCLUDED_OLD = 4, // every logp_old of the group at i is -inf
    TPO_ALL_EXCLUDED = 5,     // every logp of the group at i is -inf
    TPO_INFINITE_LOSS = 6,    // logp[i] is -inf where q[i] > 0
    TPO_BAD_TARGET = 7,       // q[i] negative or not finite
    TPO_BAD_TARGET_SUM = 8,   // the group starting at i has a target that does not sum to 1
    TPO_BAD_LOGIT = 9,        // logits[i] is NaN or +inf
    TPO_BAD_TOKEN = 10,       // token at row i is outside the vocabulary
    TPO_TOKEN_LOGIT_NEG_INF = 11, // logits[i] of a sampled token is -inf
    TPO_BL_BAD_LOGP = 12,     // baselines: logp[i] is not finite
    TPO_BL_BAD_LOGP_OLD = 13, // baselines: logp_old[i] is not finite
    TPO_BAD_ADVANTAGE = 14,   // PPO: advantages[i] is not finite
    TPO_BL_OVERFLOW_GROUP = 15, // + method (0..3): the group starting at i overflows f32 or G
    TPO_BL_OVERFLOW_LOSS = 19,  // + method (0..3): the reduced loss overflows f32
};

#define TPO_MAX_INDEX ((1ull << 55) - 1ull)

__device__ __forceinline__ void report(unsigned long long* status, long long index, unsigned int code) {
    unsigned long long v = ((TPO_MAX_INDEX - (unsigned long long)index) << 8) | code;
    atomicMax(status, v);
}

#ifdef TPO_HOST
// One lane does the whole group.
struct SerialGroup {
    int rank;
    int size() const { return 1; }
    float sum(float v) const { return v; }
    float max(float v) const { return v; }
    int isum(int v) const { return v; }
};
#else
// ---------------------------------------------------------------------------------------------
// Group executors: which threads cooperate on one group, and how they reduce. Every reduction
// has a fixed order (butterfly shuffles, then a fixed tree over warps), so results are
// bit-identical run to run, and every thread of the group receives the result.
struct WarpGroup {
    int rank;  // lane
    __device__ __forceinline__ int size() const { return 32; }
    __device__ __forceinline__ float sum(float v) const {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
    __device__ __forceinline__ float max(float v) const {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        return v;
    }
    __device__ __forceinline__ int isum(int v) const {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
};

// A whole block (blockDim.x a multiple of 32, at most 1024) works on one group.
struct BlockGroup {
    int rank;
    float* scratch;  // >= 33 floats of shared memory
    __device__ __forceinline__ int size() const { return blockDim.x; }
    template <typename Op>
    __device__ __forceinline__ float reduce(float v, Op op) const {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        __syncthreads();  // scratch may still be read from the previous reduction
        if (lane == 0) scratch[warp] = v;
        __syncthreads();
        if (warp == 0) {
            float w = lane < nwarps ? scratch[lane] : op.identity();
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) w = op(w, __shfl_xor_sync(0xffffffffu, w, o));
            if (lane == 0) scratch[32] = w;
        }
        __syncthreads();
        return scratch[32];
    }
    struct Add {
        __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
        __device__ __forceinline__ float identity() const { return 0.0f; }
    };
    struct Max {
        __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
        __device__ __forceinline__ float identity() const { return neg_inf(); }
    };
    __device__ __forceinline__ float sum(float v) const { return reduce(v, Add()); }
    __device__ __forceinline__ float max(float v) const { return reduce(v, Max()); }
    // Counts stay exact in f32 up to 2^24 members per group.
    __device__ __forceinline__ int isum(int v) const { return (int)reduce((float)v, Add()); }
};
#endif  // TPO_HOST
