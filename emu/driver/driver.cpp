// The emulated CUDA driver: libcuda.so for an emulated device that runs the kernels' own source on
// the host through the SIMT engine (emu/engine.h).
//
// * One device, "tpo emulated CUDA device (sm_XX)", compute capability TPO_EMU_SM (default 90),
//   driver version TPO_EMU_CUDA_VERSION (default 13000), with the attributes of an H100 SXM.
// * Device memory is host memory: every allocation is exactly the requested size, 256-byte
//   aligned (posix_memalign), filled with the poison byte 0xFF (all-ones: a NaN in f32, bf16 and
//   f16, -1 in signed integers; under valgrind, built with TPO_EMU_VALGRIND, also marked undefined)
//   and given back to the allocator on free, so AddressSanitizer sees overflows and use after free. Device pointers are the host addresses. Allocations are
//   tracked per context; every copy and memset checks that its device range lies inside one live
//   allocation of the current context (CUDA_ERROR_INVALID_VALUE otherwise, like the driver).
// * Streams are in-order queues executed at enqueue time: every call completes before it
//   returns, so events record completion times and synchronisation is immediate.
// * Modules: PTX text or a fatbin (uncompressed, magic 0xBA55ED50). The PTX .version must not be
//   newer than the driver's ISA and its .target must run on the device; a fatbin loads when it has
//   SASS for the device's architecture family or PTX the device can JIT, and the kernels'
//   parameter sizes are read from its PTX. Every .entry must have a host build (emu_find_kernel)
//   taking parameters of the same sizes.
// * Launches enforce the block, grid and shared-memory limits and .maxntid/.reqntid, copy the
//   parameters (sizes from the PTX) and run the grid through emu_run. An engine error is printed
//   as one line on stderr and makes the context's error sticky, as a fault does on a GPU.
// Every error is also printed as one line on stderr ("tpo-emu: ...") and its reason is appended
// to the string cuGetErrorString returns for that code.
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "../engine.h"
#include "driver.h"

#if defined(TPO_EMU_VALGRIND) && __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#define EMU_MARK_UNDEFINED(p, n) VALGRIND_MAKE_MEM_UNDEFINED(p, n)
#else
#define EMU_MARK_UNDEFINED(p, n) ((void)(p), (void)(n))
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_INVALID_SOURCE = 300,
    CUDA_ERROR_FILE_NOT_FOUND = 301,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_ASSERT = 710,
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_UNKNOWN = 999,
};

const unsigned char POISON = 0xFF;

