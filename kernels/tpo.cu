// Fused TPO group kernels: target construction, fit, and both in one launch.
//
// For one group of members i (flat indices start .. start + n):
//   u_i = (s_i - mean(s)) / std(s)  over the members with l_old_i > -inf (population std;
//         u = 0 when std <= zero_std_threshold), computed on s / max|s| so no overflow;
//   a_i = [anchored] l_old_i + u_i / eta   (-inf for excluded members);
//   q_i = exp(a_i - logsumexp(a)), computed from a_i - max(a) without forming a_i (see TargetState);
//   log p_i = l_i - logsumexp(l);
//   L = -sum q log p  (or KL(q||p) = sum q (log q - log p));
//   dL/dl_i = coef * (sum(q) * p_i - q_i),  coef = grad_scale * reduction weight.
// All math is f32 whatever the storage type. Reductions are fixed-order (deterministic).
#include "tpo_common.cuh"

// Must match `Params` in src/cuda/mod.rs field for field.
struct TpoParams {
    const void* logp;          // T*: current log-probs (fit, fused)
    const void* logp_old;      // T*: rollout log-probs (target; fused: null means logp)
    const float* scores;       // target, fused
    const float* q_in;         // fit: the stored target
    const long long* offsets;  // B + 1 offsets, or null for uniform groups of k
    float* q_out;              // target, fused (fused: may be null)
    void* grad;                // G*: fit, fused
    float* group_loss;         // fit, fused
    float* stats;              // rows of B floats, or null (see stats_rows in mod.rs)
    unsigned long long* status;
    long long num_groups;      // B: groups in the layout (row length of stats)
    long long k;
    float inv_eta;      // 1 / eta = inv_eta * 2^inv_eta_exp, inv_eta in (1, 2] (see inv_eta_parts
    float zero_std_threshold;  //   in mod.rs): exact for every finite eta > 0, where a plain f32
    float grad_coef;    //   1 / eta overflows below eta ~ 2.9e-39
    int anchored;
    int loss_kl;
    int inv_eta_exp;
    // This launch's work list: the groups of one size class (see DeviceLayout in
    // src/cuda/mod.rs). Item i is group group_ids[i], or group i when group_ids is null.
    const long long* group_ids;
    long long num_items;
};

enum { MODE_TARGET = 0, MODE_FIT = 1, MODE_FUSED = 2 };

// Allowed deviation of a stored target's group sum from 1 (cpu::TARGET_SUM_TOLERANCE).
#define TPO_TARGET_SUM_TOLERANCE 1e-2f

// What a built target needs to give log q_i for a member: -inf for excluded members, else
// 2 (h_i - max h) - log sum exp(2 (h - max h)), with h_i = (a_i - c) / 2 for a per-group constant c.
//
// a_i itself is never formed: u_i / eta overflows f32 for a small eta, and l_old_i + u_i / eta loses
// the anchor's digits long before (at eta = 1e-6 already, in f32). With d_i = s_i * scale - ref the
// deviation of the (exactly) scaled score from the group's top score (0 for the top members, exact),
// u_i - u_max = d_i / sd, so
//   h_i = (l_old_i / 2 - L* / 2) + d_i / (2 sd eta),
// L* the largest l_old among the top-scored members (the largest of all for a zero-variance group,
// whose score term is 0, so q = p_old exactly). The score term is <= 0 and exactly 0 on the top
// members, so max h >= 0 is finite; the halving keeps l_old_i - L* from overflowing. The factor
// 1 / (sd eta) = cm 2^cexp is carried as a mantissa cm in [1/2, 1) and an integer exponent, and the term
// is ldexpf((d 2^32) cm, cexp - 33): one rounding, no overflow of 1 / eta and no 0 * inf, for every
// finite eta > 0 (a term below -2^128 becomes -inf: q_i = 0, its limit).
struct TargetState {
    float scale, ref, cm, lstar, hmax, log_se;
    int cexp;
    bool anchored, zero;
    __device__ __forceinline__ float h(float s, float x_old) const {
        if (!(x_old > neg_inf())) return neg_inf();
        const float d = s * scale - ref;
        const float t = (zero || d == 0.f) ? 0.f : ldexpf((d * 4294967296.f) * cm, cexp - 33);
        return anchored ? (0.5f * x_old - 0.5f * lstar) + t : t;
    }
    __device__ __forceinline__ float log_q(float s, float x_old) const {
        const float v = h(s, x_old);
        return v == neg_inf() ? v : 2.f * (v - hmax) - log_se;
    }
};

