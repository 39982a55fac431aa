//! The crate's one error type.

/// Every fallible call in `tpo` returns this error. Each variant's message names the
/// offending input and says what was expected, so it can be shown to a user as is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TpoError {
    /// A layout has no groups at all.
    #[error("the layout has no groups: at least one group is required")]
    NoGroups,
    /// A group of the layout has no members.
    #[error("group {group} is empty: every group needs at least one member")]
    EmptyGroup {
        /// Index of the empty group.
        group: usize,
    },
    /// Offsets of a ragged layout are malformed.
    #[error("invalid offsets: {0}")]
    BadOffsets(String),
    /// An input has a different number of elements than the layout expects.
    #[error("{name} has {got} elements, layout expects {expected}")]
    LengthMismatch {
        /// Name of the input (`logp`, `scores`, ...).
        name: &'static str,
        /// Number of elements given.
        got: usize,
        /// Number of elements the layout expects.
        expected: usize,
    },
    /// An input holds NaN or an infinity where only finite values (or `-inf`, where allowed) may appear.
    #[error("{name}[{index}] is {value}: {allowed}")]
    NonFinite {
        /// Name of the input.
        name: &'static str,
        /// Flat index of the bad element.
        index: usize,
        /// The value found (NaN, inf or -inf).
        value: f64,
        /// What the input may hold.
        allowed: &'static str,
    },
    /// Every member of a group is excluded (`-inf`), so its softmax is undefined.
    #[error("group {group}: every {name} value is -inf, so the group's distribution is undefined")]
    AllExcluded {
        /// Name of the input.
        name: &'static str,
        /// Index of the group.
        group: usize,
    },
    /// The policy assigns probability zero (`logp = -inf`) to a member the target wants.
    #[error("logp[{index}] is -inf but the target gives it q = {q}: the cross-entropy is infinite")]
    InfiniteLoss {
        /// Flat index of the member.
        index: usize,
        /// Target probability of that member.
        q: f64,
    },
    /// A stored target is not a distribution over its group.
    #[error("invalid target: {0}")]
    BadTarget(String),
    /// A configuration value is out of range.
    #[error("{name} must be {requirement}, got {got}")]
    BadConfig {
        /// Name of the parameter.
        name: &'static str,
        /// What it must be.
        requirement: &'static str,
        /// The value given.
        got: f64,
    },
    /// A data error found on the device, named by its flat index.
    #[error("{name}[{index}] is {problem}")]
    DeviceInput {
        /// Name of the input.
        name: &'static str,
        /// Flat index of the first offending element.
        index: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The CUDA backend could not be used (no driver, no GPU, a launch failure, ...).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A loss or gradient of finite inputs is past `f64`'s range.
    #[error("{method}: {place} overflows f64 ({cause})")]
    Overflow {
        /// The call (`fit`, `reinforce`, `ppo`, `grpo`, `dg`).
        method: &'static str,
        /// Where: the first group that overflows, or the reduced loss.
        place: String,
        /// Which term overflows, and what to do about it.
        cause: &'static str,
    },
    /// A loss or gradient of finite inputs computed on the device is past the range of the
    /// kernels' `f32` arithmetic or of the gradient's storage type (the baseline losses on CUDA).
    #[error("{method}: {place} overflows on the GPU ({cause})")]
    DeviceOverflow {
        /// The call (`reinforce`, `ppo`, `grpo`, `dg`).
        method: &'static str,
        /// Where: the first group that overflows, or the reduced loss.
        place: String,
        /// Which term overflows, and what to do about it.
        cause: &'static str,
    },
    /// Sizes whose sum or product does not fit in `usize` (nor, on the device, in `i64`).
    #[error("{0}: too large, the size overflows")]
    SizeOverflow(String),
    /// Reading or writing a tensor file failed.
    #[error("{0}")]
    Io(String),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, TpoError>;