struct ErrName {
    int code;
    const char* name;
    const char* text;
};
const ErrName ERRORS[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain."},
    {300, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"},
    {710, "CUDA_ERROR_ASSERT", "device-side assert triggered"},
    {715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrName* find_error(int code) {
    for (const auto& e : ERRORS)
        if (e.code == code) return &e;
    return nullptr;
}

// ---- global state ------------------------------------------------------------------------------

struct Alloc {
    size_t size;
    EmuCtx* ctx;
};

}  // namespace

struct EmuCtx {
    int refs = 0;                 // primary-context retain count
    CUresult sticky = 0;          // a fault makes every later call fail
    std::string sticky_msg;
    bool valid = true;
};

struct EmuStream {
    EmuCtx* ctx;
    unsigned flags;
};

struct EmuEvent {
    EmuCtx* ctx;
    unsigned flags;
    bool recorded = false;
    std::chrono::steady_clock::time_point t;
};

struct EmuFunction;

struct EmuModule {
    EmuCtx* ctx;
    std::vector<std::unique_ptr<EmuFunction>> functions;
};

struct EmuFunction {
    EmuModule* module;
    emu::PtxEntry entry;
    const EmuKernel* kernel;
    int max_dynamic_shared;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};

namespace {

struct Device {
    int sm = 90;
    int cuda = 13000;
    std::string name;
};

std::recursive_mutex g_mu;  // the whole driver state; the device runs one thing at a time
bool g_init = false;
Device g_dev;
EmuCtx* g_primary = nullptr;
std::map<uintptr_t, Alloc> g_allocs;  // by base address
size_t g_allocated = 0;
std::set<EmuStream*> g_streams;
std::set<EmuEvent*> g_events;
std::set<EmuModule*> g_modules;
std::set<EmuFunction*> g_functions;
thread_local EmuCtx* t_current = nullptr;

// Interned reasons appended to the error strings (never freed: cuGetErrorString hands out
// pointers that must stay valid).
std::set<std::string>* g_strings = new std::set<std::string>();
std::unordered_map<int, const char*> g_last_reason;

const char* intern(const std::string& s) {
    return g_strings->insert(s).first->c_str();
}

// Records and prints a one-line reason for `code`; returns code.
__attribute__((format(printf, 2, 3))) CUresult fail(CUresult code, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    const ErrName* e = find_error(code);
    fprintf(stderr, "tpo-emu: %s: %s\n", e ? e->name : "CUDA error", buf);
    std::string full = std::string(e ? e->text : "error") + " (tpo emulated device: " + buf + ")";
    g_last_reason[code] = intern(full);
    return code;
}

int env_int(const char* name, int dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    while (*v && (*v < '0' || *v > '9')) v++;  // accept "sm_90"
    return *v ? atoi(v) : dflt;
}

// The current context, checked: NULL result with *err set when there is none or it has faulted.
CUresult current(EmuCtx** out) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    EmuCtx* c = t_current;
    if (!c || !c->valid) return CUDA_ERROR_INVALID_CONTEXT;
    if (c->sticky) return c->sticky;
    *out = c;
    return CUDA_SUCCESS;
}

CUresult check_stream(CUstream s, EmuCtx* ctx) {
    uintptr_t v = reinterpret_cast<uintptr_t>(s);
    if (v == 0 || v == 1 || v == 2) return CUDA_SUCCESS;  // default, legacy, per-thread
    if (!g_streams.count(s)) return fail(CUDA_ERROR_INVALID_HANDLE, "unknown stream %p", (void*)s);
    if (s->ctx != ctx) return fail(CUDA_ERROR_INVALID_CONTEXT, "stream %p belongs to another context", (void*)s);
    return CUDA_SUCCESS;
}

// The live allocation holding [p, p + n), checked against the context.
CUresult check_range(EmuCtx* ctx, CUdeviceptr p, size_t n, const char* what, std::string* why) {
    char buf[512];
    auto it = g_allocs.upper_bound(static_cast<uintptr_t>(p));
    if (it == g_allocs.begin()) {
        snprintf(buf, sizeof buf, "%s: 0x%llx is not device memory", what, (unsigned long long)p);
    } else {
        --it;
        uintptr_t base = it->first;
        size_t size = it->second.size;
        if (p >= base + size && !(size == 0 && p == base)) {
            snprintf(buf, sizeof buf, "%s: 0x%llx is not inside a live allocation (nearest below: 0x%llx, %zu bytes)",
                     what, (unsigned long long)p, (unsigned long long)base, size);
        } else if (n > size - (p - base)) {
            snprintf(buf, sizeof buf,
                     "%s: %zu bytes at 0x%llx run %zu bytes past the end of the allocation at 0x%llx (%zu bytes)", what,
                     n, (unsigned long long)p, n - (size - (p - base)), (unsigned long long)base, size);
        } else if (it->second.ctx != ctx) {
            snprintf(buf, sizeof buf, "%s: 0x%llx belongs to another context", what, (unsigned long long)p);
        } else {
            return CUDA_SUCCESS;
        }
    }
    if (why) *why = buf;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult range_or_fail(EmuCtx* ctx, CUdeviceptr p, size_t n, const char* what) {
    std::string why;
    if (check_range(ctx, p, n, what, &why) != CUDA_SUCCESS) return fail(CUDA_ERROR_INVALID_VALUE, "%s", why.c_str());
    return CUDA_SUCCESS;
}

void init_device() {
    g_dev.sm = env_int("TPO_EMU_SM", 90);
    g_dev.cuda = env_int("TPO_EMU_CUDA_VERSION", 13000);
    g_dev.name = "tpo emulated CUDA device (sm_" + std::to_string(g_dev.sm) + ")";
}

// Attributes, H100 SXM-like for sm_90 (A100-like for sm_8x, B200-like for sm_10x).
int attribute(int attr) {
    const int sm = g_dev.sm, major = sm / 10;
    const int sms = major >= 10 ? 148 : major == 9 ? 132 : 108;
    const int smem_optin = major >= 9 ? 232448 : sm == 80 ? 166912 : 101376;
    const int smem_sm = major >= 9 ? 233472 : sm == 80 ? 167936 : 102400;
    switch (attr) {
        case 1: return 1024;        // MAX_THREADS_PER_BLOCK
        case 2: return 1024;        // MAX_BLOCK_DIM_X
        case 3: return 1024;        // MAX_BLOCK_DIM_Y
        case 4: return 64;          // MAX_BLOCK_DIM_Z
        case 5: return 2147483647;  // MAX_GRID_DIM_X
        case 6: return 65535;       // MAX_GRID_DIM_Y
        case 7: return 65535;       // MAX_GRID_DIM_Z
        case 8: return 49152;       // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: return 65536;       // TOTAL_CONSTANT_MEMORY
        case 10: return 32;         // WARP_SIZE
        case 11: return 2147483647; // MAX_PITCH
        case 12: return 65536;      // MAX_REGISTERS_PER_BLOCK
        case 13: return 1980000;    // CLOCK_RATE (kHz)
        case 14: return 512;        // TEXTURE_ALIGNMENT
        case 15: return 1;          // GPU_OVERLAP
        case 16: return sms;        // MULTIPROCESSOR_COUNT
        case 17: return 0;          // KERNEL_EXEC_TIMEOUT
        case 18: return 0;          // INTEGRATED
        case 19: return 1;          // CAN_MAP_HOST_MEMORY
        case 20: return 0;          // COMPUTE_MODE default
        case 30: return 512;        // SURFACE_ALIGNMENT
        case 31: return 1;          // CONCURRENT_KERNELS
        case 32: return 1;          // ECC_ENABLED
        case 33: return 0;          // PCI_BUS_ID
        case 34: return 0;          // PCI_DEVICE_ID
        case 36: return 2619000;    // MEMORY_CLOCK_RATE (kHz)
        case 37: return 5120;       // GLOBAL_MEMORY_BUS_WIDTH
        case 38: return 52428800;   // L2_CACHE_SIZE
        case 39: return 2048;       // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: return 3;          // ASYNC_ENGINE_COUNT
        case 41: return 1;          // UNIFIED_ADDRESSING
        case 50: return 0;          // PCI_DOMAIN_ID
        case 51: return 32;         // TEXTURE_PITCH_ALIGNMENT
        case 75: return sm / 10;    // COMPUTE_CAPABILITY_MAJOR
        case 76: return sm % 10;    // COMPUTE_CAPABILITY_MINOR
        case 78: return 1;          // STREAM_PRIORITIES_SUPPORTED
        case 79: return 1;          // GLOBAL_L1_CACHE_SUPPORTED
        case 80: return 1;          // LOCAL_L1_CACHE_SUPPORTED
        case 81: return smem_sm;    // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: return 65536;      // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: return 1;          // MANAGED_MEMORY
        case 84: return 0;          // MULTI_GPU_BOARD
        case 86: return 0;          // HOST_NATIVE_ATOMIC_SUPPORTED
        case 87: return 2;          // SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO
        case 88: return 0;          // PAGEABLE_MEMORY_ACCESS
        case 89: return 1;          // CONCURRENT_MANAGED_ACCESS
        case 90: return 1;          // COMPUTE_PREEMPTION_SUPPORTED
        case 95: return 1;          // COOPERATIVE_LAUNCH
        case 97: return smem_optin; // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: return 32;        // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 111: return 1024;      // RESERVED_SHARED_MEMORY_PER_BLOCK
        case 115: return 1;         // MEMORY_POOLS_SUPPORTED
        case 120: return major >= 9;  // CLUSTER_LAUNCH
        default: return 0;
    }
}

size_t total_memory() {
    return 80ull << 30;  // an 80 GiB device
}

// Copies between host and device happen at enqueue time (streams execute synchronously).
CUresult do_copy(void* dst, const void* src, size_t n) {
    if (n) memmove(dst, src, n);
    return CUDA_SUCCESS;
}

}  // namespace

// ---- exported helpers for libcublas --------------------------------------------------------------

EXPORT CUresult tpoEmuCheckRange(CUdeviceptr ptr, size_t bytes, char* why, size_t whylen) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    std::string w;
    CUresult r = check_range(ctx, ptr, bytes, "cuBLAS operand", &w);
    if (r && why && whylen) snprintf(why, whylen, "%s", w.c_str());
    return r;
}

EXPORT CUresult tpoEmuContextError(void) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    return current(&ctx);
}

