// Tests of the emulated driver and cuBLAS themselves (run by emu/driver/build.sh test): device
// queries, allocation (alignment, poison, range checks), the loader's PTX/fatbin checks, the
// launcher's limits and parameter copy, sticky faults, and cublasGemmEx's semantics and argument
// checks. Linked against the test registry (test_engine.cpp). Exits nonzero on any failure.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

extern "C" {
typedef int CUresult;
typedef uint64_t CUdeviceptr;
CUresult cuInit(unsigned);
CUresult cuDeviceGet(int*, int);
CUresult cuDeviceGetName(char*, int, int);
CUresult cuDeviceGetAttribute(int*, int, int);
CUresult cuDevicePrimaryCtxRetain(void**, int);
CUresult cuCtxSetCurrent(void*);
CUresult cuStreamCreate(void**, unsigned);
CUresult cuMemAllocAsync(CUdeviceptr*, size_t, void*);
CUresult cuMemFreeAsync(CUdeviceptr, void*);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void*, size_t, void*);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, void*);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, size_t, void*);
CUresult cuMemsetD8Async(CUdeviceptr, unsigned char, size_t, void*);
CUresult cuMemGetInfo_v2(size_t*, size_t*);
CUresult cuPointerGetAttribute(void*, int, CUdeviceptr);
CUresult cuModuleLoadData(void**, const void*);
CUresult cuModuleGetFunction(void**, void*, const char*);
CUresult cuModuleUnload(void*);
CUresult cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                        void**);
CUresult cuGetErrorString(CUresult, const char**);
int cublasCreate_v2(void**);
int cublasSetStream_v2(void*, void*);
int cublasDestroy_v2(void*);
int cublasGemmEx(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int, const void*,
                 void*, int, int, int, int);
}

static int failures = 0;
#define EXPECT(cond, ...)                                          \
    do {                                                           \
        if (!(cond)) {                                             \
            failures++;                                            \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                          \
            fprintf(stderr, "\n");                                 \
        }                                                          \
    } while (0)