template <typename T, typename G, int MODE, typename Grp>
__device__ __forceinline__ void tpo_group(const TpoParams& p, long long g, const Grp grp) {
    long long start, n;
    if (p.offsets) {
        start = p.offsets[g];
        n = p.offsets[g + 1] - start;
    } else {
        start = g * p.k;
        n = p.k;
    }
    const long long B = p.num_groups;
    const T* l = (const T*)p.logp;
    const T* lo = p.logp_old ? (const T*)p.logp_old : l;
    const bool on_policy = p.logp_old == nullptr;
    const bool do_target = MODE != MODE_FIT;
    const bool do_fit = MODE != MODE_TARGET;
    const int r = grp.rank, step = grp.size();
    bool bad = false;

    // ---- target statistics ----
    // Everything is kept relative to the group's maxima, so log-probs of thousands in magnitude
    // and any eta lose no precision (see TargetState).
    float scale = 0.f, ref = 0.f, cm = 0.f, lstar = 0.f, lomax = 0.f, hmax = 0.f, log_se = 0.f, log_so = 0.f;
    int cexp = 0;
    bool zero = true;
    if (do_target) {
        int cnt = 0, nbad = 0;
        float smax = 0.f, stop = neg_inf(), xmax = neg_inf();
        for (long long j = r; j < n; j += step) {
            const float x = to_f32(lo[start + j]);
            const float s = p.scores[start + j];
            if (isnan(x) || x == pos_inf()) {
                report(p.status, start + j, on_policy ? TPO_BAD_LOGP : TPO_BAD_LOGP_OLD);
                nbad++;
            }
            if (!isfinite(s)) {
                report(p.status, start + j, TPO_BAD_SCORE);
                nbad++;
            }
            if (x > neg_inf() && x != pos_inf()) {
                cnt++;
                if (isfinite(s)) {
                    smax = fmaxf(smax, fabsf(s));
                    stop = fmaxf(stop, s);
                }
                xmax = fmaxf(xmax, x);
            }
        }
        cnt = grp.isum(cnt);
        nbad = grp.isum(nbad);
        smax = grp.max(smax);
        stop = grp.max(stop);
        lomax = grp.max(xmax);
        if (cnt == 0) {
            if (r == 0) report(p.status, start, on_policy ? TPO_ALL_EXCLUDED : TPO_ALL_EXCLUDED_OLD);
            nbad++;
        }
        bad = nbad > 0;
        if (!bad) {
            // Scores are scaled by an exact power of two (|s * scale| < 1, no rounding) and measured
            // from the group's top score, so equal scores give exactly zero deviation.
            int e = 0;
            frexpf(smax, &e);
            scale = smax > 0.f ? ldexpf(1.f, min(-e, 126)) : 0.f;
            ref = stop * scale;
            float s1 = 0.f, ls = neg_inf();
            for (long long j = r; j < n; j += step) {
                const float x = to_f32(lo[start + j]);
                if (x > neg_inf()) {
                    const float d = p.scores[start + j] * scale - ref;
                    s1 += d;
                    if (d == 0.f) ls = fmaxf(ls, x);
                }
            }
            const float dmean = grp.sum(s1) / (float)cnt;
            lstar = grp.max(ls);
            float s2 = 0.f;
            for (long long j = r; j < n; j += step)
                if (to_f32(lo[start + j]) > neg_inf()) {
                    const float d = (p.scores[start + j] * scale - ref) - dmean;
                    s2 += d * d;
                }
            const float sd = sqrtf(grp.sum(s2) / (float)cnt);  // of the scaled scores
            zero = !(sd > 0.f) || sd / scale <= p.zero_std_threshold;
            if (zero) {
                lstar = lomax;  // u = 0 for every member: a = l_old, q = p_old
            } else {
                int ec = 0;
                cm = frexpf(p.inv_eta / sd, &ec);  // inv_eta in (1, 2], sd in (0, 1]: finite
                cexp = p.inv_eta_exp + ec;
            }
            const TargetState t0{scale, ref, cm, lstar, 0.f, 0.f, cexp, p.anchored != 0, zero};
            float hm = neg_inf();
            for (long long j = r; j < n; j += step) hm = fmaxf(hm, t0.h(p.scores[start + j], to_f32(lo[start + j])));
            hmax = grp.max(hm);
            float se = 0.f, so = 0.f;
            for (long long j = r; j < n; j += step) {
                const float x = to_f32(lo[start + j]);
                if (x > neg_inf()) {
                    se += expf(2.f * (t0.h(p.scores[start + j], x) - hmax));
                    so += expf(x - lomax);
                }
            }
            log_se = logf(grp.sum(se));
            log_so = logf(grp.sum(so));
        }
    }
    const TargetState ts{scale, ref, cm, lstar, hmax, log_se, cexp, p.anchored != 0, zero};

    if (!do_fit) {
        float ent = 0.f, klold = 0.f;
        for (long long j = r; j < n; j += step) {
            const float x = to_f32(lo[start + j]);
            const float lq = bad ? 0.f : ts.log_q(p.scores[start + j], x);
            const float q = bad ? nan_f32() : expf(lq);
            p.q_out[start + j] = q;
            if (q > 0.f) {
                ent -= q * lq;
                klold += q * (lq - ((x - lomax) - log_so));
            }
        }
        ent = grp.sum(ent);
        klold = grp.sum(klold);
        if (r == 0 && p.stats) {
            p.stats[g] = bad ? nan_f32() : ent;
            p.stats[B + g] = bad ? nan_f32() : klold;
        }
        return;
    }

    // ---- fit ----
    float lmax = neg_inf(), qsum = 0.f;
    int nbad = 0;
    for (long long j = r; j < n; j += step) {
        const float x = to_f32(l[start + j]);
        if (isnan(x) || x == pos_inf()) {
            report(p.status, start + j, TPO_BAD_LOGP);
            nbad++;
        } else {
            lmax = fmaxf(lmax, x);
        }
        float q;
        if (do_target) {
            q = bad ? 0.f : expf(ts.log_q(p.scores[start + j], to_f32(lo[start + j])));
        } else {
            q = p.q_in[start + j];
            if (!(q >= 0.f) || q == pos_inf()) {
                report(p.status, start + j, TPO_BAD_TARGET);
                nbad++;
            }
        }
        qsum += q;
    }
    lmax = grp.max(lmax);
    qsum = grp.sum(qsum);
    nbad = grp.isum(nbad);
    if (lmax == neg_inf() && nbad == 0) {
        if (r == 0) report(p.status, start, TPO_ALL_EXCLUDED);
        nbad++;
    }
    if (!do_target && nbad == 0 && !(fabsf(qsum - 1.f) <= TPO_TARGET_SUM_TOLERANCE)) {
        if (r == 0) report(p.status, start, TPO_BAD_TARGET_SUM);
        nbad++;
    }
    bad = bad || nbad > 0;
    float sl = 0.f;
    if (!bad)
        for (long long j = r; j < n; j += step) sl += expf(to_f32(l[start + j]) - lmax);
    const float log_sl = logf(grp.sum(sl));

    G* grad = (G*)p.grad;
    float ce = 0.f, kl = 0.f, ent = 0.f, klold = 0.f, gn = 0.f;
    int ninf = 0;
    for (long long j = r; j < n; j += step) {
        const float x = to_f32(l[start + j]);
        const float lp = (x - lmax) - log_sl;
        float q, lq, x_old = 0.f;
        if (do_target) {
            x_old = to_f32(lo[start + j]);
            lq = bad ? 0.f : ts.log_q(p.scores[start + j], x_old);
            q = bad ? 0.f : expf(lq);
        } else {
            q = p.q_in[start + j];
            lq = q > 0.f ? logf(q) : 0.f;
        }
        if (q > 0.f && !bad) {
            if (lp == neg_inf()) {
                report(p.status, start + j, TPO_INFINITE_LOSS);
                ninf++;
            }
            ce -= q * lp;
            kl += q * (lq - lp);
            ent -= q * lq;
            if (do_target) klold += q * (lq - ((x_old - lomax) - log_so));
        }
        const float gj = bad ? nan_f32() : p.grad_coef * (qsum * expf(lp) - q);
        grad[start + j] = from_f32<G>(gj);
        gn += bad ? 0.f : gj * gj;
        if (do_target && p.q_out) p.q_out[start + j] = bad ? nan_f32() : q;
    }
    ce = grp.sum(ce);
    kl = grp.sum(kl);
    ent = grp.sum(ent);
    klold = grp.sum(klold);
    gn = grp.sum(gn);
    bad = bad || grp.isum(ninf) > 0;
    if (r == 0) {
        p.group_loss[g] = bad ? nan_f32() : (p.loss_kl ? kl : ce);
        if (p.stats) {
            // fit: [kl_q_p, entropy_q, grad_norm]; fused: [kl_q_p, entropy_q, kl_q_pold, grad_norm]
            p.stats[g] = bad ? nan_f32() : kl;
            p.stats[B + g] = bad ? nan_f32() : ent;
            if (do_target) p.stats[2 * B + g] = bad ? nan_f32() : klold;
            p.stats[(do_target ? 3 : 2) * B + g] = bad ? nan_f32() : sqrtf(gn);
        }
    }
}