EXPORT CUresult tpoEmuCheckStream(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    return check_stream(s, ctx);
}

// ---- errors ----------------------------------------------------------------------------------------

EXPORT CUresult cuGetErrorString(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(g_mu);
    auto it = g_last_reason.find(error);
    if (it != g_last_reason.end()) {
        *pStr = it->second;
        return CUDA_SUCCESS;
    }
    const ErrName* e = find_error(error);
    if (!e) {
        *pStr = nullptr;
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pStr = e->text;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    const ErrName* e = find_error(error);
    if (!e) {
        *pStr = nullptr;
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pStr = e->name;
    return CUDA_SUCCESS;
}

// ---- initialisation and devices ------------------------------------------------------------------

EXPORT CUresult cuInit(unsigned flags) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0 (got %u)", flags);
    if (!g_init) {
        init_device();
        g_primary = new EmuCtx();
        g_init = true;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) init_device();
    *v = g_dev.cuda;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int* count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    *count = 1;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return fail(CUDA_ERROR_INVALID_DEVICE, "device %d requested; the emulator has one device", ordinal);
    *dev = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, static_cast<size_t>(len), "%s", g_dev.name.c_str());
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int* pi, int attrib, CUdevice dev) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (attrib < 1 || attrib > 200) return fail(CUDA_ERROR_INVALID_VALUE, "unknown device attribute %d", attrib);
    *pi = attribute(attrib);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = total_memory();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice dev) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    static const char id[16] = {'t', 'p', 'o', '-', 'e', 'm', 'u', 'l', 'a', 't', 'e', 'd', '-', 'g', 'p', 'u'};
    memcpy(uuid, id, 16);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice dev) {
    return cuDeviceGetUuid(uuid, dev);
}