#define EXPECT_RC(call, want)                                                       \
    do {                                                                            \
        int rc_ = (call);                                                           \
        EXPECT(rc_ == (want), "%s returned %d, expected %d", #call, rc_, (int)(want)); \
    } while (0)

static const char* PTX_HEAD = ".version 9.0\n.target sm_90\n.address_size 64\n";

static std::string scale_ptx(const char* version, const char* target, const char* p0 = ".u64") {
    std::string s = std::string(".version ") + version + "\n.target " + target + "\n.address_size 64\n";
    s += "// a comment\n.visible .entry emu_test_scale(\n\t.param ";
    s += p0;
    s += " emu_test_scale_param_0,\n\t.param .u32 emu_test_scale_param_1,\n\t.param .f32 emu_test_scale_param_2\n)\n";
    s += ".maxntid 128, 1, 1\n{\n\t.reg .b32 %r<4>;\n\t.shared .align 4 .b8 buf[512];\n\tret;\n}\n";
    return s;
}

// A fatbin as nvcc writes it: header, then entries (64-byte headers, see loader.cpp).
struct Part {
    int kind, sm;
    std::string payload;
    uint64_t flags;
};
static std::vector<unsigned char> fatbin(const std::vector<Part>& entries) {
    std::vector<unsigned char> body;
    for (const auto& [kind, sm, payload, flags] : entries) {
        std::vector<unsigned char> h(64, 0);
        uint16_t k = static_cast<uint16_t>(kind), ver = 0x0101;
        uint32_t hs = 64, arch = static_cast<uint32_t>(sm);
        std::string p = payload;
        p.resize((p.size() + 1 + 15) / 16 * 16, '\0');
        uint64_t size = p.size();
        memcpy(&h[0], &k, 2);
        memcpy(&h[2], &ver, 2);
        memcpy(&h[4], &hs, 4);
        memcpy(&h[8], &size, 8);
        memcpy(&h[28], &arch, 4);
        memcpy(&h[40], &flags, 8);
        body.insert(body.end(), h.begin(), h.end());
        body.insert(body.end(), p.begin(), p.end());
    }
    std::vector<unsigned char> out(16, 0);
    uint32_t magic = 0xBA55ED50u;
    uint16_t v = 1, hs = 16;
    uint64_t total = body.size();
    memcpy(&out[0], &magic, 4);
    memcpy(&out[4], &v, 2);
    memcpy(&out[6], &hs, 2);
    memcpy(&out[8], &total, 8);
    out.insert(out.end(), body.begin(), body.end());
    return out;
}

static void test_device_and_memory(void* s) {
    char name[128];
    EXPECT_RC(cuDeviceGetName(name, sizeof name, 0), 0);
    EXPECT(strstr(name, "tpo emulated CUDA device (sm_90)") != nullptr, "name %s", name);
    int v;
    EXPECT_RC(cuDeviceGetAttribute(&v, 75, 0), 0);
    EXPECT(v == 9, "major %d", v);
    EXPECT_RC(cuDeviceGetAttribute(&v, 1, 0), 0);
    EXPECT(v == 1024, "max threads %d", v);
    EXPECT_RC(cuDeviceGetAttribute(&v, 97, 0), 0);
    EXPECT(v == 232448, "opt-in shared %d", v);

    CUdeviceptr a, b;
    EXPECT_RC(cuMemAllocAsync(&a, 10, s), 0);
    EXPECT(a % 256 == 0, "alignment of 0x%llx", (unsigned long long)a);
    unsigned char host[16];
    EXPECT_RC(cuMemcpyDtoHAsync_v2(host, a, 10, s), 0);
    for (int i = 0; i < 10; i++) EXPECT(host[i] == 0xFF, "poison byte %d = %d", i, host[i]);
    size_t free_b, total;
    EXPECT_RC(cuMemGetInfo_v2(&free_b, &total), 0);
    EXPECT(free_b < total && total > 0, "meminfo %zu %zu", free_b, total);
    // Exactly the requested size: 10 bytes fit, 11 do not; offsets inside are fine.
    EXPECT_RC(cuMemcpyHtoDAsync_v2(a, host, 10, s), 0);
    EXPECT_RC(cuMemcpyHtoDAsync_v2(a, host, 11, s), 1);
    EXPECT_RC(cuMemcpyHtoDAsync_v2(a + 4, host, 6, s), 0);
    EXPECT_RC(cuMemcpyHtoDAsync_v2(a + 4, host, 7, s), 1);
    EXPECT_RC(cuMemcpyDtoHAsync_v2(host, a + 10, 1, s), 1);
    EXPECT_RC(cuMemsetD8Async(a, 0, 11, s), 1);
    EXPECT_RC(cuMemAllocAsync(&b, 16, s), 0);
    EXPECT_RC(cuMemcpyDtoDAsync_v2(b, a, 10, s), 0);
    EXPECT_RC(cuMemcpyDtoDAsync_v2(a, b, 16, s), 1);
    EXPECT_RC(cuMemFreeAsync(a, s), 0);
    EXPECT_RC(cuMemcpyDtoHAsync_v2(host, a, 1, s), 1);  // freed
    EXPECT_RC(cuMemFreeAsync(a, s), 1);                 // double free
    EXPECT_RC(cuMemcpyHtoDAsync_v2(12345, host, 1, s), 1);
    // What a library borrowing memory asks: the allocation holding an address, its context.
    CUdeviceptr start = 0;
    size_t range = 0;
    void* owner = nullptr;
    EXPECT_RC(cuPointerGetAttribute(&start, 11, b + 5), 0);
    EXPECT(start == b, "range start 0x%llx, allocation 0x%llx", (unsigned long long)start, (unsigned long long)b);
    EXPECT_RC(cuPointerGetAttribute(&range, 12, b + 5), 0);
    EXPECT(range == 16, "range size %zu", range);
    EXPECT_RC(cuPointerGetAttribute(&owner, 1, b), 0);
    EXPECT(owner != nullptr, "context of an allocation is null");
    EXPECT_RC(cuPointerGetAttribute(&start, 11, b + 16), 1);  // one past the end
    EXPECT_RC(cuPointerGetAttribute(&start, 11, (CUdeviceptr)(uintptr_t)host), 1);  // host memory
    EXPECT_RC(cuPointerGetAttribute(&start, 99, b), 801);
    EXPECT_RC(cuMemFreeAsync(b, s), 0);
    EXPECT_RC(cuPointerGetAttribute(&start, 11, b), 1);  // freed
    const char* str;
    EXPECT_RC(cuGetErrorString(1, &str), 0);
    EXPECT(strstr(str, "not inside a live allocation") || strstr(str, "not device memory"), "error string %s", str);
}

static void test_loader_and_launch(void* s) {
    void* m;
    void* f;
    // Accepted: ISA 9.0 for sm_90, and older targets.
    EXPECT_RC(cuModuleLoadData(&m, scale_ptx("9.0", "sm_90").c_str()), 0);
    EXPECT_RC(cuModuleGetFunction(&f, m, "emu_test_scale"), 0);
    EXPECT_RC(cuModuleGetFunction(&f, m, "no_such_kernel"), 500);
    EXPECT_RC(cuModuleGetFunction(&f, m, "emu_test_scale"), 0);
    void* m2;
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("8.0", "sm_80").c_str()), 0);
    EXPECT_RC(cuModuleUnload(m2), 0);
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.0", "sm_90a").c_str()), 0);
    EXPECT_RC(cuModuleUnload(m2), 0);
    // Refused: a newer ISA than CUDA 13.0's, a newer target, another architecture's 'a' target.
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.9", "sm_90").c_str()), 222);
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.0", "sm_100").c_str()), 218);
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.0", "sm_100a").c_str()), 218);
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.0", "sm_80a").c_str()), 218);
    // Parameter sizes differ from the host build's (u32 where the host takes a pointer).
    EXPECT_RC(cuModuleLoadData(&m2, scale_ptx("9.0", "sm_90", ".u32").c_str()), 200);
    const char* str;
    cuGetErrorString(200, &str);
    EXPECT(strstr(str, "emu_test_scale") && strstr(str, "[4,4,4]") && strstr(str, "[8,4,4]"), "message: %s", str);
    // An entry without a host build.
    std::string unknown = std::string(PTX_HEAD) + ".visible .entry mystery()\n{\n\tret;\n}\n";
    EXPECT_RC(cuModuleLoadData(&m2, unknown.c_str()), 200);
    // Not PTX at all.
    EXPECT_RC(cuModuleLoadData(&m2, "hello"), 218);

    // Launch: the parameters are copied at launch, the kernel runs, limits are enforced.
    const unsigned n = 300;
    std::vector<float> x(n);
    for (unsigned i = 0; i < n; i++) x[i] = static_cast<float>(i);
    CUdeviceptr d;
    EXPECT_RC(cuMemAllocAsync(&d, n * 4, s), 0);
    EXPECT_RC(cuMemcpyHtoDAsync_v2(d, x.data(), n * 4, s), 0);
    float a = 2.0f;
    unsigned nn = n;
    void* args[] = {&d, &nn, &a};
    EXPECT_RC(cuLaunchKernel(f, 3, 1, 1, 128, 1, 1, 0, s, args, nullptr), 0);
    EXPECT_RC(cuMemcpyDtoHAsync_v2(x.data(), d, n * 4, s), 0);
    bool ok = true;
    for (unsigned i = 0; i < n; i++) ok = ok && x[i] == 2.0f * i;
    EXPECT(ok, "emu_test_scale results");
    EXPECT_RC(cuLaunchKernel(f, 3, 1, 1, 256, 1, 1, 0, s, args, nullptr), 701);  // > .maxntid 128
    EXPECT_RC(cuLaunchKernel(f, 1, 1, 1, 2048, 1, 1, 0, s, args, nullptr), 1);  // > 1024
    EXPECT_RC(cuLaunchKernel(f, 1, 1, 1, 1, 1, 65, 0, s, args, nullptr), 1);    // z > 64
    EXPECT_RC(cuLaunchKernel(f, 1, 70000, 1, 32, 1, 1, 0, s, args, nullptr), 1);  // grid y > 65535
    EXPECT_RC(cuLaunchKernel(f, 0, 1, 1, 32, 1, 1, 0, s, args, nullptr), 1);
    // 512 static bytes: 48 KB - 512 dynamic fit, one more byte does not.
    EXPECT_RC(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 49152 - 512, s, args, nullptr), 0);
    EXPECT_RC(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 49152 - 511, s, args, nullptr), 1);
    // The packed-buffer form of the parameters (extra), at the PTX's offsets 0, 8, 12.
    unsigned char packed[16];
    a = 0.5f;
    memcpy(packed, &d, 8);
    memcpy(packed + 8, &nn, 4);
    memcpy(packed + 12, &a, 4);
    size_t psize = sizeof packed;
    void* extra[] = {(void*)1, packed, (void*)2, &psize, nullptr};
    EXPECT_RC(cuLaunchKernel(f, 3, 1, 1, 128, 1, 1, 0, s, nullptr, extra), 0);
    EXPECT_RC(cuMemcpyDtoHAsync_v2(x.data(), d, 4 * 2, s), 0);
    // x[1]: 1, doubled by the first launch and by the 32-thread one, halved here.
    EXPECT(x[1] == 2.0f, "extra launch: x[1] = %g", x[1]);

    // A struct parameter (.align 8 .b8 p[24]).
    std::string sp = std::string(PTX_HEAD) +
                     ".visible .entry emu_test_struct(\n\t.param .align 8 .b8 emu_test_struct_param_0[24]\n)\n{\n\tret;\n}\n";
    EXPECT_RC(cuModuleLoadData(&m2, sp.c_str()), 0);
    void* fs;
    EXPECT_RC(cuModuleGetFunction(&fs, m2, "emu_test_struct"), 0);
    struct {
        CUdeviceptr out;
        long long v;
        int w, pad;
    } p = {d, 40, 2, 0};
    void* sargs[] = {&p};
    EXPECT_RC(cuLaunchKernel(fs, 1, 1, 1, 32, 1, 1, 0, s, sargs, nullptr), 0);
    EXPECT_RC(cuMemcpyDtoHAsync_v2(x.data(), d, 4, s), 0);
    EXPECT(x[0] == 42.0f, "struct parameter: %g", x[0]);
    std::string sp32 = std::string(PTX_HEAD) +
                       ".visible .entry emu_test_struct(\n\t.param .align 8 .b8 emu_test_struct_param_0[32]\n)\n{\n\tret;\n}\n";
    EXPECT_RC(cuModuleLoadData(&m2, sp32.c_str()), 200);

    // Fatbins: PTX the device can JIT loads; SASS of another family alone does not; SASS for
    // the device with PTX loads even when the PTX is too new to JIT; compressed PTX is refused.
    auto fb = fatbin({{2, 80, "ELF-sm80", 0x11}, {2, 90, "ELF-sm90", 0x11}, {1, 90, scale_ptx("9.0", "sm_90"), 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 0);
    EXPECT_RC(cuModuleGetFunction(&f, m2, "emu_test_scale"), 0);
    fb = fatbin({{2, 80, "ELF-sm80", 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 209);
    fb = fatbin({{2, 80, "ELF-sm80", 0x11}, {1, 100, scale_ptx("9.0", "sm_100"), 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 209);
    fb = fatbin({{2, 90, "ELF-sm90", 0x11}, {1, 90, scale_ptx("9.9", "sm_90"), 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 0);
    fb = fatbin({{1, 90, scale_ptx("9.9", "sm_90"), 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 222);
    fb = fatbin({{1, 90, scale_ptx("9.0", "sm_90"), 0x2011}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 200);
    fb = fatbin({{2, 90, "ELF-sm90", 0x11}});
    EXPECT_RC(cuModuleLoadData(&m2, fb.data()), 200);
    EXPECT_RC(cuMemFreeAsync(d, s), 0);
}

static uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static void test_cublas(void* s) {
    void* h;
    EXPECT_RC(cublasCreate_v2(&h), 0);
    EXPECT_RC(cublasSetStream_v2(h, s), 0);
    // C (m x n) = op(A) op(B), every op combination, against a double reference; padded leading
    // dimensions; beta = 0 on a poisoned C; beta = 1 accumulates.
    const int m = 5, n = 3, k = 7;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
            int lda = ar + 2, ldb = br + 1, ldc = m + 3;
            std::vector<float> A(lda * ac), B(ldb * bc);
            for (size_t i = 0; i < A.size(); i++) A[i] = static_cast<float>((i * 7) % 11) - 5.0f;
            for (size_t i = 0; i < B.size(); i++) B[i] = static_cast<float>((i * 5) % 13) * 0.25f - 1.0f;
            auto opa = [&](int i, int l) { return ta ? A[i * lda + l] : A[l * lda + i]; };
            auto opb = [&](int l, int j) { return tb ? B[l * ldb + j] : B[j * ldb + l]; };
            CUdeviceptr dA, dB, dC;
            cuMemAllocAsync(&dA, A.size() * 4, s);
            cuMemAllocAsync(&dB, B.size() * 4, s);
            cuMemAllocAsync(&dC, ldc * n * 4, s);  // poison: NaN
            cuMemcpyHtoDAsync_v2(dA, A.data(), A.size() * 4, s);
            cuMemcpyHtoDAsync_v2(dB, B.data(), B.size() * 4, s);
            float one = 1.0f, zero = 0.0f, two = 2.0f;
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n, k, &two, (void*)dA, 0, lda, (void*)dB, 0, ldb, &zero, (void*)dC, 0,
                                   ldc, 68, -1),
                      0);
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n, k, &one, (void*)dA, 0, lda, (void*)dB, 0, ldb, &one, (void*)dC, 0,
                                   ldc, 68, -1),
                      0);
            std::vector<float> C(ldc * n);
            cuMemcpyDtoHAsync_v2(C.data(), dC, C.size() * 4, s);
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    double r = 0;
                    for (int l = 0; l < k; l++) r += static_cast<double>(opa(i, l)) * opb(l, j);
                    EXPECT(fabs(C[j * ldc + i] - 3 * r) <= 1e-4 * (1 + fabs(r)), "op %d%d C[%d,%d] = %g, want %g", ta,
                           tb, i, j, C[j * ldc + i], 3 * r);
                }
            // Rows of C between m and ldc are not touched (still poison).
            uint32_t bits;
            memcpy(&bits, &C[m], 4);
            EXPECT(bits == 0xFFFFFFFFu, "padding of C written");
            // Leading dimensions below the stored rows are refused.
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n, k, &one, (void*)dA, 0, ar - 1, (void*)dB, 0, ldb, &zero, (void*)dC,
                                   0, ldc, 68, -1),
                      7);
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n, k, &one, (void*)dA, 0, lda, (void*)dB, 0, br - 1, &zero, (void*)dC,
                                   0, ldc, 68, -1),
                      7);
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n, k, &one, (void*)dA, 0, lda, (void*)dB, 0, ldb, &zero, (void*)dC, 0,
                                   m - 1, 68, -1),
                      7);
            // An operand larger than its allocation fails (a GPU would fault).
            EXPECT_RC(cublasGemmEx(h, ta, tb, m, n + 1, k, &one, (void*)dA, 0, lda, (void*)dB, 0, ldb, &zero,
                                   (void*)dC, 0, ldc, 68, -1),
                      13);
            cuMemFreeAsync(dA, s);
            cuMemFreeAsync(dB, s);
            cuMemFreeAsync(dC, s);
        }
    // bf16 inputs, f32 and bf16 outputs.
    std::vector<uint16_t> A = {bf16(1.5f), bf16(-2.0f), bf16(0.25f), bf16(4.0f)};  // 2x2
    CUdeviceptr dA, dC;
    cuMemAllocAsync(&dA, 8, s);
    cuMemAllocAsync(&dC, 16, s);
    cuMemcpyHtoDAsync_v2(dA, A.data(), 8, s);
    float one = 1.0f, zero = 0.0f;
    EXPECT_RC(cublasGemmEx(h, 0, 1, 2, 2, 2, &one, (void*)dA, 14, 2, (void*)dA, 14, 2, &zero, (void*)dC, 0, 2, 68, -1), 0);
    float C[4];
    cuMemcpyDtoHAsync_v2(C, dC, 16, s);
    // A A^T with A = [[1.5, 0.25], [-2, 4]] (column-major storage).
    EXPECT(C[0] == 1.5f * 1.5f + 0.25f * 0.25f && C[1] == -3.0f + 1.0f && C[3] == 20.0f, "bf16 gemm %g %g %g", C[0], C[1],
           C[3]);
    EXPECT_RC(cublasGemmEx(h, 0, 1, 2, 2, 2, &one, (void*)dA, 14, 2, (void*)dA, 14, 2, &zero, (void*)dC, 14, 2, 68, -1), 0);
    EXPECT_RC(cublasGemmEx(h, 0, 1, 2, 2, 2, &one, (void*)dA, 14, 2, (void*)dA, 2, 2, &zero, (void*)dC, 0, 2, 68, -1), 15);
    EXPECT_RC(cublasGemmEx(h, 0, 1, -1, 2, 2, &one, (void*)dA, 14, 2, (void*)dA, 14, 2, &zero, (void*)dC, 0, 2, 68, -1), 7);
    cuMemFreeAsync(dA, s);
    cuMemFreeAsync(dC, s);
    EXPECT_RC(cublasDestroy_v2(h), 0);
}

