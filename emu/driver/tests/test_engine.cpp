// A test registry and a sequential executor for the driver's own tests (tests/driver_test.cpp):
// two kernels without barriers, run thread by thread. Linked only into the test build of the
// driver (build.sh test), never into the libraries the GPU suite uses.
#include <stdio.h>
#include <string.h>

#include "../../engine.h"

namespace {
thread_local unsigned t_tid, t_bid, t_bdim;

// emu_test_scale(float* x, unsigned n, float a): x[i] *= a for i < n, one thread per element.
void scale_thunk(void** args) {
    float* x;
    unsigned n;
    float a;
    memcpy(&x, args[0], 8);
    memcpy(&n, args[1], 4);
    memcpy(&a, args[2], 4);
    unsigned i = t_bid * t_bdim + t_tid;
    if (i < n) x[i] *= a;
}
const size_t scale_sizes[] = {8, 4, 4};

// emu_test_struct(Params p): a 24-byte struct {float* out; long long v; int w; int pad;}: out[0] = v + w.
void struct_thunk(void** args) {
    struct P {
        float* out;
        long long v;
        int w, pad;
    } p;
    memcpy(&p, args[0], sizeof p);
    if (t_tid == 0 && t_bid == 0) p.out[0] = static_cast<float>(p.v + p.w);
}
const size_t struct_sizes[] = {24};

// emu_test_fault(): the engine reports an error (as a barrier divergence would be).
void fault_thunk(void**) {}
const EmuKernel KERNELS[] = {
    {"emu_test_scale", scale_thunk, 3, scale_sizes},
    {"emu_test_struct", struct_thunk, 1, struct_sizes},
    {"emu_test_fault", fault_thunk, 0, nullptr},
};
}  // namespace

extern "C" const EmuKernel* emu_find_kernel(const char* name) {
    for (const auto& k : KERNELS)
        if (strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

extern "C" int emu_run(const EmuLaunch* l, char* err, size_t errlen) {
    if (strcmp(l->kernel->name, "emu_test_fault") == 0) {
        snprintf(err, errlen, "emu_test_fault: block (0,0,0) thread (0,0,0): barrier not reached by thread (1,0,0)");
        return 1;
    }
    t_bdim = l->block[0];
    for (unsigned b = 0; b < l->grid[0]; b++)
        for (unsigned t = 0; t < l->block[0]; t++) {
            t_bid = b;
            t_tid = t;
            l->kernel->thunk(l->args);
        }
    return 0;
}

extern "C" const char* emu_engine_name(void) {
    return "driver-test";
}
