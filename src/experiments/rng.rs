//! A small deterministic generator (xoshiro256++ seeded by splitmix64), so that experiment
//! results are bit-for-bit the same on every machine and with every dependency version.

/// xoshiro256++ (Blackman & Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`; different seeds give independent-looking streams.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An index drawn with probability `probs[i] / sum(probs)` (inverse CDF).
    pub fn categorical(&mut self, cdf: &[f64]) -> usize {
        let total = *cdf.last().expect("non-empty distribution");
        let u = self.uniform() * total;
        cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_normal_moments() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let (mut s, mut s2, mut m, mut m2) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..n {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
            s += u;
            s2 += u * u;
            let z = r.normal();
            m += z;
            m2 += z * z;
        }
        let n = n as f64;
        assert!((s / n - 0.5).abs() < 0.005 && (s2 / n - 1.0 / 3.0).abs() < 0.005);
        assert!((m / n).abs() < 0.01 && (m2 / n - 1.0).abs() < 0.01);
    }

    #[test]
    fn categorical_follows_the_weights() {
        let mut r = Rng::new(1);
        let cdf = [0.1, 0.1, 0.7, 1.0]; // weights 0.1, 0, 0.6, 0.3
        let mut counts = [0usize; 4];
        for _ in 0..100_000 {
            counts[r.categorical(&cdf)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((counts[0] as f64 / 1e5 - 0.1).abs() < 0.01);
        assert!((counts[2] as f64 / 1e5 - 0.6).abs() < 0.01);
        assert_eq!(Rng::new(3).next_u64(), Rng::new(3).next_u64());
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
    }
}
