//! `tpo eval`: the reference answer for tensors dumped from a trainer.

use super::tensors::{write_f64, FloatTensor, TensorFile};
use clap::Args;
use std::path::PathBuf;
use tpo::{cpu, Anchor, FitConfig, GroupLayout, TargetConfig};

#[derive(Args)]
pub struct EvalArgs {
    /// safetensors file with `logp`, `scores`, optional `logp_old` (all [B, K], or all [N] with
    /// an integer `group_sizes` [B]). Without `logp_old` the call is on-policy (l_old = l).
    pub input: PathBuf,
    /// Target temperature eta (> 0).
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// Population std of a group's scores at or below which the group counts as zero-variance.
    #[arg(long, default_value_t = 1e-6)]
    pub zero_std_threshold: f64,
    /// The paper's no-anchor ablation: q = softmax(u / eta).
    #[arg(long)]
    pub no_anchor: bool,
    /// Write `loss`, `group_loss`, `target` and `grad` (f64) to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The inputs of one evaluation, validated against each other.
pub struct Inputs {
    pub logp: FloatTensor,
    pub logp_old: Option<FloatTensor>,
    pub scores: FloatTensor,
    pub layout: GroupLayout,
}

pub fn load(path: &std::path::Path) -> Result<Inputs, String> {
    let f = TensorFile::open(path)?;
    let need = |name: &str| -> Result<FloatTensor, String> {
        f.float(name)?
            .ok_or_else(|| format!("{} has no tensor '{name}' (it holds: {})", f.path, list(&f.names())))
    };
    let logp = need("logp")?;
    let scores = need("scores")?;
    let logp_old = f.float("logp_old")?;
    let sizes = f.sizes("group_sizes")?;
    let same_shape = |t: &FloatTensor, name: &str| -> Result<(), String> {
        if t.shape != logp.shape {
            Err(format!("'{name}' has shape {:?} but 'logp' has shape {:?}", t.shape, logp.shape))
        } else {
            Ok(())
        }
    };
    same_shape(&scores, "scores")?;
    if let Some(o) = &logp_old {
        same_shape(o, "logp_old")?;
    }
    let layout = match (logp.shape.as_slice(), sizes) {
        ([b, k], None) => GroupLayout::uniform(*b, *k).map_err(|e| format!("logp shape [{b}, {k}]: {e}"))?,
        ([_, _], Some(_)) => {
            return Err("'group_sizes' is given but 'logp' is 2-D: give [B, K] tensors, or [N] \
                        tensors with group_sizes"
                .into())
        }
        ([n], Some(sz)) => {
            if sz.shape.len() != 1 {
                return Err(format!("'group_sizes' must be 1-D [B], got shape {:?}", sz.shape));
            }
            let s = sz.data;
            let total: usize = s.iter().sum();
            if total != *n {
                return Err(format!("group_sizes add up to {total}, but 'logp' has {n} elements"));
            }
            GroupLayout::from_sizes(&s).map_err(|e| format!("group_sizes: {e}"))?
        }
        ([_], None) => return Err("'logp' is 1-D, so an integer tensor 'group_sizes' [B] is required".into()),
        (s, _) => return Err(format!("'logp' must be 2-D [B, K] or 1-D [N], got shape {s:?}")),
    };
    Ok(Inputs { logp, logp_old, scores, layout })
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "no tensors".into()
    } else {
        let mut n = names.to_vec();
        n.sort();
        n.join(", ")
    }
}

pub fn run(a: EvalArgs) -> Result<(), String> {
    let inp = load(&a.input)?;
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
    let shape_kind = match inp.layout.uniform_size() {
        Some(k) => format!("uniform, K = {k}"),
        None => format!("ragged, K up to {}", inp.layout.max_group_size()),
    };
    println!(
        "tpo eval: {b} groups ({shape_kind}), {} members, logp {:?}, eta = {}, {}, {}",
        inp.layout.len(),
        inp.logp.dtype,
        a.eta,
        if a.no_anchor { "no anchor" } else { "anchored" },
        if inp.logp_old.is_some() { "logp_old given" } else { "on-policy (logp_old = logp)" },
    );
    let st = res.fit.stats.as_ref().expect("diagnostics were requested");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("  loss (mean cross-entropy)  {:.9}", res.fit.loss);
    println!("  mean KL(q || p)            {:.6e}", mean(&st.kl_q_p));
    if let Some(k) = &st.kl_q_pold {
        println!("  mean KL(q || p_old)        {:.6e}", mean(k));
    }
    println!("  mean H(q)                  {:.6}", mean(&st.entropy_q));
    let gn = res.fit.grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    println!("  |grad|                     {gn:.6e}");
    if let Some(out) = &a.out {
        let shape = inp.logp.shape.clone();
        write_f64(
            out,
            &[
                ("loss", vec![], &[res.fit.loss]),
                ("group_loss", vec![b], &res.fit.group_loss),
                ("target", shape.clone(), &res.target),
                ("grad", shape, &res.fit.grad),
            ],
        )?;
        println!("  wrote {} (loss, group_loss, target, grad as f64)", out.display());
    }
    Ok(())
}
