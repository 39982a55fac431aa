// The engine as the driver ships it: inside a shared library that the process dlopen()s (as
// cudarc opens libcuda.so), with its thread-local state (threadIdx, __shared__) in dynamic TLS.
// Runs the real tpo_seq_reduce (a warp per sequence) and tpo_reduce_loss (one block of 1024).
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "engine.h"

struct SeqParams {  // mirrors kernels/tokens.cu
    const float* token_logp;
    const long long* offsets;
    const unsigned char* mask;
    const float* seq_grad;
    float* seq_out;
    float* token_grad_out;
    long long n_seqs, k;
    int mean, pad_;
};

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) return fprintf(stderr, "dlopen: %s\n", dlerror()), 1;
    auto find = (const EmuKernel* (*)(const char*))dlsym(h, "emu_find_kernel");
    auto run = (int (*)(const EmuLaunch*, char*, size_t))dlsym(h, "emu_run");
    if (!find || !run) return fprintf(stderr, "missing symbols\n"), 1;
    const EmuKernel* k = find("tpo_seq_reduce");
    if (!k || k->num_params != 1 || k->param_sizes[0] != sizeof(SeqParams)) return fprintf(stderr, "tpo_seq_reduce: bad entry\n"), 1;
    const long long n = 300, kk = 77;
    std::vector<float> lp(n * kk), out(n);
    std::vector<unsigned char> mask(n * kk);
    for (long long i = 0; i < n * kk; i++) {
        lp[i] = -(float)(i % 13) * 0.25f;
        mask[i] = (i % 5) != 0;
    }
    SeqParams p{lp.data(), nullptr, mask.data(), nullptr, out.data(), nullptr, n, kk, 1, 0};
    void* args[] = {&p};
    EmuLaunch L{k, {(unsigned)((n + 7) / 8), 1, 1}, {256, 1, 1}, 0, args};
    char err[512] = {0};
    if (run(&L, err, sizeof err)) return fprintf(stderr, "%s\n", err), 1;
    for (long long s = 0; s < n; s++) {
        double sum = 0;
        int cnt = 0;
        for (long long t = s * kk; t < (s + 1) * kk; t++)
            if (mask[t]) sum += lp[t], cnt++;
        if (std::fabs(out[s] - sum / cnt) > 1e-5 * (1 + std::fabs(sum / cnt))) return fprintf(stderr, "seq %lld: %g != %g\n", s, out[s], sum / cnt), 1;
    }
    const EmuKernel* r = find("tpo_reduce_loss");
    if (!r || r->num_params != 4) return fprintf(stderr, "tpo_reduce_loss: bad entry\n"), 1;
    const float* gl = out.data();
    long long count = n;
    double w = 0.5;
    float loss = 0.f;
    float* lossp = &loss;
    void* args2[] = {&gl, &count, &w, &lossp};
    EmuLaunch L2{r, {1, 1, 1}, {1024, 1, 1}, 0, args2};
    if (run(&L2, err, sizeof err)) return fprintf(stderr, "%s\n", err), 1;
    double want = 0;
    for (float v : out) want += v;
    if (std::fabs(loss - 0.5 * want) > 1e-5 * std::fabs(want)) return fprintf(stderr, "loss %g != %g\n", loss, 0.5 * want), 1;
    printf("ok   dlopen smoke: tpo_seq_reduce and tpo_reduce_loss from %s\n", argv[1]);
    return 0;
}
