//! # tpo: Target Policy Optimization kernels and reference
//!
//! TPO (Kaddour, arXiv 2604.06159) updates a policy from groups of `K` scored samples. For a
//! group with rollout log-probs `l_old`, current log-probs `l` and scores `s`:
//!
//! * `u = (s - mean(s)) / std(s)` (population deviation; `u = 0` for a zero-variance group),
//! * the target `q = softmax(log_softmax(l_old) + u / eta)`, fixed once built,
//! * the loss `L = -sum_i q_i log softmax(l)_i`, whose gradient is `dL/dl = p - q`.
//!
//! The API is decoupled like the method: [`cpu::target`] builds `q` at rollout, [`cpu::fit`]
//! fits any later epoch to it, and [`cpu::target_and_fit`] does both for the first epoch.
//! Groups are described once by a validated [`GroupLayout`] (uniform or ragged); the
//! configuration types ([`TargetConfig`], [`FitConfig`], [`Reduction`]) and the error type
//! ([`TpoError`]) are shared by every backend.
//!
//! ```
//! use tpo::{cpu, FitConfig, GroupLayout, TargetConfig};
//!
//! // Two prompts, four completions each.
//! let layout = GroupLayout::uniform(2, 4)?;
//! let logp_old = [-3.0f32, -2.5, -4.0, -3.2, -10.0, -11.0, -9.5, -12.0];
//! let scores = [1.0f32, 0.0, 0.0, 1.0, 0.2, 0.9, 0.1, 0.5];
//!
//! let q = cpu::target(&logp_old, &scores, &layout, &TargetConfig::with_eta(1.0))?;
//! // First epoch: l = l_old, so the gradient is p_old - q.
//! let out = cpu::fit(&logp_old, &q, &layout, &FitConfig::default())?;
//! assert_eq!(out.group_loss.len(), 2);
//! assert!(out.grad.iter().sum::<f64>().abs() < 1e-12);
//! # Ok::<(), tpo::TpoError>(())
//! ```
//!
//! [`cpu`] also holds the token-level paths (from logits and from hidden states, [`cpu::tokens`])
//! and the policy-gradient baselines on the same layout ([`cpu::reinforce`], [`cpu::grpo`],
//! [`cpu::dg`]).
//!
//! # The CUDA backend
//!
//! With the feature `cuda`, the `cuda` module runs the same computations on a GPU: fused kernels
//! (compiled to PTX by the build script with nvcc, embedded in the library) for the target, the
//! fit and both at once, in f32 arithmetic on `f32`, `bf16` or `f16` inputs, on one stream,
//! without allocations or host synchronisation in the calls, bit-identical run to run; and the
//! token-level paths, including a fused lm_head (cuBLAS) that never materialises the logits.
//! The driver is loaded when the first device is opened: a machine without one gets an error,
//! not a crash or a link failure (unless the final binary links the driver, as candle's `cuda`
//! feature does).
//!
//! # Features
//!
//! * `cli` (default): the `tpo` command-line tool (`tpo eval`, `tpo reproduce`) and the crates
//!   only it needs (argument parsing, safetensors, JSON, progress bars, figures, its allocator);
//!   it enables `candle`, which `tpo reproduce control` trains through. A library user turns it
//!   off: `tpo = { version = "0.1", default-features = false }`.
//! * `candle`: `tpo::candle`, the losses as candle ops with a backward.
//! * `cuda`: the CUDA backend. Building it needs nvcc (no GPU); it links beside other cudarc
//!   users such as candle-core with its `cuda` feature.
//!
//! # Public API and internal modules
//!
//! The public API is [`cpu`], `cuda`, [`config`], [`layout`], [`error`], [`scalar`] and the
//! re-exports below; it follows semver. Three modules are public only so that the `tpo` binary,
//! the integration tests and the benchmarks (separate crates) can reach them, and are hidden from
//! these docs: `experiments` (the paper's tabular and control experiments behind `tpo reproduce`, and the
//! deterministic generator the tests and benchmarks draw from), `linear_plan` (the fused linear
//! path's schedule, checked on the host by `tests/linear_plan.rs`) and `status` (the decoding of
//! the kernels' error word, checked by the host-emulation tests). They may change in any release.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
#[allow(unsafe_code)]
pub mod cuda;
pub mod error;
#[doc(hidden)]
pub mod experiments;
pub mod layout;
#[doc(hidden)]
pub mod linear_plan;
pub mod scalar;
#[doc(hidden)]
pub mod status;

pub use config::{Anchor, FitConfig, LossForm, Reduction, TargetConfig};
pub use cpu::{FitOutput, GroupStats, TargetAndFit};
pub use error::{Result, TpoError};
pub use half::{bf16, f16};
pub use layout::GroupLayout;
pub use scalar::Scalar;

/// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme_doctests {}
