// Runs kernels/tpo.cu's per-group code on the host (one lane per group) for tests/host_emulation.rs.
// stdin: mode T G B N on_policy anchored loss_kl eta threshold coef, then offsets[B+1],
//        logp[N] (fit, fused), logp_old[N] (target; fused unless on_policy), scores[N] (target,
//        fused), q_in[N] (fit). T, G: 0 = f32, 1 = bf16, 2 = f16.
// stdout: status, then q[N] (target, fused), grad[N] (fit, fused), group_loss[B] (fit, fused),
//         stats rows (2, 3 or 4 rows of B).
#define TPO_HOST
#include "../../kernels/tpo.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>

static std::vector<double> read(long long n) {
    std::vector<double> v(n);
    for (auto& x : v) {
        char buf[64];
        if (scanf("%63s", buf) != 1) { fprintf(stderr, "short input\n"); exit(2); }
        x = strtod(buf, nullptr);
    }
    return v;
}

template <typename T> static std::vector<T> conv(const std::vector<double>& v) {
    std::vector<T> out;
    for (double x : v) out.push_back(from_f32<T>((float)x));
    return out;
}

static void print(const std::vector<float>& v) {
    for (float x : v) printf("%.9g\n", x);
}

template <typename T, typename G> static int run(int mode, long long B, long long N, int on_policy, TpoParams p) {
    std::vector<double> off = read(B + 1);
    std::vector<long long> offsets(off.begin(), off.end());
    std::vector<T> logp, logp_old;
    std::vector<float> scores, q_in;
    if (mode != MODE_TARGET) logp = conv<T>(read(N));
    if (mode == MODE_TARGET || (mode == MODE_FUSED && !on_policy)) logp_old = conv<T>(read(N));
    if (mode != MODE_FIT) for (double x : read(N)) scores.push_back((float)x);
    if (mode == MODE_FIT) for (double x : read(N)) q_in.push_back((float)x);
    std::vector<float> q(N, nanf("")), group_loss(B, nanf(""));
    std::vector<G> grad(N, from_f32<G>(nanf("")));
    int rows = mode == MODE_TARGET ? 2 : mode == MODE_FIT ? 3 : 4;
    std::vector<float> stats(rows * B, nanf(""));
    unsigned long long status = 0;
    p.logp = logp.empty() ? nullptr : logp.data();
    p.logp_old = logp_old.empty() ? nullptr : logp_old.data();
    p.scores = scores.empty() ? nullptr : scores.data();
    p.q_in = q_in.empty() ? nullptr : q_in.data();
    p.offsets = offsets.data();
    p.q_out = mode == MODE_FIT ? nullptr : q.data();
    p.grad = mode == MODE_TARGET ? nullptr : grad.data();
    p.group_loss = mode == MODE_TARGET ? nullptr : group_loss.data();
    p.stats = stats.data();
    p.status = &status;
    p.num_groups = B;
    for (long long g = 0; g < B; g++) {
        SerialGroup grp{0};
        if (mode == MODE_TARGET) tpo_group<T, G, MODE_TARGET>(p, g, grp);
        else if (mode == MODE_FIT) tpo_group<T, G, MODE_FIT>(p, g, grp);
        else tpo_group<T, G, MODE_FUSED>(p, g, grp);
    }
    printf("%llu\n", status);
    if (mode != MODE_FIT) print(q);
    if (mode != MODE_TARGET) {
        std::vector<float> gf;
        for (auto x : grad) gf.push_back(to_f32(x));
        print(gf);
        print(group_loss);
    }
    print(stats);
    return 0;
}

int main() {
    int mode, t, gt, on_policy, anchored, loss_kl;
    long long B, N;
    double eta, thr, coef;
    if (scanf("%d %d %d %lld %lld %d %d %d %lf %lf %lf", &mode, &t, &gt, &B, &N, &on_policy, &anchored, &loss_kl,
              &eta, &thr, &coef) != 11)
        return 2;
    TpoParams p{};
    // As inv_eta_parts in src/cuda/mod.rs: eta = f 2^k, f in [1/2, 1), so 1 / eta = (1 / f) 2^-k.
    int k = 0;
    const double f = std::frexp(eta, &k);
    p.inv_eta = (float)(1.0 / f);
    p.inv_eta_exp = -k;
    p.zero_std_threshold = (float)thr;
    p.grad_coef = (float)coef;
    p.anchored = anchored;
    p.loss_kl = loss_kl;
    p.k = 0;
    if (t == 0 && gt == 0) return run<float, float>(mode, B, N, on_policy, p);
    if (t == 1 && gt == 0) return run<bf16_t, float>(mode, B, N, on_policy, p);
    if (t == 1 && gt == 1) return run<bf16_t, bf16_t>(mode, B, N, on_policy, p);
    if (t == 2 && gt == 2) return run<f16_t, f16_t>(mode, B, N, on_policy, p);
    if (t == 0 && gt == 1) return run<float, bf16_t>(mode, B, N, on_policy, p);
    return 3;
}
