//! Writes `examples/data/rollout.safetensors`, the input of the README's `tpo eval` command:
//! 8 prompts x 16 completions, sequence log-probs in the hundreds (sums over tokens), the
//! trainer's `logp` slightly off the rollout engine's `logp_old`, and binary pass/fail scores.
//!
//! Run: `cargo run --example make_eval_input`.

use safetensors::{tensor::TensorView, Dtype};

/// splitmix64: a tiny deterministic generator, so the file is the same on every machine.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (b, k) = (8usize, 16usize);
    let mut rng = Rng(2604_06159);
    let mut logp_old = Vec::new();
    let mut logp = Vec::new();
    let mut scores = Vec::new();
    for _ in 0..b {
        let pass_rate = rng.next();
        for _ in 0..k {
            let tokens = 50.0 + 400.0 * rng.next();
            let lo = -tokens * (0.2 + 0.6 * rng.next());
            logp_old.push(lo as f32);
            logp.push((lo + 0.05 * (rng.next() - 0.5)) as f32);
            scores.push(if rng.next() < pass_rate { 1.0f32 } else { 0.0 });
        }
    }
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (a, o, s) = (bytes(&logp), bytes(&logp_old), bytes(&scores));
    let views = vec![
        ("logp", TensorView::new(Dtype::F32, vec![b, k], &a)?),
        ("logp_old", TensorView::new(Dtype::F32, vec![b, k], &o)?),
        ("scores", TensorView::new(Dtype::F32, vec![b, k], &s)?),
    ];
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/rollout.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