// ---- contexts ------------------------------------------------------------------------------------

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    g_primary->refs++;
    *pctx = g_primary;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (g_primary->refs <= 0) return fail(CUDA_ERROR_INVALID_CONTEXT, "primary context released more often than retained");
    g_primary->refs--;
    // The driver keeps the primary context's resources until the last release; allocations that
    // are still live then are leaked by the application (as on a GPU, they die with the context).
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned* flags, int* active) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (flags) *flags = 0;
    if (active) *active = g_primary->refs > 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx && ctx != g_primary) return fail(CUDA_ERROR_INVALID_CONTEXT, "unknown context %p", (void*)ctx);
    t_current = ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext* pctx) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = t_current;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice* dev) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    *dev = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize(void) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    return current(&ctx);
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    return cuCtxSetCurrent(ctx);
}

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* pctx) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (pctx) *pctx = t_current;
    t_current = nullptr;
    return CUDA_SUCCESS;
}

// ---- memory --------------------------------------------------------------------------------------

namespace {
CUresult do_alloc(CUdeviceptr* dptr, size_t bytes) {
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "allocation of 0 bytes");
    if (bytes > total_memory() - std::min(total_memory(), g_allocated))
        return fail(CUDA_ERROR_OUT_OF_MEMORY, "%zu bytes requested, %zu of %zu in use", bytes, g_allocated,
                    total_memory());
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0 || !p)
        return fail(CUDA_ERROR_OUT_OF_MEMORY, "host allocation of %zu bytes failed", bytes);
    memset(p, POISON, bytes);
    // initcheck (valgrind): the poison counts as never written, so a read of it that decides
    // anything is reported.
    EMU_MARK_UNDEFINED(p, bytes);
    g_allocs[reinterpret_cast<uintptr_t>(p)] = Alloc{bytes, ctx};
    g_allocated += bytes;
    *dptr = reinterpret_cast<uintptr_t>(p);
    return CUDA_SUCCESS;
}

CUresult do_free(CUdeviceptr dptr) {
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (dptr == 0) return CUDA_SUCCESS;
    auto it = g_allocs.find(static_cast<uintptr_t>(dptr));
    if (it == g_allocs.end())
        return fail(CUDA_ERROR_INVALID_VALUE, "free of 0x%llx, which is not the start of a live allocation",
                    (unsigned long long)dptr);
    if (it->second.ctx != ctx) return fail(CUDA_ERROR_INVALID_CONTEXT, "free of 0x%llx from another context", (unsigned long long)dptr);
    g_allocated -= it->second.size;
    g_allocs.erase(it);
    free(reinterpret_cast<void*>(dptr));
    return CUDA_SUCCESS;
}
}  // namespace

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    return do_alloc(dptr, bytes);
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytes, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    return do_alloc(dptr, bytes);
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    return do_free(dptr);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    return do_free(dptr);
}

// The attributes of the allocation holding `p` that a library borrowing memory asks for (CUDA
// enum CUpointer_attribute): CONTEXT (1), MEMORY_TYPE (2, always DEVICE = 2), DEVICE_ORDINAL (9),
// RANGE_START_ADDR (11), RANGE_SIZE (12). An address in no live allocation is
// CUDA_ERROR_INVALID_VALUE, as the driver answers for unregistered host memory.
EXPORT CUresult cuPointerGetAttribute(void* data, int attribute, CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!data) return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: null output");
    auto it = g_allocs.upper_bound(static_cast<uintptr_t>(p));
    if (it == g_allocs.begin()) return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: 0x%llx is not device memory", (unsigned long long)p);
    --it;
    const uintptr_t base = it->first;
    const size_t size = it->second.size;
    if (p >= base + size && !(size == 0 && p == base))
        return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: 0x%llx is not inside a live allocation", (unsigned long long)p);
    switch (attribute) {
        case 1: *static_cast<CUcontext*>(data) = it->second.ctx; return CUDA_SUCCESS;
        case 2: *static_cast<unsigned*>(data) = 2; return CUDA_SUCCESS;
        case 9: *static_cast<int*>(data) = 0; return CUDA_SUCCESS;
        case 11: *static_cast<CUdeviceptr*>(data) = base; return CUDA_SUCCESS;
        case 12: *static_cast<size_t*>(data) = size; return CUDA_SUCCESS;
        default: return fail(CUDA_ERROR_NOT_SUPPORTED, "cuPointerGetAttribute: attribute %d is not emulated", attribute);
    }
}

EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    *total = total_memory();
    *free_bytes = total_memory() - std::min(total_memory(), g_allocated);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (CUresult r = range_or_fail(ctx, dst, n, "cuMemsetD8 destination")) return r;
    memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    return cuMemsetD8Async(dst, v, n, nullptr);
}

EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (dst % 4) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD32 destination 0x%llx is not 4-byte aligned", (unsigned long long)dst);
    if (CUresult r = range_or_fail(ctx, dst, n * 4, "cuMemsetD32 destination")) return r;
    unsigned* p = reinterpret_cast<unsigned*>(dst);
    for (size_t i = 0; i < n; i++) p[i] = v;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    return cuMemsetD32Async(dst, v, n, nullptr);
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (!src) return fail(CUDA_ERROR_INVALID_VALUE, "host-to-device copy from a null host pointer");
    if (CUresult r = range_or_fail(ctx, dst, n, "host-to-device copy destination")) return r;
    return do_copy(reinterpret_cast<void*>(dst), src, n);
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (!dst) return fail(CUDA_ERROR_INVALID_VALUE, "device-to-host copy to a null host pointer");
    if (CUresult r = range_or_fail(ctx, src, n, "device-to-host copy source")) return r;
    return do_copy(dst, reinterpret_cast<const void*>(src), n);
}

EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}

EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (n == 0) return CUDA_SUCCESS;
    if (CUresult r = range_or_fail(ctx, src, n, "device-to-device copy source")) return r;
    if (CUresult r = range_or_fail(ctx, dst, n, "device-to-device copy destination")) return r;
    return do_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
}

EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

// Page-locked host memory: ordinary host memory (copies are synchronous anyway).
EXPORT CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned flags) {
    (void)flags;
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!pp || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytes) != 0) return fail(CUDA_ERROR_OUT_OF_MEMORY, "pinned host allocation of %zu bytes", bytes);
    *pp = p;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}

// ---- streams -------------------------------------------------------------------------------------

EXPORT CUresult cuStreamCreate(CUstream* ps, unsigned flags) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!ps) return CUDA_ERROR_INVALID_VALUE;
    if (flags > 1) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate flags %u", flags);
    EmuStream* s = new EmuStream{ctx, flags};
    g_streams.insert(s);
    *ps = s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamCreateWithPriority(CUstream* ps, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(ps, flags);
}

EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!g_streams.erase(s)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy of unknown stream %p", (void*)s);
    delete s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    return check_stream(s, ctx);
}

EXPORT CUresult cuStreamQuery(CUstream s) {
    return cuStreamSynchronize(s);
}

EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    (void)flags;
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (!g_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent on unknown event %p", (void*)e);
    return CUDA_SUCCESS;  // everything enqueued before has completed
}

EXPORT CUresult cuStreamIsCapturing(CUstream s, int* status) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    *status = 0;  // CU_STREAM_CAPTURE_STATUS_NONE
    return check_stream(s, ctx);
}

// ---- events --------------------------------------------------------------------------------------

EXPORT CUresult cuEventCreate(CUevent* pe, unsigned flags) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    if (flags & ~0xFu) return fail(CUDA_ERROR_INVALID_VALUE, "cuEventCreate flags 0x%x", flags);
    EmuEvent* e = new EmuEvent{ctx, flags, false, {}};
    g_events.insert(e);
    *pe = e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!g_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord of unknown event %p", (void*)e);
    if (CUresult r = check_stream(s, ctx)) return r;
    e->recorded = true;
    e->t = std::chrono::steady_clock::now();  // all earlier work on the stream has completed
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned flags) {
    (void)flags;
    return cuEventRecord(e, s);
}

EXPORT CUresult cuEventSynchronize(CUevent e) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!g_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventSynchronize of unknown event %p", (void*)e);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventQuery(CUevent e) {
    return cuEventSynchronize(e);
}

EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    if (!g_events.count(start) || !g_events.count(end)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime of an unknown event");
    if ((start->flags & 2) || (end->flags & 2))  // CU_EVENT_DISABLE_TIMING
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime on an event created with timing disabled");
    if (!start->recorded || !end->recorded) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime of an event never recorded");
    *ms = std::chrono::duration<float, std::milli>(end->t - start->t).count();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    return cuEventElapsedTime(ms, start, end);
}

EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!g_events.erase(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy of unknown event %p", (void*)e);
    delete e;
    return CUDA_SUCCESS;
}

// ---- modules -------------------------------------------------------------------------------------

