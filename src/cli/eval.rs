//! `tpo eval`: the reference answer for tensors dumped from a trainer.

use super::input::{load, Inputs};
use super::output::{self, Policy};
use super::tensors::{printable, serialize_f64};
use clap::Args;
use std::path::PathBuf;
use tpo::{cpu, Anchor, FitConfig, TargetConfig};

#[derive(Args)]
pub struct EvalArgs {
    /// safetensors file with `logp`, `scores`, optional `logp_old` (all [B, K], or all [N] with
    /// an integer `group_sizes` [B]). Without `logp_old` the call is on-policy (l_old = l).
    pub input: PathBuf,
    /// Target temperature eta (> 0).
    #[arg(long, default_value_t = 1.0, value_parser = super::number, allow_hyphen_values = true)]
    pub eta: f64,
    /// Population std of a group's scores at or below which the group counts as zero-variance
    /// (>= 0): its standardized scores u_i are all set to 0.
    #[arg(long, default_value_t = 1e-6, value_parser = super::number, allow_hyphen_values = true)]
    pub zero_std_threshold: f64,
    /// The paper's no-anchor ablation: q = softmax(u / eta).
    #[arg(long)]
    pub no_anchor: bool,
    /// Write `loss`, `group_loss`, `target` and `grad` (f64) to this safetensors file (missing
    /// folders are created). Never written over INPUT, a directory, a device or a dangling link;
    /// an existing file only with --force; a link to a file writes that file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite the --out file if it exists (never INPUT, and never a read-only file).
    #[arg(long)]
    pub force: bool,
    /// `cuda` also runs the fused GPU kernel on the same inputs and reports its largest
    /// difference from the reference (needs a build with `--features cuda` and a GPU).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The f64 CPU reference only.
    Cpu,
    /// The CUDA kernels, compared with the reference.
    Cuda,
}

