// Fused policy-gradient baselines (the losses of src/cpu/baselines.rs) on the device: per group of
// a layout, the per-group loss, and the gradient d(coef * L)/dl into G, coef = grad_scale * the
// reduction weight. With K the group's size, r_i = l_i - l_old_i, rho_i = exp(r_i):
//
//   REINFORCE: A_i = s_i - b,  L = -(1/K) sum_i A_i l_i,                 dL/dl_i = -A_i / K;
//   PPO-clip:  A_i given,      L = -(1/K) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i),
//                              dL/dl_i = -(1/K) rho_i A_i [rho_i A_i <= clip(rho_i) A_i];
//   GRPO:      A_i = z-score of s (0 for a group of deviation <= threshold), the PPO surrogate
//              plus (beta/K) sum_i (exp(-r_i) + r_i - 1), whose derivative is (beta/K)(1 - exp(-r_i));
//   DG:        A_i = s_i - b,  g_i = sigmoid(A_i (-l_old_i) / eta),
//              L = -(1/K) sum_i g_i A_i l_i,                            dL/dl_i = -g_i A_i / K;
//
// b the group's mean score or a constant. All math is f32 but where noted (f64 for a constant
// baseline's subtraction, the DG gate's argument, beta times the KL terms and the gradient's
// scaling, so that no f64 parameter is rounded to f32 before it is used). The group mean and the
// z-score are taken on the scores scaled by an exact power of two and shifted by their maximum,
// as the CPU reference does, so equal scores give exactly zero advantages at any magnitude.
// Reductions are fixed-order (deterministic); errors go to the status word (tpo_common.cuh).
#include "tpo_common.cuh"

// Must match `BaselineParams` in src/cuda/baselines.rs field for field.
struct BaselineParams {
    const void* logp;          // T*: current log-probs
    const void* logp_old;      // T*: rollout log-probs (PPO, GRPO, DG; the launch passes logp when on-policy)
    const float* scores;       // scores (REINFORCE, GRPO, DG) or advantages (PPO)
    const long long* offsets;  // B + 1 offsets, or null for uniform groups of k
    void* grad;                // G*
    float* group_loss;         // B floats
    unsigned long long* status;
    long long num_groups;
    long long k;
    const long long* group_ids;  // this launch's work list (see tpo.cu)
    long long num_items;
    double baseline;            // constant baseline b (when !group_mean)
    double eta;                 // DG gate temperature
    double beta;                // GRPO KL weight
    double zero_std_threshold;  // GRPO
    double grad_coef;           // grad_scale * reduction weight
    float clip_lo;              // 1 - eps (PPO, GRPO)
    float clip_hi;              // 1 + eps
    int method;                 // BL_REINFORCE ...
    int group_mean;             // REINFORCE, DG: b = the group's mean score
};

enum { BL_REINFORCE = 0, BL_PPO = 1, BL_GRPO = 2, BL_DG = 3 };

// `1 / (1 + exp(-x))` without overflow (cpu::sigmoid).
__device__ __forceinline__ float bl_sigmoid(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    const float e = expf(x);
    return e / (1.f + e);
}