#ifndef TPO_HOST
// A warp per group, WARPS_PER_BLOCK groups per block, grid-stride over the launch's work list.
template <typename T, typename G, int MODE>
__device__ __forceinline__ void warp_kernel(const TpoParams& p) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long i = warp; i < p.num_items; i += nwarps)
        tpo_group<T, G, MODE>(p, p.group_ids ? p.group_ids[i] : i, WarpGroup{(int)(threadIdx.x & 31)});
}

// A block per group, shared-memory reductions, grid-stride over the launch's work list.
template <typename T, typename G, int MODE>
__device__ __forceinline__ void block_kernel(const TpoParams& p) {
    __shared__ float scratch[33];
    for (long long i = blockIdx.x; i < p.num_items; i += gridDim.x)
        tpo_group<T, G, MODE>(p, p.group_ids ? p.group_ids[i] : i, BlockGroup{(int)threadIdx.x, scratch});
}

#define TPO_WARP_THREADS 256
#define TPO_BLOCK_THREADS 512

#define TPO_TARGET_KERNELS(TN, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(TPO_WARP_THREADS, 4) tpo_target_warp_##TN(TpoParams p) {   \
        warp_kernel<T, float, MODE_TARGET>(p);                                                          \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(TPO_BLOCK_THREADS, 1) tpo_target_block_##TN(TpoParams p) { \
        block_kernel<T, float, MODE_TARGET>(p);                                                         \
    }

