// Runs kernels/tokens.cu's per-row and per-sequence code on the host (one lane) for
// tests/host_emulation_tokens.rs.
// stdin: kind, then
//   kind 0 (forward):   T rows vocab inv_tau, logits[rows*vocab], tokens[rows]
//                       -> status, logp[rows], lse[rows], entropy[rows], row_max[rows], log_sum[rows]
//   kind 1 (backward):  T rows vocab inv_tau, logits, tokens, row_max[rows], log_sum[rows],
//                       token_grad[rows] -> grad
//   kind 4 (backward over the vocabulary block col0..col0+cols, as the fused linear path runs it):
//                       T rows vocab inv_tau col0 cols, then as kind 1 -> the number of padding
//                       elements written (must be 0), grad[rows, cols]. The block is copied into
//                       a buffer with row stride cols + 3, the padding poisoned. With col0 odd,
//                       the gradient goes to another buffer, one element off the logits'
//                       alignment (not in place), and the padding count is of that buffer.
//   kind 2 (seq sums):  n_seqs mean uniform, offsets[n+1], mask[T], token_logp[T] -> seq[n]
//   kind 3 (broadcast): n_seqs mean uniform, offsets[n+1], mask[T], seq_grad[n] -> token_grad[T]
//   (uniform = 1: the kernel gets no offsets but k = offsets[1], as for a uniform layout)
// T: 0 = f32, 1 = bf16, 2 = f16.
#define TPO_HOST
#include "../../kernels/tokens.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>

static std::vector<double> read(long long n) {
    std::vector<double> v(n);
    for (auto& x : v) {
        char buf[64];
        if (scanf("%63s", buf) != 1) exit(2);
        x = strtod(buf, nullptr);
    }
    return v;
}

template <typename T>
static int rows_kind(int kind, long long rows, long long vocab, double inv_tau, long long col0, long long cols) {
    std::vector<T> logits;
    for (double x : read(rows * vocab)) logits.push_back(from_f32<T>((float)x));
    std::vector<unsigned int> tokens;
    for (double x : read(rows)) tokens.push_back((unsigned int)x);
    std::vector<float> logp(rows, nanf("")), lse(rows, nanf("")), entropy(rows, nanf("")), tg(rows);
    std::vector<float> row_max(rows, nanf("")), log_sum(rows, nanf(""));
    unsigned long long status = 0;
    TokenParams p{};
    p.logits = logits.data();
    p.tokens = tokens.data();
    p.rows = rows;
    p.vocab = vocab;
    p.ld = vocab;
    p.inv_tau = (float)inv_tau;
    p.status = &status;
    if (kind == 0) {
        p.logp = logp.data();
        p.lse = lse.data();
        p.entropy = entropy.data();
        p.row_max = row_max.data();
        p.log_sum = log_sum.data();
        for (long long t = 0; t < rows; t++) token_fwd_row<T>(p, t, SerialGroup{0});
        printf("%llu\n", status);
        for (auto* v : {&logp, &lse, &entropy, &row_max, &log_sum})
            for (float x : *v) printf("%.9g\n", x);
    } else {
        std::vector<double> m = read(rows), ls = read(rows), g = read(rows);
        for (long long t = 0; t < rows; t++) {
            row_max[t] = (float)m[t];
            log_sum[t] = (float)ls[t];
            tg[t] = (float)g[t];
        }
        p.row_max = row_max.data();
        p.log_sum = log_sum.data();
        p.token_grad = tg.data();
        if (kind == 1) {
            p.grad_out = logits.data();  // in place, as the in-place call does
            for (long long t = 0; t < rows; t++) token_bwd_row<T>(p, t, SerialGroup{0});
            for (auto x : logits) printf("%.9g\n", to_f32(x));
            return 0;
        }
        const long long ld = cols + 3;
        const T poison = from_f32<T>(-12288.f);
        std::vector<T> block(rows * ld, poison);
        for (long long t = 0; t < rows; t++)
            for (long long v = 0; v < cols; v++) block[t * ld + v] = logits[t * vocab + col0 + v];
        std::vector<T> other(rows * ld + 1, poison);
        const bool in_place = col0 % 2 == 0;
        T* out = in_place ? block.data() : other.data() + 1;
        p.logits = block.data();
        p.grad_out = out;  // in place, as the fused linear path does, or elsewhere
        p.vocab = cols;
        p.ld = ld;
        p.col0 = col0;
        for (long long t = 0; t < rows; t++) token_bwd_row<T>(p, t, SerialGroup{0});
        int written = 0;
        for (long long t = 0; t < rows; t++)
            for (long long v = cols; v < ld; v++) written += to_f32(out[t * ld + v]) != -12288.f;
        printf("%d\n", written);
        for (long long t = 0; t < rows; t++)
            for (long long v = 0; v < cols; v++) printf("%.9g\n", to_f32(out[t * ld + v]));
    }
    return 0;
}

int main() {
    int kind;
    if (scanf("%d", &kind) != 1) return 2;
    if (kind <= 1 || kind == 4) {
        int t;
        long long rows, vocab, col0 = 0, cols = 0;
        double inv_tau;
        if (scanf("%d %lld %lld %lf", &t, &rows, &vocab, &inv_tau) != 4) return 2;
        if (kind == 4 && scanf("%lld %lld", &col0, &cols) != 2) return 2;
        if (t == 0) return rows_kind<float>(kind, rows, vocab, inv_tau, col0, cols);
        if (t == 1) return rows_kind<bf16_t>(kind, rows, vocab, inv_tau, col0, cols);
        return rows_kind<f16_t>(kind, rows, vocab, inv_tau, col0, cols);
    }
    long long n;
    int mean, uniform;
    if (scanf("%lld %d %d", &n, &mean, &uniform) != 3) return 2;
    std::vector<double> off = read(n + 1);
    std::vector<long long> offsets(off.begin(), off.end());
    long long T = offsets[n];
    std::vector<unsigned char> mask;
    for (double x : read(T)) mask.push_back(x != 0.0);
    std::vector<float> in, out;
    for (double x : read(kind == 2 ? T : n)) in.push_back((float)x);
    out.assign(kind == 2 ? n : T, nanf(""));
    SeqParams p{};
    p.offsets = uniform ? nullptr : offsets.data();
    p.k = offsets[1];
    p.mask = mask.data();
    p.n_seqs = n;
    p.mean = mean;
    if (kind == 2) {
        p.token_logp = in.data();
        p.seq_out = out.data();
        for (long long i = 0; i < n; i++) seq_reduce(p, i, SerialGroup{0});
    } else {
        p.seq_grad = in.data();
        p.token_grad_out = out.data();
        for (long long i = 0; i < n; i++) seq_broadcast(p, i, SerialGroup{0});
    }
    for (float x : out) printf("%.9g\n", x);
    return 0;
}
