// The SIMT runtime's interface to host-compiled kernel code (used by emu/cuda_shim.h, implemented
// in emu/engine.cpp). No CUDA macros here, so the engine can include it too.
#pragma once
#include <stddef.h>
#include <stdint.h>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace tpo_emu {

// What one emulated thread sees as its built-in variables.
struct ThreadCtx {
    uint3 threadIdx;
    uint3 blockIdx;
    dim3 blockDim;
    dim3 gridDim;
};

// The emulated thread running on this OS thread (set by the engine at every switch).
extern thread_local ThreadCtx* tls_cur;

enum WarpOpKind : int {
    WARP_SHFL_IDX = 0,
    WARP_SHFL_UP = 1,
    WARP_SHFL_DOWN = 2,
    WARP_SHFL_XOR = 3,
    WARP_SYNC = 4,
    WARP_BALLOT = 5,
    WARP_ANY = 6,
    WARP_ALL = 7,
};

enum BarrierKind : int { BAR_SYNC = 0, BAR_COUNT = 1, BAR_AND = 2, BAR_OR = 3 };

// __syncthreads and its predicate forms; returns the count / and / or of the predicates.
int barrier(int kind, int pred, const char* site);
// A warp-synchronous operation over the lanes of `mask`: returns the value of `val` from the
// source lane (shuffles) or the vote result (ballot/any/all). `arg` is srcLane/delta/laneMask.
uint64_t warp_op(int kind, unsigned mask, uint64_t val, int arg, int width, const char* site);
// Lanes of the caller's warp that exist and have not exited.
unsigned active_mask();
// __trap() / a failed assert: ends the launch with an error (does not return).
[[noreturn]] void trap(const char* what, const char* site);

}  // namespace tpo_emu