static void test_sticky_fault(void* s) {
    std::string fp = std::string(PTX_HEAD) + ".visible .entry emu_test_fault()\n{\n\tret;\n}\n";
    void *m, *f;
    EXPECT_RC(cuModuleLoadData(&m, fp.c_str()), 0);
    EXPECT_RC(cuModuleGetFunction(&f, m, "emu_test_fault"), 0);
    EXPECT_RC(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, s, nullptr, nullptr), 719);
    CUdeviceptr d;
    EXPECT_RC(cuMemAllocAsync(&d, 16, s), 719);  // the context has failed
    const char* str;
    cuGetErrorString(719, &str);
    EXPECT(strstr(str, "barrier not reached"), "message %s", str);
}

int main() {
    EXPECT_RC(cuInit(0), 0);
    int dev;
    EXPECT_RC(cuDeviceGet(&dev, 0), 0);
    void* ctx;
    EXPECT_RC(cuDevicePrimaryCtxRetain(&ctx, dev), 0);
    EXPECT_RC(cuCtxSetCurrent(ctx), 0);
    void* s;
    EXPECT_RC(cuStreamCreate(&s, 1), 0);
    test_device_and_memory(s);
    test_loader_and_launch(s);
    test_cublas(s);
    test_sticky_fault(s);
    if (failures) {
        fprintf(stderr, "driver tests: %d failures\n", failures);
        return 1;
    }
    printf("driver tests: all passed\n");
    return 0;
}