namespace {

// Checks one PTX module against the driver and the device; builds its functions.
CUresult load_ptx(const std::string& text, const char* origin, EmuModule* m, bool jit) {
    emu::PtxModule ptx;
    std::string err;
    if (!emu::parse_ptx(text, ptx, err)) return fail(CUDA_ERROR_INVALID_PTX, "%s: %s", origin, err.c_str());
    int isa = ptx.version_major * 10 + ptx.version_minor, max = emu::max_ptx_isa(g_dev.cuda);
    if (jit && isa > max)
        return fail(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "%s: PTX ISA %d.%d is newer than this driver (CUDA %d.%d) supports (%d.%d)",
                    origin, ptx.version_major, ptx.version_minor, g_dev.cuda / 1000, (g_dev.cuda % 1000) / 10,
                    max / 10, max % 10);
    if (jit && !emu::ptx_target_runs_on(ptx.target, g_dev.sm, err))
        return fail(CUDA_ERROR_INVALID_PTX, "%s: %s", origin, err.c_str());
    for (const auto& e : ptx.entries) {
        const EmuKernel* k = emu_find_kernel(e.name.c_str());
        if (!k)
            return fail(CUDA_ERROR_INVALID_IMAGE, "%s: kernel %s has no host build in the emulator's registry", origin,
                        e.name.c_str());
        bool same = k->num_params == static_cast<int>(e.param_sizes.size());
        for (size_t i = 0; same && i < e.param_sizes.size(); i++) same = k->param_sizes[i] == e.param_sizes[i];
        if (!same) {
            std::string dev, host;
            for (size_t i = 0; i < e.param_sizes.size(); i++) dev += (i ? "," : "") + std::to_string(e.param_sizes[i]);
            for (int i = 0; i < k->num_params; i++) host += (i ? "," : "") + std::to_string(k->param_sizes[i]);
            return fail(CUDA_ERROR_INVALID_IMAGE,
                        "%s: kernel %s takes parameters of [%s] bytes in the PTX but [%s] in the host build", origin,
                        e.name.c_str(), dev.c_str(), host.c_str());
        }
        unsigned maxn = e.maxntid[0] ? e.maxntid[0] * e.maxntid[1] * e.maxntid[2] : 1024;
        if (maxn > 1024)
            return fail(CUDA_ERROR_INVALID_PTX, "%s: kernel %s declares .maxntid of %u threads (> 1024)", origin,
                        e.name.c_str(), maxn);
        if (e.static_shared > static_cast<size_t>(attribute(8)))
            return fail(CUDA_ERROR_INVALID_PTX, "%s: kernel %s declares %zu bytes of static shared memory (> 48 KB)",
                        origin, e.name.c_str(), e.static_shared);
        auto f = std::make_unique<EmuFunction>();
        f->module = m;
        f->entry = e;
        f->kernel = k;
        f->max_dynamic_shared = attribute(8) - static_cast<int>(e.static_shared);
        m->functions.push_back(std::move(f));
    }
    return CUDA_SUCCESS;
}

CUresult load_image(const void* image, EmuModule* m) {
    uint32_t magic;
    memcpy(&magic, image, 4);
    if (magic == 0xBA55ED50u) {
        std::vector<emu::FatbinEntry> entries;
        std::string err;
        if (!emu::parse_fatbin(image, entries, err)) return fail(CUDA_ERROR_INVALID_IMAGE, "fatbin: %s", err.c_str());
        // SASS runs only on its own architecture's major family with a minor at most the device's.
        bool sass = false;
        std::string have;
        const emu::FatbinEntry* ptx = nullptr;
        for (const auto& e : entries) {
            have += std::string(have.empty() ? "" : ", ") + (e.kind == 1 ? "compute_" : "sm_") + std::to_string(e.sm);
            if (e.kind == 2 && e.sm / 10 == g_dev.sm / 10 && e.sm <= g_dev.sm) sass = true;
            if (e.kind == 1 && e.sm <= g_dev.sm && (!ptx || e.sm > ptx->sm)) ptx = &e;
        }
        // The kernels' parameters are read from PTX: the newest the device can run, else any.
        const emu::FatbinEntry* meta = ptx;
        if (!meta && sass)
            for (const auto& e : entries)
                if (e.kind == 1 && (!meta || e.sm > meta->sm)) meta = &e;
        if (!sass && !ptx)
            return fail(CUDA_ERROR_NO_BINARY_FOR_GPU, "fatbin has no SASS for sm_%d and no PTX it can JIT (it holds: %s)",
                        g_dev.sm, have.c_str());
        if (!meta)
            return fail(CUDA_ERROR_INVALID_IMAGE,
                        "fatbin holds SASS only (%s): the emulator reads the kernels' parameters from PTX; embed PTX too",
                        have.c_str());
        if (meta->compressed)
            return fail(CUDA_ERROR_INVALID_IMAGE,
                        "fatbin PTX for compute_%d is compressed: build it with nvcc --no-compress for the emulator",
                        meta->sm);
        std::string origin = "fatbin PTX (compute_" + std::to_string(meta->sm) + ")";
        // With SASS for the device, the device runs the SASS: the PTX's version and target only
        // matter for a JIT, and the PTX serves for the kernels' parameters.
        return load_ptx(meta->payload, origin.c_str(), m, /*jit=*/!sass);
    }
    // PTX text, NUL-terminated.
    const char* text = static_cast<const char*>(image);
    if (magic == 0x464c457fu)  // "\x7fELF": a bare cubin
        return fail(CUDA_ERROR_INVALID_IMAGE, "a bare cubin: the emulator reads kernels from PTX or a fatbin with PTX");
    return load_ptx(std::string(text), "PTX", m, true);
}

}  // namespace

