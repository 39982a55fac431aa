// The emulated cuBLAS (libcublas.so): handles bound to streams of the emulated driver, and
// cublasGemmEx with cuBLAS's documented column-major semantics and argument checks.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(A) m x k, op(B) k x n, C m x n (column-major)
//
// A is stored m x k (lda >= max(1, m)) for CUBLAS_OP_N and k x m (lda >= max(1, k)) for
// CUBLAS_OP_T/C; likewise B (k x n or n x k); ldc >= max(1, m). Supported with
// CUBLAS_COMPUTE_32F (and its _PEDANTIC / _FAST_* variants, computed the same way): A, B in
// f32, bf16 or f16 (both the same), C in f32 or the inputs' type; alpha and beta f32. Products
// are accumulated in f32 in a fixed order (deterministic); beta = 0 never reads C. Operand ranges
// are checked against the driver's live allocations (CUBLAS_STATUS_EXECUTION_FAILED and a line on
// stderr otherwise, where a GPU would fault).
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <mutex>
#include <set>
#include <vector>

#include "driver.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum : int { OP_N = 0, OP_T = 1, OP_C = 2 };

struct Handle {
    CUstream stream = nullptr;
    int pointer_mode = 0;  // 0 host, 1 device
    int math_mode = 0;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
};

std::mutex g_mu;
std::set<Handle*> g_handles;

int fail(int status, const char* what) {
    fprintf(stderr, "tpo-emu cuBLAS: %s\n", what);
    return status;
}

float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            u = sign | ((127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;            // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;           // overflow to inf (>= 65520)
    if (a < 0x38800000u) {                                // subnormal or zero in f16
        if (a < 0x33000000u) return sign;                 // < 2^-25: rounds to 0
        uint32_t exp = a >> 23, man = (a & 0x7fffff) | 0x800000;
        // value = man * 2^(exp - 150); in units of the f16 subnormal spacing 2^-24: man * 2^(exp - 126)
        int shift = 126 - static_cast<int>(exp);  // 1..24 here
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return static_cast<uint16_t>(sign | q);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1);  // round to nearest even at bit 13
    r -= 0x38000000u;                           // rebias 127 -> 15
    return static_cast<uint16_t>(sign | (r >> 13));
}

size_t elem_size(int t) {
    return t == CUDA_R_32F ? 4 : 2;
}

float load(const void* p, int t, size_t i) {
    if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
    uint16_t h = static_cast<const uint16_t*>(p)[i];
    return t == CUDA_R_16BF ? bf16_to_f32(h) : f16_to_f32(h);
}

void store(void* p, int t, size_t i, float v) {
    if (t == CUDA_R_32F) static_cast<float*>(p)[i] = v;
    else if (t == CUDA_R_16BF) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
size_t span(long rows, long cols, long ld, int t) {
    if (rows <= 0 || cols <= 0) return 0;
    return (static_cast<size_t>(cols - 1) * static_cast<size_t>(ld) + static_cast<size_t>(rows)) * elem_size(t);
}

int check_operand(const char* name, const void* p, long rows, long cols, long ld, int t) {
    size_t n = span(rows, cols, ld, t);
    if (n == 0) return CUBLAS_STATUS_SUCCESS;
    char why[600];
    if (tpoEmuCheckRange(reinterpret_cast<uintptr_t>(p), n, why, sizeof why) != 0) {
        char msg[800];
        snprintf(msg, sizeof msg, "cublasGemmEx: %s (%ld x %ld, ld %ld) is not inside device memory: %s", name, rows,
                 cols, ld, why);
        return fail(CUBLAS_STATUS_EXECUTION_FAILED, msg);
    }
    return CUBLAS_STATUS_SUCCESS;
}

// op(X) as a packed row-major f32 matrix of `rows` x `inner` (row r = row r of op(X)).
void pack(const void* x, int t, bool trans, long rows, long inner, long ld, std::vector<float>& out) {
    out.resize(static_cast<size_t>(rows) * static_cast<size_t>(inner));
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < inner; c++) {
            // op(X)[r, c] = X[r, c] (N) or X[c, r] (T), X column-major with leading dimension ld.
            size_t idx = trans ? static_cast<size_t>(r) * ld + c : static_cast<size_t>(c) * ld + r;
            out[static_cast<size_t>(r) * inner + c] = load(x, t, idx);
        }
}

// Dot product in f32 with 8 partial sums combined in a fixed order.
inline float dot(const float* a, const float* b, long k) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= k; i += 8)
        for (int l = 0; l < 8; l++) s[l] += a[i + l] * b[i + l];
    for (int l = 0; i < k; i++, l++) s[l] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

