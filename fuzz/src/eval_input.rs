//! The `eval_input` fuzz target's driver: the bytes of a safetensors file, read by the very
//! function `tpo eval` calls (`cli::input::load`, compiled from src/cli), then evaluated as
//! `tpo eval` does (`cpu::target_and_fit` with diagnostics, at the CLI's default configuration
//! and with `--no-anchor`), checked by [`crate::checks`].

use crate::checks::{self, Check};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use tpo::{cpu, Anchor, FitConfig, TargetConfig};

/// A file of our own to hand to the reader (`load` takes a path): unique per process and call,
/// so that parallel fuzz jobs and test threads do not share one.
fn scratch_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("tpo-fuzz-eval-{}-{n}.safetensors", std::process::id()))
}

/// Reads `bytes` as `tpo eval` reads its input file and evaluates it; `Err` names the violated
/// invariant (a panic propagates).
pub fn run(bytes: &[u8]) -> Check {
    let path = scratch_path();
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("harness: cannot write {}: {e}", path.display()));
    let loaded = crate::cli::input::load(&path);
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("harness: cannot remove {}: {e}", path.display()));
    let inp = match loaded {
        Ok(i) => i,
        Err(e) => return checks::one_line("tpo eval (reading the file)", &e),
    };
    let l_old = inp.logp_old.as_ref().unwrap_or(&inp.logp).data.clone();
    for anchor in [Anchor::Anchored, Anchor::NoAnchor] {
        let tcfg = TargetConfig { anchor, ..TargetConfig::default() };
        let fcfg = FitConfig { diagnostics: true, ..FitConfig::default() };
        let r = cpu::target_and_fit(
            &inp.logp.data,
            inp.logp_old.as_ref().map(|t| t.data.as_slice()),
            &inp.scores.data,
            &inp.layout,
            &tcfg,
            &fcfg,
        );
        checks::built_target_outcome(&format!("tpo eval ({anchor:?})"), &r, |o| {
            checks::target_and_fit(o, &l_old, &inp.layout, &fcfg)
        })?;
    }
    Ok(())
}
