//! The error word the CUDA kernels write, and its decoding into a [`TpoError`].
//!
//! A kernel that meets bad data records `((MAX_INDEX - index) << 8) | code` for the offending
//! flat index with an integer `atomicMax`, so the word ends up naming the smallest offending
//! index, whatever the scheduling. The codes are `TpoErrorCode` in `kernels/tpo_common.cuh`.

use crate::error::{Result, TpoError};
use crate::layout::GroupLayout;

/// The largest flat index the status word can carry (kernels/tpo_common.cuh).
pub const MAX_INDEX: u64 = (1 << 55) - 1;

/// Turns a status word into the error it records (see `TpoErrorCode` in kernels/tpo_common.cuh).
pub fn decode_status(word: u64, layout: &GroupLayout) -> Result<()> {
    if word == 0 {
        return Ok(());
    }
    let code = (word & 0xff) as u32;
    let index = (MAX_INDEX - (word >> 8)) as usize;
    let group = || match layout.uniform_size() {
        Some(k) => index / k,
        None => layout.offsets().partition_point(|&o| o <= index).saturating_sub(1),
    };
    let device = |name: &'static str, problem: &'static str| TpoError::DeviceInput { name, index, problem };
    Err(match code {
        1 => device("logp", "NaN or +inf: log-probs must be finite, or -inf to exclude a member"),
        2 => device("logp_old", "NaN or +inf: log-probs must be finite, or -inf to exclude a member"),
        3 => device("scores", "not finite: scores must be finite"),
        4 => TpoError::AllExcluded { name: "logp_old", group: group() },
        5 => TpoError::AllExcluded { name: "logp", group: group() },
        6 => device("logp", "-inf where the target is positive: the cross-entropy is infinite"),
        7 => device("target", "negative or not finite: a target holds probabilities in [0, 1]"),
        8 => TpoError::BadTarget(format!(
            "group {} does not sum to 1 (within 0.01): pass the output of target()",
            group()
        )),
        9 => device("logits", "NaN or +inf: logits must be finite, or -inf to mask a vocabulary entry"),
        10 => device("tokens", "outside the vocabulary"),
        11 => device("logits", "-inf at a sampled token: its log-prob would be -inf"),
        12 => device("logp", "not finite: the baseline losses need finite log-probs"),
        13 => device("logp_old", "not finite: the baseline losses need finite log-probs"),
        14 => device("advantages", "not finite: advantages must be finite"),
        15..=18 => TpoError::DeviceOverflow {
            method: BASELINE_METHODS[(code - 15) as usize],
            place: format!("group {}", group()),
            cause: BASELINE_OVERFLOW_CAUSES[(code - 15) as usize],
        },
        19..=22 => TpoError::DeviceOverflow {
            method: BASELINE_METHODS[(code - 19) as usize],
            place: "the loss reduced over groups".into(),
            cause: "w times the sum of the group losses is past f32's range: reduce grad_scale or rescale the scores",
        },
        other => TpoError::Cuda(format!("unknown device status code {other} at index {index}")),
    })
}

/// The baseline losses by the kernels' method number (kernels/baselines.cu).
const BASELINE_METHODS: [&str; 4] = ["reinforce", "ppo", "grpo", "dg"];

/// What overflows in a group of each baseline loss on the device, by method number.
const BASELINE_OVERFLOW_CAUSES: [&str; 4] = [
    "an advantage, or advantage times log-prob or grad_scale, is past f32's range or the gradient type's: rescale the scores",
    "the ratio exp(logp - logp_old) (past f32's range above a log ratio of 88) times an advantage or grad_scale is past f32's range or the gradient type's",
    "the ratio exp(logp - logp_old) or the KL term exp(logp_old - logp) (past f32's range beyond a log ratio of 88), or a term times beta or grad_scale, is past f32's range or the gradient type's",
    "an advantage, or gate times advantage times log-prob or grad_scale, is past f32's range or the gradient type's: rescale the scores",
];