template <typename T, typename G, typename Grp>
__device__ __forceinline__ void baseline_group(const BaselineParams& p, long long g, const Grp grp) {
    long long start, n;
    if (p.offsets) {
        start = p.offsets[g];
        n = p.offsets[g + 1] - start;
    } else {
        start = g * p.k;
        n = p.k;
    }
    const T* l = (const T*)p.logp;
    const T* lo = (const T*)p.logp_old;
    const int method = p.method;
    const bool has_old = method != BL_REINFORCE;
    const int r = grp.rank, step = grp.size();

    // ---- validation and score statistics ----
    int nbad = 0;
    float smax = 0.f, stop = neg_inf();
    for (long long j = r; j < n; j += step) {
        if (!isfinite(to_f32(l[start + j]))) {
            report(p.status, start + j, TPO_BL_BAD_LOGP);
            nbad++;
        }
        if (has_old && !isfinite(to_f32(lo[start + j]))) {
            report(p.status, start + j, TPO_BL_BAD_LOGP_OLD);
            nbad++;
        }
        const float s = p.scores[start + j];
        if (!isfinite(s)) {
            report(p.status, start + j, method == BL_PPO ? TPO_BAD_ADVANTAGE : TPO_BAD_SCORE);
            nbad++;
        } else {
            smax = fmaxf(smax, fabsf(s));
            stop = fmaxf(stop, s);
        }
    }
    nbad = grp.isum(nbad);
    smax = grp.max(smax);
    stop = grp.max(stop);
    const bool bad = nbad > 0;

    // Centred scores d_i - mean(d), d_i = s_i 2^sexp - max_j s_j 2^sexp (exact), so that
    // A_i = 2^-sexp (d_i - mean): the group-mean advantage; and the deviation for GRPO.
    const bool centre = method == BL_GRPO || (method != BL_PPO && p.group_mean);
    float scale = 0.f, ref = 0.f, mean = 0.f, sd = 0.f;
    int sexp = 0;
    bool zero = true;
    const float nf = (float)n;
    if (centre && !bad) {
        int e = 0;
        frexpf(smax, &e);
        sexp = min(-e, 126);
        scale = smax > 0.f ? ldexpf(1.f, sexp) : 0.f;
        ref = stop * scale;
        float sd_sum = 0.f;
        for (long long j = r; j < n; j += step) sd_sum += p.scores[start + j] * scale - ref;
        mean = grp.sum(sd_sum) / nf;
        if (method == BL_GRPO) {
            float v = 0.f;
            for (long long j = r; j < n; j += step) {
                const float d = (p.scores[start + j] * scale - ref) - mean;
                v += d * d;
            }
            sd = sqrtf(grp.sum(v) / nf);
            // The threshold applies to the deviation of the unscaled scores, compared in f64
            // (2^-sexp sd may be past f32's range).
            zero = sd == 0.f || scale == 0.f || ldexp((double)sd, -sexp) <= p.zero_std_threshold;
        }
    }

    // ---- loss terms and gradient ----
    G* grad = (G*)p.grad;
    const double coef = p.grad_coef / (double)n;  // d(coef * L)/dl_i = coef * K * dL/dl_i / K
    float acc = 0.f;
    int novf = 0;
    for (long long j = r; j < n; j += step) {
        float gj = nan_f32();
        if (!bad) {
            const float x = to_f32(l[start + j]);
            const float s = p.scores[start + j];
            float a;
            if (method == BL_PPO) {
                a = s;
            } else if (method == BL_GRPO) {
                a = zero ? 0.f : ((s * scale - ref) - mean) / sd;
            } else if (p.group_mean) {
                a = scale == 0.f ? 0.f : ldexpf((s * scale - ref) - mean, -sexp);
            } else {
                a = (float)((double)s - p.baseline);
            }
            float term, d;
            if (method == BL_REINFORCE || method == BL_DG) {
                float gate = 1.f;
                if (method == BL_DG) {
                    const double xo = (double)to_f32(lo[start + j]);
                    gate = bl_sigmoid((float)(((double)a * -xo) / p.eta));
                }
                const float ga = gate * a;
                term = -(ga * x);
                d = -ga;
            } else {
                const float rr = x - to_f32(lo[start + j]);
                const float rho = expf(rr);
                // A zero advantage contributes nothing, even where rho overflows f32.
                const float unc = a == 0.f ? 0.f : rho * a;
                const float clp = a == 0.f ? 0.f : fminf(fmaxf(rho, p.clip_lo), p.clip_hi) * a;
                const bool active = unc <= clp;  // ties count as active (the CPU reference's rule)
                term = -(active ? unc : clp);
                d = active ? -unc : 0.f;
                if (method == BL_GRPO && p.beta > 0.0) {
                    // exp(-r) + r - 1 = expm1(-r) + r, and 1 - exp(-r) = -expm1(-r): no cancellation
                    // against the 1 for small r.
                    const float em = expm1f(-rr);
                    term += (float)(p.beta * (double)(em + rr));
                    d += (float)(p.beta * (double)(-em));
                }
            }
            const float t = term / nf;
            acc += t;
            gj = (float)(coef * (double)d);
            // A loss term, or a gradient in its storage type G, past the range: the group overflows.
            if (!isfinite(t) || !isfinite(to_f32(from_f32<G>(gj)))) novf++;
        }
        grad[start + j] = from_f32<G>(gj);
    }
    const float loss = grp.sum(acc);
    novf = grp.isum(novf);
    const bool ovf = !bad && (novf > 0 || !isfinite(loss));
    if (ovf) {
        // Each thread rewrites only the elements it wrote above: no other thread touches them.
        for (long long j = r; j < n; j += step) grad[start + j] = from_f32<G>(nan_f32());
    }
    if (r == 0) {
        if (ovf) report(p.status, start, TPO_BL_OVERFLOW_GROUP + method);
        p.group_loss[g] = (bad || ovf) ? nan_f32() : loss;
    }
}

