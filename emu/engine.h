// Interface between the emulated CUDA driver (emu/driver/, libcuda.so + libcublas.so) and the
// SIMT engine that runs the kernels' own source on the host (emu/engine/, emu/cuda_shim.h).
//
// The kernels (kernels/*.cu) are compiled as C++ with emu/cuda_shim.h force-included and
// TPO_EMU defined; a generated registry lists every `extern "C"` kernel with a thunk that
// unpacks a CUDA-style parameter array (args[i] points to parameter i) and the sizes of its
// parameters as the host build sees them. The driver parses the PTX/fatbin it is given, and for
// each .entry looks the kernel up here by name, compares parameter sizes, and launches it
// through emu_run.
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct EmuKernel {
    const char* name;                 // the entry's name, as in the PTX
    void (*thunk)(void** args);       // calls the kernel body for the current emulated thread
    int num_params;
    const size_t* param_sizes;        // num_params sizes (host build)
} EmuKernel;

// The host-built kernel with this name, or NULL.
const EmuKernel* emu_find_kernel(const char* name);

typedef struct EmuLaunch {
    const EmuKernel* kernel;
    unsigned grid[3];
    unsigned block[3];
    size_t dynamic_shared_bytes;
    void** args;                      // already copied by the driver (as cuLaunchKernel does)
} EmuLaunch;

// Runs the whole grid to completion (synchronously, on the calling OS thread and/or workers).
// Returns 0 on success. On a detected error (barrier divergence, a shuffle naming an inactive
// or exited lane, deadlock, a trap) returns nonzero and writes a one-line message naming the
// kernel, block and thread into err (NUL-terminated, at most errlen bytes).
int emu_run(const EmuLaunch* launch, char* err, size_t errlen);

// The engine's mode, from TPO_EMU_ENGINE / TPO_EMU_CHECK, for the driver's diagnostics.
const char* emu_engine_name(void);

#ifdef __cplusplus
}
#endif