EXPORT CUresult cuModuleLoadData(CUmodule* pm, const void* image) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!pm || !image) return CUDA_ERROR_INVALID_VALUE;
    auto m = std::make_unique<EmuModule>();
    m->ctx = ctx;
    if (CUresult r = load_image(image, m.get())) return r;
    for (auto& f : m->functions) g_functions.insert(f.get());
    *pm = m.release();
    g_modules.insert(*pm);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleLoadDataEx(CUmodule* pm, const void* image, unsigned n, void* opts, void** vals) {
    (void)n;
    (void)opts;
    (void)vals;
    return cuModuleLoadData(pm, image);
}

EXPORT CUresult cuModuleLoad(CUmodule* pm, const char* path) {
    if (!path) return CUDA_ERROR_INVALID_VALUE;
    FILE* f = fopen(path, "rb");
    if (!f) return fail(CUDA_ERROR_FILE_NOT_FOUND, "cannot open %s: %s", path, strerror(errno));
    std::string data;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
    fclose(f);
    data.push_back('\0');
    return cuModuleLoadData(pm, data.data());
}

EXPORT CUresult cuModuleUnload(CUmodule m) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (!g_modules.erase(m)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload of unknown module %p", (void*)m);
    for (auto& f : m->functions) g_functions.erase(f.get());
    delete m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* pf, CUmodule m, const char* name) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!pf || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!g_modules.count(m)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction on unknown module %p", (void*)m);
    for (auto& f : m->functions)
        if (f->entry.name == name) {
            *pf = f.get();
            return CUDA_SUCCESS;
        }
    return fail(CUDA_ERROR_NOT_FOUND, "no kernel named %s in the module", name);
}