#ifndef TPO_HOST
template <typename T, typename G>
__device__ __forceinline__ void baseline_warp_kernel(const BaselineParams& p) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long i = warp; i < p.num_items; i += nwarps)
        baseline_group<T, G>(p, p.group_ids ? p.group_ids[i] : i, WarpGroup{(int)(threadIdx.x & 31)});
}

template <typename T, typename G>
__device__ __forceinline__ void baseline_block_kernel(const BaselineParams& p) {
    __shared__ float scratch[33];
    for (long long i = blockIdx.x; i < p.num_items; i += gridDim.x)
        baseline_group<T, G>(p, p.group_ids ? p.group_ids[i] : i, BlockGroup{(int)threadIdx.x, scratch});
}

#define TPO_BL_WARP_THREADS 256
#define TPO_BL_BLOCK_THREADS 512

#define TPO_BASELINE_KERNELS(TN, T, GN, G)                                                              \
    extern "C" __global__ void __launch_bounds__(TPO_BL_WARP_THREADS, 4)                                \
        tpo_baseline_warp_##TN##_##GN(BaselineParams p) {                                               \
        baseline_warp_kernel<T, G>(p);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(TPO_BL_BLOCK_THREADS, 1)                               \
        tpo_baseline_block_##TN##_##GN(BaselineParams p) {                                              \
        baseline_block_kernel<T, G>(p);                                                                 \
    }

TPO_BASELINE_KERNELS(f32, float, f32, float)
TPO_BASELINE_KERNELS(f32, float, bf16, bf16_t)
TPO_BASELINE_KERNELS(f32, float, f16, f16_t)
TPO_BASELINE_KERNELS(bf16, bf16_t, f32, float)
TPO_BASELINE_KERNELS(bf16, bf16_t, bf16, bf16_t)
TPO_BASELINE_KERNELS(bf16, bf16_t, f16, f16_t)
TPO_BASELINE_KERNELS(f16, f16_t, f32, float)
TPO_BASELINE_KERNELS(f16, f16_t, bf16, bf16_t)
TPO_BASELINE_KERNELS(f16, f16_t, f16, f16_t)

// The scalar loss out[0] = w * sum(group_loss), summed in f64 in a fixed order by one block of 1024
// threads (as tpo_reduce_loss). A NaN group loss (a group with an error) makes the loss NaN; a
// finite sum whose f32 value overflows is reported as `code` at flat index `index` (past every
// member, so any data error of the call is reported first).
extern "C" __global__ void __launch_bounds__(1024) tpo_baseline_reduce(
    const float* group_loss, long long n, double w, float* out, unsigned long long* status,
    long long index, unsigned int code) {
    __shared__ double sh[1024];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += (double)group_loss[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const double v = w * sh[0];
        const float f = (float)v;
        if (!isnan(v) && !isfinite(f)) report(status, index, code);
        out[0] = f;
    }
}
#endif  // TPO_HOST
