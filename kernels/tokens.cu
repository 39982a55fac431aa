// Token-level kernels: per-token log-probs from logits in one pass (no f32 copy of the logits),
// masked sequence sums, the broadcast of per-sequence gradients to tokens, and the backward to
// the logits (optionally in place). See src/cpu/tokens.rs for the formulas.
//
// For row t with logits z and d_v = (z_v - m) / tau, m = max z, the forward keeps, per thread and
// then per block in a fixed order, S = sum exp(d), Z = sum exp(d) d:
//   lse = m / tau + log S,  logp = d_y - log S,  entropy = log S - Z / S;
// m and log S are kept per row for the backward, p_v = exp(d_v - log S).
#include "tpo_common.cuh"

// Must match `TokenParams` in src/cuda/tokens.rs field for field.
struct TokenParams {
    const void* logits;        // T* [rows, vocab]
    void* grad_out;            // T* [rows, vocab] (backward; may equal logits: in place)
    const unsigned int* tokens;  // [rows]
    float* logp;               // [rows] (forward)
    float* lse;                // [rows] (forward)
    float* row_max;            // [rows] m = max of the raw logits (forward writes, backward reads)
    float* log_sum;            // [rows] log S (forward writes, backward reads)
    float* entropy;            // [rows] or null
    const float* token_grad;   // [rows] (backward)
    unsigned long long* status;
    long long rows;
    long long vocab;           // columns in this call: the whole vocabulary, or a block of it
    long long ld;              // row stride of logits and grad_out, in elements (>= vocab)
    long long col0;            // vocabulary index of column 0 (backward over a block; 0 otherwise)
    long long row0;            // batch index of row 0 (errors name [row0 + t, v] of the batch's logits)
    float inv_tau;
    int pad_;
};

// 16 bytes of elements, loaded or stored as one vector.
template <typename T> union Pack16 {
    uint4 raw;
    T v[16 / sizeof(T)];
};

// The first element of row z at a 16-byte boundary (n when the row is too short, or when z, or
// the output row d, is not aligned like it: then the whole row goes element by element).
template <typename T>
__device__ __forceinline__ long long vector_head(const T* z, const T* d, long long n) {
    const uintptr_t a = (uintptr_t)z;
    if (a % sizeof(T) != 0 || (a & 15u) != ((uintptr_t)d & 15u)) return n;
    const long long head = (long long)((16u - (a & 15u)) & 15u) / (long long)sizeof(T);
    return head < n ? head : n;
}

// Calls f(v, d[v], x_v) for the elements of row z (n of them) that lane `rank` of `size` owns and
// stores what it returns, when `d` is not null, at d[v]: a scalar head up to the first 16-byte
// boundary, then 16-byte vectors (one load and one store per lane per step), then a scalar tail.
// Each element is read, then written, by the same lane, so d may be z (in place). Which lane owns
// which element is fixed, so the per-lane partial results, and their reduction, are too.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* z, T* d, long long n, int rank, int size, F f) {
    constexpr int N = 16 / sizeof(T);
    const long long head = vector_head(z, d ? d : z, n);
    for (long long v = rank; v < head; v += size) {
        const float y = f(v, to_f32(z[v]));
        if (d) d[v] = from_f32<T>(y);
    }
    const long long nvec = (n - head) / N;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
    uint4* dv = d ? reinterpret_cast<uint4*>(d + head) : nullptr;
    for (long long i = rank; i < nvec; i += size) {
        Pack16<T> in, out;
        in.raw = zv[i];
        TPO_UNROLL
        for (int j = 0; j < N; j++) out.v[j] = from_f32<T>(f(head + i * N + j, to_f32(in.v[j])));
        if (d) dv[i] = out.raw;
    }
    for (long long v = head + nvec * N + rank; v < n; v += size) {
        const float y = f(v, to_f32(z[v]));
        if (d) d[v] = from_f32<T>(y);
    }
}

#define TPO_LOG2E 1.4426950408889634f
#define TPO_LN2 0.6931471805599453f

template <typename T, typename Grp>
__device__ __forceinline__ void token_fwd_row(const TokenParams& p, long long t, const Grp grp) {
    const T* z = (const T*)p.logits + t * p.ld;
    const int r = grp.rank;
    // m is the max of the raw logits; differences (x - m) are formed before scaling by 1/tau, so
    // large logits keep full precision: a - max a = (x - m) / tau. Exponentials are taken in base
    // 2 (one multiply by it2 = log2(e) / tau, then exp2f): with b = (x - m) it2,
    // S = sum 2^b and Z2 = sum 2^b b, so that log S is natural and Z = ln 2 Z2.
    const float it = p.inv_tau, it2 = p.inv_tau * TPO_LOG2E;
    float m = neg_inf(), s = 0.f, sz = 0.f;
    int nbad = 0;
    for_each_in_row(z, (T*)nullptr, p.vocab, r, grp.size(), [&](long long v, float x) {
        if (!(x < pos_inf())) {  // NaN or +inf
            report(p.status, (p.row0 + t) * p.vocab + v, TPO_BAD_LOGIT);
            nbad++;
        } else if (x > m) {
            const float b = (m - x) * it2;  // -inf when m = -inf
            const float c = exp2f(b);
            sz = s > 0.f ? (sz + b * s) * c : 0.f;
            s = s * c + 1.f;
            m = x;
        } else if (x > neg_inf()) {
            const float b = (x - m) * it2;
            const float e = exp2f(b);
            s += e;
            sz += e * b;
        }
        return 0.f;
    });
    const float M = grp.max(m);
    const float bm = m == neg_inf() ? neg_inf() : (m - M) * it2;
    const float c = exp2f(bm);
    const float S = grp.sum(s * c);
    const float Z = TPO_LN2 * grp.sum(s > 0.f ? (sz + bm * s) * c : 0.f);
    nbad = grp.isum(nbad);
    if (r == 0) {
        const unsigned int y = p.tokens[t];
        bool bad = nbad > 0;
        float zy = 0.f;
        if (y >= p.vocab) {
            report(p.status, p.row0 + t, TPO_BAD_TOKEN);
            bad = true;
        } else {
            zy = to_f32(z[y]);
            if (!(zy > neg_inf()) && !bad) {
                report(p.status, (p.row0 + t) * p.vocab + y, TPO_TOKEN_LOGIT_NEG_INF);
                bad = true;
            }
        }
        const float log_s = logf(S);
        p.logp[t] = bad ? nan_f32() : (zy - M) * it - log_s;
        p.lse[t] = bad ? nan_f32() : M * it + log_s;
        p.row_max[t] = bad ? nan_f32() : M;
        p.log_sum[t] = bad ? nan_f32() : log_s;
        if (p.entropy) p.entropy[t] = bad ? nan_f32() : log_s - Z / S;
    }
}

