//! The paper's experiments, driven through this library's loss API.
//!
//! [`tabular`] holds the two tabular bandit experiments (single context, sampled gradients;
//! many contexts, exact population gradients) comparing TPO with PG, DG, GRPO and the CE
//! oracle. They are deterministic for a given seed. [`cartpole`] is CartPole-v1 with
//! Gymnasium's exact dynamics, and `control` (feature `candle`) the neural control experiment on it.
//! `reversal` (feature `candle`) is the token-reversal task with a candle transformer trained
//! through `tpo::candle`, with the `muon` optimiser.

pub mod cartpole;
#[cfg(feature = "candle")]
pub mod control;
#[cfg(feature = "candle")]
pub mod fused;
#[cfg(feature = "candle")]
pub mod muon;
#[cfg(feature = "candle")]
pub mod reversal;
pub mod rng;
pub mod tabular;
