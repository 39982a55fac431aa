// Internal interface of the emulated CUDA driver (libcuda.so) and cuBLAS (libcublas.so).
// Not a public header: the ABI the applications see is the CUDA driver API's (cuda.h), declared
// with the types below, whose sizes and values are the driver's.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#ifdef __cplusplus
extern "C" {
#endif

typedef int CUresult;  // the driver's enum cudaError_enum, an int in the C ABI
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef struct EmuCtx* CUcontext;
typedef struct EmuStream* CUstream;
typedef struct EmuEvent* CUevent;
typedef struct EmuModule* CUmodule;
typedef struct EmuFunction* CUfunction;

// Exported for libcublas.so: the live allocation range check every copy uses. Returns 0 when
// [ptr, ptr + bytes) lies inside one live allocation of the current context, else a CUresult and a
// one-line reason in why (may be NULL).
CUresult tpoEmuCheckRange(CUdeviceptr ptr, size_t bytes, char* why, size_t whylen);
// Exported for libcublas.so: the current context's sticky error (0 when none), and the stream a
// handle was bound to is validated through this (0 for a valid or null stream).
CUresult tpoEmuContextError(void);
CUresult tpoEmuCheckStream(CUstream s);

#ifdef __cplusplus
}
#endif

namespace emu {

// One `.entry` of a PTX module.
struct PtxEntry {
    std::string name;
    std::vector<size_t> param_sizes;
    std::vector<size_t> param_aligns;
    unsigned maxntid[3] = {0, 0, 0};  // 0: not given
    unsigned reqntid[3] = {0, 0, 0};
    size_t static_shared = 0;         // bytes of `.shared` declared in the body
};

struct PtxModule {
    int version_major = 0, version_minor = 0;
    std::string target;  // e.g. "sm_90", "sm_90a"
    std::vector<PtxEntry> entries;
};

// Parses PTX text; false with a one-line reason in err on malformed input.
bool parse_ptx(const std::string& text, PtxModule& out, std::string& err);

// Highest PTX ISA version (major*10 + minor) a driver of CUDA version `cuda` (e.g. 13000) loads.
int max_ptx_isa(int cuda);

// Whether a device of compute capability `sm` (e.g. 90) can JIT PTX of this .target; false with
// the reason.
bool ptx_target_runs_on(const std::string& target, int sm, std::string& why);

// One entry of a fatbin.
struct FatbinEntry {
    int kind = 0;  // 1 PTX, 2 ELF (SASS)
    int sm = 0;    // e.g. 90
    bool compressed = false;
    std::string payload;
};
// Parses a fatbin (magic 0xBA55ED50) at image; false with a reason when malformed.
bool parse_fatbin(const void* image, std::vector<FatbinEntry>& out, std::string& err);
// Size in bytes of the fatbin at image (header + entries), 0 if not a fatbin.
size_t fatbin_size(const void* image);

}  // namespace emu