#define TPO_FIT_KERNELS(TN, T, GN, G)                                                                           \
    extern "C" __global__ void __launch_bounds__(TPO_WARP_THREADS, 4) tpo_fit_warp_##TN##_##GN(TpoParams p) {       \
        warp_kernel<T, G, MODE_FIT>(p);                                                                         \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(TPO_BLOCK_THREADS, 1) tpo_fit_block_##TN##_##GN(TpoParams p) {     \
        block_kernel<T, G, MODE_FIT>(p);                                                                        \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(TPO_WARP_THREADS, 4) tpo_fused_warp_##TN##_##GN(TpoParams p) {     \
        warp_kernel<T, G, MODE_FUSED>(p);                                                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(TPO_BLOCK_THREADS, 1) tpo_fused_block_##TN##_##GN(TpoParams p) {   \
        block_kernel<T, G, MODE_FUSED>(p);                                                                      \
    }

TPO_TARGET_KERNELS(f32, float)
TPO_TARGET_KERNELS(bf16, bf16_t)
TPO_TARGET_KERNELS(f16, f16_t)

TPO_FIT_KERNELS(f32, float, f32, float)
TPO_FIT_KERNELS(f32, float, bf16, bf16_t)
TPO_FIT_KERNELS(f32, float, f16, f16_t)
TPO_FIT_KERNELS(bf16, bf16_t, f32, float)
TPO_FIT_KERNELS(bf16, bf16_t, bf16, bf16_t)
TPO_FIT_KERNELS(bf16, bf16_t, f16, f16_t)
TPO_FIT_KERNELS(f16, f16_t, f32, float)
TPO_FIT_KERNELS(f16, f16_t, bf16, bf16_t)
TPO_FIT_KERNELS(f16, f16_t, f16, f16_t)

// Scalar loss on the device: out[0] = w * sum(group_loss), summed in f64 in a fixed order by one
// block of 1024 threads (strided partial sums, then a fixed shared-memory tree). A NaN group loss
// (a group with an error) makes the loss NaN.
extern "C" __global__ void __launch_bounds__(1024) tpo_reduce_loss(const float* group_loss, long long n, double w, float* out) {
    __shared__ double sh[1024];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += (double)group_loss[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)(w * sh[0]);
}
#endif  // TPO_HOST