pub fn run(a: EvalArgs) -> Result<(), String> {
    let inp = load(&a.input)?;
    let policy = Policy::new(a.force, &[&a.input]);
    if let Some(out) = &a.out {
        // Refused before the work, not after it.
        output::check(out, &policy)?;
    }
    let tcfg = TargetConfig {
        eta: a.eta,
        zero_std_threshold: a.zero_std_threshold,
        anchor: if a.no_anchor { Anchor::NoAnchor } else { Anchor::Anchored },
    };
    let fcfg = FitConfig { diagnostics: true, ..FitConfig::default() };
    let res = cpu::target_and_fit(
        &inp.logp.data,
        inp.logp_old.as_ref().map(|t| t.data.as_slice()),
        &inp.scores.data,
        &inp.layout,
        &tcfg,
        &fcfg,
    )
    .map_err(|e| e.to_string())?;
    let b = inp.layout.num_groups();
    // From the sizes, not the layout's kind: `group_sizes` that are all equal are uniform too.
    let (k_min, k_max) =
        inp.layout.ranges().map(|r| r.len()).fold((usize::MAX, 0), |(lo, hi), k| (lo.min(k), hi.max(k)));
    let shape_kind = if k_min == k_max {
        format!("uniform, K = {k_max}")
    } else {
        format!("ragged, K from {k_min} to {k_max}")
    };
    outln!(
        "tpo eval: {b} groups ({shape_kind}), {} members, logp {:?}, eta = {}, {}, {}",
        inp.layout.len(),
        inp.logp.dtype,
        short(a.eta),
        if a.no_anchor { "no anchor" } else { "anchored" },
        if inp.logp_old.is_some() { "logp_old given" } else { "on-policy (logp_old = logp)" },
    );
    if !inp.unused.is_empty() {
        let n = inp.unused.len();
        outln!(
            "  {n} tensor{} in the file not used: {}",
            if n == 1 { "" } else { "s" },
            inp.unused.iter().map(|t| format!("'{}'", printable(t))).collect::<Vec<_>>().join(", ")
        );
    }
    let st = res.fit.stats.as_ref().expect("diagnostics were requested");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    outln!("  loss (mean cross-entropy)  {:.9}", res.fit.loss);
    outln!("  mean KL(q || p)            {:.6e}", mean(&st.kl_q_p));
    if let Some(k) = &st.kl_q_pold {
        outln!("  mean KL(q || p_old)        {:.6e}", mean(k));
    }
    outln!("  mean H(q)                  {:.6}", mean(&st.entropy_q));
    let gn = res.fit.grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    outln!("  |grad|                     {gn:.6e}");
    if a.backend == Backend::Cuda {
        compare_cuda(&inp, &tcfg, &res)?;
    }
    if let Some(out) = &a.out {
        let shape = inp.logp.shape.clone();
        let bytes = serialize_f64(&[
            ("loss", vec![], &[res.fit.loss]),
            ("group_loss", vec![b], &res.fit.group_loss),
            ("target", shape.clone(), &res.target),
            ("grad", shape, &res.fit.grad),
        ])?;
        output::write(out, &policy, &bytes)?;
        outln!("  wrote {} (loss, group_loss, target, grad as f64)", super::shown(out));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compare_cuda(_: &Inputs, _: &TargetConfig, _: &cpu::TargetAndFit) -> Result<(), String> {
    Err("this tpo was built without CUDA: rebuild with `cargo build --release --features cuda`".into())
}

/// Runs the fused kernel on the inputs (in their own dtype, when it is f32, bf16 or f16; f64
/// inputs are rounded to f32) and prints the largest differences from the reference.
#[cfg(feature = "cuda")]
fn compare_cuda(inp: &Inputs, tcfg: &TargetConfig, want: &cpu::TargetAndFit) -> Result<(), String> {
    use safetensors::Dtype;
    use tpo::cuda::{CudaTpo, DeviceFloat};
    struct Gpu {
        q: Vec<f64>,
        grad: Vec<f64>,
        group_loss: Vec<f64>,
        loss: f64,
        device: String,
    }
    fn run<T: DeviceFloat>(inp: &Inputs, tcfg: &TargetConfig) -> tpo::Result<Gpu> {
        let tpo = CudaTpo::new(0)?;
        let conv = |v: &[f64]| -> Vec<T> { v.iter().map(|&x| T::from_f64(x)).collect() };
        let layout = tpo.layout(&inp.layout)?;
        let l = tpo.to_device(&conv(&inp.logp.data))?;
        let lo = inp.logp_old.as_ref().map(|t| tpo.to_device(&conv(&t.data))).transpose()?;
        let s: Vec<f32> = inp.scores.data.iter().map(|&x| x as f32).collect();
        let s = tpo.to_device(&s)?;
        let mut out = tpo.alloc_fused::<f32>(&layout, false)?;
        tpo.target_and_fit(&l, lo.as_ref(), &s, &layout, tcfg, &FitConfig::default(), &mut out)?;
        tpo.check(&out.fit.status, &layout)?;
        let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        Ok(Gpu {
            q: f(tpo.to_host(&out.q)?),
            grad: f(tpo.to_host(&out.fit.grad)?),
            group_loss: f(tpo.to_host(&out.fit.group_loss)?),
            loss: f64::from(tpo.to_host(&out.fit.loss)?[0]),
            device: tpo.device_name()?,
        })
    }
    let got = match inp.logp.dtype {
        Dtype::BF16 => run::<tpo::bf16>(inp, tcfg),
        Dtype::F16 => run::<tpo::f16>(inp, tcfg),
        _ => run::<f32>(inp, tcfg),
    }
    .map_err(|e| e.to_string())?;
    let maxdiff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    outln!("  cuda ({}): largest |difference| from the reference:", got.device);
    outln!(
        "    loss {:.3e}, group_loss {:.3e}, target {:.3e}, grad {:.3e}",
        (got.loss - want.fit.loss).abs(),
        maxdiff(&got.group_loss, &want.fit.group_loss),
        maxdiff(&got.q, &want.target),
        maxdiff(&got.grad, &want.fit.grad)
    );
    Ok(())
}

/// `x` as Rust prints it in the usual range, in scientific form outside it (`1e-14`, not
/// `0.00000000000001`).
fn short(x: f64) -> String {
    if x == 0.0 || (1e-4..1e6).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}