template <typename T, typename Grp>
__device__ __forceinline__ void token_bwd_row(const TokenParams& p, long long t, const Grp grp) {
    const T* z = (const T*)p.logits + t * p.ld;
    T* d = (T*)p.grad_out + t * p.ld;
    // p_v = exp((a_v - m) - log S) = 2^((z_v - m) it2 - log2 S): relative to the row max, so large
    // logits keep their precision.
    const float g = p.token_grad[t], m = p.row_max[t], it = p.inv_tau, it2 = p.inv_tau * TPO_LOG2E;
    const float ls2 = p.log_sum[t] * TPO_LOG2E, git = g * it;
    // The sampled token's column in this block (outside 0..vocab when another block holds it).
    const long long y = (long long)p.tokens[t] - p.col0;
    for_each_in_row(z, d, p.vocab, grp.rank, grp.size(), [&](long long v, float x) {
        const float pv = exp2f(fmaf(x - m, it2, -ls2));
        return git * ((v == y ? 1.f : 0.f) - pv);
    });
}

// Must match `SeqParams` in src/cuda/tokens.rs field for field.
struct SeqParams {
    const float* token_logp;   // [T] (reduce)
    const long long* offsets;  // [n_seqs + 1] over tokens, or null for sequences of k tokens
    const unsigned char* mask; // [T], 1 = completion token
    const float* seq_grad;     // [n_seqs] (broadcast)
    float* seq_out;            // [n_seqs] (reduce)
    float* token_grad_out;     // [T] (broadcast)
    long long n_seqs;
    long long k;
    int mean;
    int pad_;
};

__device__ __forceinline__ long long seq_start(const SeqParams& p, long long i) {
    return p.offsets ? p.offsets[i] : i * p.k;
}

template <typename Grp>
__device__ __forceinline__ void seq_reduce(const SeqParams& p, long long i, const Grp grp) {
    const long long a = seq_start(p, i), b = seq_start(p, i + 1);
    int cnt = 0;
    float sum = 0.f;
    for (long long t = a + grp.rank; t < b; t += grp.size())
        if (p.mask[t]) {
            cnt++;
            sum += p.token_logp[t];
        }
    cnt = grp.isum(cnt);
    sum = grp.sum(sum);
    if (grp.rank == 0) p.seq_out[i] = p.mean ? (cnt > 0 ? sum / (float)cnt : 0.f) : sum;
}

template <typename Grp>
__device__ __forceinline__ void seq_broadcast(const SeqParams& p, long long i, const Grp grp) {
    const long long a = seq_start(p, i), b = seq_start(p, i + 1);
    int cnt = 0;
    for (long long t = a + grp.rank; t < b; t += grp.size()) cnt += p.mask[t] ? 1 : 0;
    cnt = grp.isum(cnt);
    const float G = p.seq_grad[i];
    const float w = p.mean ? (cnt > 0 ? G / (float)cnt : 0.f) : G;
    for (long long t = a + grp.rank; t < b; t += grp.size()) p.token_grad_out[t] = p.mask[t] ? w : 0.f;
}

#ifndef TPO_HOST
#define TPO_ROW_THREADS 256

#define TPO_TOKEN_KERNELS(TN, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(TPO_ROW_THREADS, 1) tpo_token_fwd_##TN(TokenParams p) {   \
        __shared__ float scratch[33];                                                                      \
        for (long long t = blockIdx.x; t < p.rows; t += gridDim.x)                                          \
            token_fwd_row<T>(p, t, BlockGroup{(int)threadIdx.x, scratch});                                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(TPO_ROW_THREADS, 1) tpo_token_bwd_##TN(TokenParams p) {   \
        __shared__ float scratch[33];                                                                      \
        for (long long t = blockIdx.x; t < p.rows; t += gridDim.x)                                          \
            token_bwd_row<T>(p, t, BlockGroup{(int)threadIdx.x, scratch});                                 \
    }

TPO_TOKEN_KERNELS(f32, float)
TPO_TOKEN_KERNELS(bf16, bf16_t)
TPO_TOKEN_KERNELS(f16, f16_t)

// A warp per sequence, 8 per block, grid-stride.
extern "C" __global__ void __launch_bounds__(256, 4) tpo_seq_reduce(SeqParams p) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nw = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long i = w; i < p.n_seqs; i += nw) seq_reduce(p, i, WarpGroup{(int)(threadIdx.x & 31)});
}
extern "C" __global__ void __launch_bounds__(256, 4) tpo_seq_broadcast(SeqParams p) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nw = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long i = w; i < p.n_seqs; i += nw) seq_broadcast(p, i, WarpGroup{(int)(threadIdx.x & 31)});
}
#endif  // TPO_HOST
