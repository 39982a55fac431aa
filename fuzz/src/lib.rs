//! Drivers and invariants of the `tpo` fuzz targets (see `fuzz_targets/`). The same modules are
//! compiled into `tests/fuzz_regressions.rs` with `#[path]`, so that a reproducer fails there
//! exactly as it fails here.

pub mod api;
pub mod checks;
pub mod eval_input;

pub mod cli;

/// Panics with the violation `e` (what the fuzz targets do on a broken invariant), unless it
/// contains one of the `|`-separated substrings of the environment variable
/// `TPO_FUZZ_IGNORE`: a triage aid that lets a run look past findings already recorded.
pub fn fail(e: &str, context: &dyn std::fmt::Debug) {
    if let Ok(skip) = std::env::var("TPO_FUZZ_IGNORE") {
        if skip.split('|').any(|s| !s.is_empty() && e.contains(s)) {
            return;
        }
    }
    panic!("{e}\ncase: {context:?}");
}