EXPORT int cublasCreate_v2(void** handle) {
    if (!handle) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasCreate: null handle pointer");
    if (tpoEmuContextError() != 0) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasCreate: no usable CUDA context");
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = new Handle();
    g_handles.insert(h);
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasDestroy_v2(void* handle) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.erase(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasDestroy: unknown handle");
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasSetStream_v2(void* handle, CUstream stream) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetStream: unknown handle");
    if (tpoEmuCheckStream(stream) != 0) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetStream: invalid stream");
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasGetStream_v2(void* handle, CUstream* stream) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasSetPointerMode_v2(void* handle, int mode) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != 0 && mode != 1) return CUBLAS_STATUS_INVALID_VALUE;
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasGetPointerMode_v2(void* handle, int* mode) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = h->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasSetMathMode(void* handle, int mode) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasGetMathMode(void* handle, int* mode) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = h->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasSetWorkspace_v2(void* handle, void* ws, size_t bytes) {
    std::lock_guard<std::mutex> g(g_mu);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->workspace = ws;
    h->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasGetVersion_v2(void* handle, int* version) {
    (void)handle;
    if (!version) return CUBLAS_STATUS_INVALID_VALUE;
    *version = 130000;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                        int Atype, int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype,
                        int ldc, int computeType, int algo) {
    (void)algo;
    Handle* h = static_cast<Handle*>(handle);
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_handles.count(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasGemmEx: unknown handle");
    }
    char msg[400];
    if (transa < OP_N || transa > OP_C || transb < OP_N || transb > OP_C)
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx: invalid transa/transb");
    if (m < 0 || n < 0 || k < 0) {
        snprintf(msg, sizeof msg, "cublasGemmEx: negative dimension (m %d, n %d, k %d)", m, n, k);
        return fail(CUBLAS_STATUS_INVALID_VALUE, msg);
    }
    const bool ta = transa != OP_N, tb = transb != OP_N;
    const long a_rows = ta ? k : m, b_rows = tb ? n : k;
    const long need_lda = a_rows > 1 ? a_rows : 1, need_ldb = b_rows > 1 ? b_rows : 1, need_ldc = m > 1 ? m : 1;
    if (lda < need_lda || ldb < need_ldb || ldc < need_ldc) {
        snprintf(msg, sizeof msg,
                 "cublasGemmEx: leading dimension too small (lda %d needs >= %ld, ldb %d needs >= %ld, ldc %d needs >= "
                 "%ld; op(A) %s, op(B) %s, m %d, n %d, k %d)",
                 lda, need_lda, ldb, need_ldb, ldc, need_ldc, ta ? "T" : "N", tb ? "T" : "N", m, n, k);
        return fail(CUBLAS_STATUS_INVALID_VALUE, msg);
    }
    const bool compute32 = computeType == 68 || computeType == 69 || computeType == 74 || computeType == 75 ||
                           computeType == 77;
    if (!compute32) {
        snprintf(msg, sizeof msg, "cublasGemmEx: compute type %d is not emulated (only CUBLAS_COMPUTE_32F*)", computeType);
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, msg);
    }
    const bool types_ok = Atype == Btype &&
                          ((Atype == CUDA_R_32F && Ctype == CUDA_R_32F) ||
                           ((Atype == CUDA_R_16BF || Atype == CUDA_R_16F) && (Ctype == Atype || Ctype == CUDA_R_32F)));
    if (!types_ok) {
        snprintf(msg, sizeof msg, "cublasGemmEx: unsupported type combination A %d, B %d, C %d with CUBLAS_COMPUTE_32F",
                 Atype, Btype, Ctype);
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, msg);
    }
    if (!alpha || !beta) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx: null alpha or beta");
    if (int r = tpoEmuContextError()) {
        snprintf(msg, sizeof msg, "cublasGemmEx: the CUDA context has failed (CUresult %d)", r);
        return fail(CUBLAS_STATUS_EXECUTION_FAILED, msg);
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    // Scalars: host memory or (pointer mode device) device memory, which is host memory here.
    if (h->pointer_mode == 1) {
        if (tpoEmuCheckRange(reinterpret_cast<uintptr_t>(alpha), 4, nullptr, 0) ||
            tpoEmuCheckRange(reinterpret_cast<uintptr_t>(beta), 4, nullptr, 0))
            return fail(CUBLAS_STATUS_EXECUTION_FAILED, "cublasGemmEx: alpha/beta not in device memory (pointer mode device)");
    }
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    if (int r = check_operand("C", C, m, n, ldc, Ctype)) return r;
    const bool use_ab = k > 0 && al != 0.0f;
    if (use_ab) {
        if (int r = check_operand("A", A, a_rows, ta ? m : k, lda, Atype)) return r;
        if (int r = check_operand("B", B, b_rows, tb ? k : n, ldb, Btype)) return r;
    }
    std::vector<float> pa, pb;
    if (use_ab) {
        pack(A, Atype, ta, m, k, lda, pa);   // op(A): m rows of k
        pack(B, Btype, !tb, n, k, ldb, pb);  // op(B)^T: n rows of k
    }
    for (long j = 0; j < n; j++) {
        for (long i = 0; i < m; i++) {
            size_t ci = static_cast<size_t>(j) * ldc + i;
            float acc = use_ab ? al * dot(&pa[static_cast<size_t>(i) * k], &pb[static_cast<size_t>(j) * k], k) : 0.0f;
            if (be != 0.0f) acc += be * load(C, Ctype, ci);
            store(C, Ctype, ci, acc);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