// CUfunction_attribute values.
EXPORT CUresult cuFuncGetAttribute(int* pi, int attrib, CUfunction f) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    if (!g_functions.count(f)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncGetAttribute on unknown function");
    const auto& e = f->entry;
    switch (attrib) {
        case 0:  // MAX_THREADS_PER_BLOCK
            *pi = e.maxntid[0] ? static_cast<int>(e.maxntid[0] * e.maxntid[1] * e.maxntid[2]) : 1024;
            break;
        case 1: *pi = static_cast<int>(e.static_shared); break;  // SHARED_SIZE_BYTES
        case 2: *pi = 0; break;                                   // CONST_SIZE_BYTES
        case 3: *pi = 0; break;                                   // LOCAL_SIZE_BYTES
        case 4: *pi = 0; break;                                   // NUM_REGS (unknown under emulation)
        case 5: *pi = 0; break;                                   // PTX_VERSION
        case 6: *pi = g_dev.sm; break;                            // BINARY_VERSION
        case 8: *pi = f->max_dynamic_shared; break;               // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *pi = 0;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attrib, int value) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (!g_functions.count(f)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncSetAttribute on unknown function");
    if (attrib == 8) {
        int limit = attribute(97) - static_cast<int>(f->entry.static_shared);
        if (value < 0 || value > limit)
            return fail(CUDA_ERROR_INVALID_VALUE, "%s: dynamic shared memory %d bytes exceeds the opt-in limit %d",
                        f->entry.name.c_str(), value, limit);
        f->max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetCacheConfig(CUfunction f, int config) {
    (void)f;
    (void)config;
    return CUDA_SUCCESS;
}

// ---- launch --------------------------------------------------------------------------------------

namespace {
CUresult engine_error(const char* msg) {
    // The engine may name the fault; otherwise a launch failure.
    if (strstr(msg, "assert")) return CUDA_ERROR_ASSERT;
    if (strstr(msg, "misaligned")) return CUDA_ERROR_MISALIGNED_ADDRESS;
    if (strstr(msg, "illegal address") || strstr(msg, "out of bounds")) return CUDA_ERROR_ILLEGAL_ADDRESS;
    if (strstr(msg, "trap") || strstr(msg, "illegal instruction")) return CUDA_ERROR_ILLEGAL_INSTRUCTION;
    return CUDA_ERROR_LAUNCH_FAILED;
}
}  // namespace

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream s, void** params, void** extra) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (!g_functions.count(f)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel of unknown function %p", (void*)f);
    if (f->module->ctx != ctx) return fail(CUDA_ERROR_INVALID_CONTEXT, "%s was loaded in another context", f->entry.name.c_str());
    const auto& e = f->entry;
    const char* name = e.name.c_str();
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: block (%u, %u, %u) outside the limits (1..1024, 1..1024, 1..64)", name,
                    bx, by, bz);
    unsigned long long threads = 1ull * bx * by * bz;
    if (threads > 1024)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: block of %llu threads (> 1024)", name, threads);
    if (e.maxntid[0]) {
        unsigned long long maxn = 1ull * e.maxntid[0] * e.maxntid[1] * e.maxntid[2];
        if (threads > maxn)
            return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                        "%s: block of %llu threads exceeds its .maxntid (__launch_bounds__) of %llu", name, threads, maxn);
    }
    if (e.reqntid[0] && (bx != e.reqntid[0] || by != e.reqntid[1] || bz != e.reqntid[2]))
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: block (%u, %u, %u) differs from its .reqntid (%u, %u, %u)", name, bx, by,
                    bz, e.reqntid[0], e.reqntid[1], e.reqntid[2]);
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: grid (%u, %u, %u) outside the limits (1..2^31-1, 1..65535, 1..65535)",
                    name, gx, gy, gz);
    if (shared > static_cast<unsigned>(f->max_dynamic_shared))
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "%s: %u bytes of dynamic shared memory with %zu static exceed the %d bytes allowed (raise "
                    "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, up to %d)",
                    name, shared, e.static_shared, f->max_dynamic_shared, attribute(97));
    // Copy the parameters as the driver does: each from kernelParams[i], or all from the packed
    // buffer of `extra` at their aligned offsets.
    size_t n = e.param_sizes.size();
    std::vector<size_t> offset(n);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t a = e.param_aligns[i] ? e.param_aligns[i] : 1;
        total = (total + a - 1) / a * a;
        offset[i] = total;
        total += e.param_sizes[i];
    }
    if (total > 32764)
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: %zu bytes of parameters (> 32764)", name, total);
    std::vector<uint64_t> storage((total + 7) / 8 + 1);  // 8-byte aligned; parameters of larger alignment
                                                          // are copied byte-wise by the kernel thunk
    unsigned char* buf = reinterpret_cast<unsigned char*>(storage.data());
    if (params) {
        if (extra) return fail(CUDA_ERROR_INVALID_VALUE, "%s: both kernelParams and extra given", name);
        for (size_t i = 0; i < n; i++) {
            if (!params[i]) return fail(CUDA_ERROR_INVALID_VALUE, "%s: kernelParams[%zu] is null", name, i);
            memcpy(buf + offset[i], params[i], e.param_sizes[i]);
        }
    } else if (extra) {
        // CU_LAUNCH_PARAM_BUFFER_POINTER (1), CU_LAUNCH_PARAM_BUFFER_SIZE (2), CU_LAUNCH_PARAM_END (0)
        const void* pbuf = nullptr;
        size_t psize = 0;
        bool have_size = false;
        for (size_t i = 0; extra[i] != nullptr; i += 2) {
            uintptr_t key = reinterpret_cast<uintptr_t>(extra[i]);
            if (key == 1) pbuf = extra[i + 1];
            else if (key == 2) {
                psize = *static_cast<size_t*>(extra[i + 1]);
                have_size = true;
            } else return fail(CUDA_ERROR_INVALID_VALUE, "%s: unknown key %zu in extra", name, (size_t)key);
        }
        if (!pbuf || !have_size) return fail(CUDA_ERROR_INVALID_VALUE, "%s: extra lacks the buffer or its size", name);
        if (psize < total)
            return fail(CUDA_ERROR_INVALID_VALUE, "%s: parameter buffer of %zu bytes, the kernel takes %zu", name, psize, total);
        memcpy(buf, pbuf, total);
    } else if (n > 0) {
        return fail(CUDA_ERROR_INVALID_VALUE, "%s takes %zu parameters and none were given", name, n);
    }
    std::vector<void*> args(n + 1);
    for (size_t i = 0; i < n; i++) args[i] = buf + offset[i];
    EmuLaunch launch;
    launch.kernel = f->kernel;
    launch.grid[0] = gx;
    launch.grid[1] = gy;
    launch.grid[2] = gz;
    launch.block[0] = bx;
    launch.block[1] = by;
    launch.block[2] = bz;
    launch.dynamic_shared_bytes = shared;
    launch.args = args.data();
    char err[1024] = {0};
    int rc = emu_run(&launch, err, sizeof err);
    if (rc != 0) {
        if (!err[0]) snprintf(err, sizeof err, "%s: the engine failed (code %d) without a message", name, rc);
        CUresult code = engine_error(err);
        ctx->sticky = code;
        ctx->sticky_msg = err;
        return fail(code, "%s", err);
    }
    return CUDA_SUCCESS;
}

// ---- stubs cudarc resolves but the project never reaches return NOT_SUPPORTED ---------------------

EXPORT CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    (void)s;
    (void)mode;
    return fail(CUDA_ERROR_NOT_SUPPORTED, "stream capture (CUDA graphs) is not emulated");
}

EXPORT CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    EmuCtx* ctx;
    if (CUresult r = current(&ctx)) return r;
    if (CUresult r = check_stream(s, ctx)) return r;
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    fn(data);  // in stream order: everything before has completed
    return CUDA_SUCCESS;
}
