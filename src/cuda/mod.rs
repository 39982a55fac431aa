//! The CUDA backend (feature `cuda`): the fused TPO kernels behind a safe API.
//!
//! The kernels compute exactly what [`crate::cpu`] computes, in f32 arithmetic, for `f32`,
//! `bf16` or `f16` log-probs (scores and the stored target are `f32`); the gradient is written
//! in any of the three types ([`DeviceFloat`]). One launch per call does the whole group math:
//!
//! * [`CudaTpo::target`]: `q = softmax(log p_old + u / eta)` (plus `H(q)`, `KL(q || p_old)`);
//! * [`CudaTpo::fit`]: loss, per-group loss and `grad = coef * (sum(q) p - q)` against a stored `q`;
//! * [`CudaTpo::target_and_fit`]: both, fused (the first epoch), also writing `q`.
//!
//! A second small launch reduces the per-group losses to the scalar loss on the device, in a fixed
//! order. Nothing in these calls allocates or synchronises with the host: outputs are
//! preallocated ([`CudaTpo::alloc_target`] and friends), everything is ordered on one stream
//! ([`CudaTpo::stream`]) and can be captured in a CUDA graph. Results are bit-identical run to
//! run (fixed-order reductions, no float atomics).
//!
//! Data errors found on the device (NaN, `+inf`, a group all `-inf`, an infinite loss, an
//! invalid stored target) are recorded in the output's [`DeviceStatus`] and the affected groups'
//! outputs are NaN; [`CudaTpo::check`] (which synchronises) turns the status into a [`TpoError`]
//! naming the first offending element. Shape and configuration errors are returned at once.
//!
//! Groups of up to 256 members are processed a warp per group (8 groups per block); larger
//! groups a block of 512 threads per group. Groups may hold at most 2^24 members.

use crate::config::{Anchor, FitConfig, LossForm, TargetConfig};
use crate::cpu::GroupStats;
use crate::error::{Result, TpoError};
use crate::layout::GroupLayout;
use crate::scalar::Scalar;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::{bf16, f16};
use std::sync::Arc;

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
mod baselines;
mod borrow;
mod linear;
mod tokens;
pub use baselines::BaselineLoss;
pub use borrow::{Borrowed, Window};
pub use linear::{FusedLinear, LinearOutputs, GEMM_TILE};
pub use tokens::{DeviceSequenceBatch, DeviceTarget, LogitsPathBuffers, PathAlloc, TokenBuffers};

/// The architectures of the embedded kernels (`TPO_CUDA_ARCH` at build time): a fatbin with SASS
/// for each listed architecture and PTX for the newest, which newer GPUs JIT-compile, e.g.
/// `"sm_80,sm_90 + compute_90"`.
pub const PTX_ARCH: &str = kernels::ARCH;

/// The embedded fatbin of one kernel source file.
fn fatbin(stem: &str) -> &'static [u8] {
    kernels::FATBIN.iter().find(|(n, _)| *n == stem).map(|(_, b)| *b).expect("every kernels/*.cu is embedded")
}

/// Loads one embedded fatbin, with a clear error when the driver can run none of its images.
fn load_fatbin(ctx: &Arc<CudaContext>, stem: &str) -> Result<Arc<cudarc::driver::CudaModule>> {
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin(stem).to_vec())).map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION | sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => {
            TpoError::Cuda(format!(
                "the driver cannot load the kernels of {stem}.cu ({PTX_ARCH}): this GPU has no embedded SASS \
                 and its driver is older than the CUDA toolkit that built the PTX; rebuild with the GPU's \
                 architecture in TPO_CUDA_ARCH, or with an nvcc no newer than the driver's CUDA version \
                 (scripts/install-nvcc.sh pins 13.0), or update the driver ({e:?})"
            ))
        }
        _ => cuda_err(&format!("cannot load the kernels of {stem}.cu"), e),
    })
}

/// Largest group handled a warp per group; larger groups get a block each.
pub const WARP_MAX_GROUP: usize = 256;
/// Largest group size the kernels accept (block-level counts are exact in f32 up to 2^24).
pub const MAX_GROUP: usize = 1 << 24;
const WARP_THREADS: u32 = 256;
const BLOCK_THREADS: u32 = 512;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A storage type the kernels read log-probs in and write gradients in: `f32`, `bf16`, `f16`.
pub trait DeviceFloat: Scalar + DeviceRepr + ValidAsZeroBits + Default + sealed::Sealed {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
}
impl DeviceFloat for f32 {
    const SUFFIX: &'static str = "f32";
}
impl DeviceFloat for bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl DeviceFloat for f16 {
    const SUFFIX: &'static str = "f16";
}

/// Kernel parameters; must match `struct TpoParams` in `kernels/tpo.cu` field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    logp: u64,
    logp_old: u64,
    scores: u64,
    q_in: u64,
    offsets: u64,
    q_out: u64,
    grad: u64,
    group_loss: u64,
    stats: u64,
    status: u64,
    num_groups: i64,
    k: i64,
    /// `1 / eta = inv_eta 2^inv_eta_exp` (see [`inv_eta_parts`]).
    inv_eta: f32,
    zero_std_threshold: f32,
    grad_coef: f32,
    anchored: i32,
    loss_kl: i32,
    inv_eta_exp: i32,
    group_ids: u64,
    num_items: i64,
}

/// `1 / eta` as `(m, e)` with `1 / eta = m 2^e` and `m` in `(1, 2]` (rounded to f32): from
/// `eta = f 2^k`, `f` in `[1/2, 1)`, `m = 1 / f` and `e = -k`. Exact to f32 rounding of `m` for every
/// finite `eta > 0`, where `(1 / eta) as f32` overflows below `eta ~ 2.9e-39` (and `1 / eta` itself
/// overflows f64 for a subnormal `eta`) and loses digits above `eta ~ 8.5e37`.
fn inv_eta_parts(eta: f64) -> (f32, i32) {
    let k = crate::cpu::binary_exponent(eta);
    ((1.0 / crate::cpu::ldexp(eta, -k)) as f32, -k)
}

// SAFETY: `Params` is `repr(C)`, `Copy`, holds only plain integers and floats (device addresses
// as u64), and its layout matches the C struct the kernels take by value.
unsafe impl DeviceRepr for Params {}

/// Kernel parameters of a group-per-warp/block launch: [`CudaTpo::launch_group`] sets the work
/// list of each size class.
trait GroupParams: DeviceRepr + Copy {
    /// These parameters with the launch's work list: `num_items` groups, listed at `group_ids`
    /// (0: groups `0..num_items`).
    fn with_items(self, group_ids: u64, num_items: i64) -> Self;
}

impl GroupParams for Params {
    fn with_items(self, group_ids: u64, num_items: i64) -> Self {
        Self { group_ids, num_items, ..self }
    }
}

/// A layout uploaded to the device once (ragged offsets as `i64`), reused by every call.
///
/// Its groups are sorted once, at upload, into the kernels' two size classes: groups of at most
/// [`WARP_MAX_GROUP`] members take the warp path, larger ones the block path. A call launches
/// each non-empty class on its own path (a mixed layout gets two launches on the stream, each
/// over the list of its groups' indices, uploaded here), so a group's path, and hence its exact
/// bits, depends only on its own size, and no call scans the offsets on the host.
#[derive(Debug)]
pub struct DeviceLayout {
    host: GroupLayout,
    offsets: Option<CudaSlice<i64>>,
    classes: Vec<SizeClass>,
}

/// The groups of one size class: all of the layout's (`ids` is `None`) or the listed ones.
#[derive(Debug)]
struct SizeClass {
    path: GroupPath,
    count: usize,
    ids: Option<CudaSlice<i64>>,
}

/// Which kernel path a group takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupPath {
    /// A warp per group.
    Warp,
    /// A block per group.
    Block,
}

impl GroupPath {
    /// The path a group of `size` members takes.
    pub(crate) fn of(size: usize) -> Self {
        if size <= WARP_MAX_GROUP {
            Self::Warp
        } else {
            Self::Block
        }
    }
}

/// The size classes of a layout: for each path that has groups, in the order warp then block,
/// `None` when the class holds every group, else the ascending indices of its groups.
pub(crate) fn size_classes(layout: &GroupLayout) -> Vec<(GroupPath, Option<Vec<i64>>)> {
    if let Some(k) = layout.uniform_size() {
        return vec![(GroupPath::of(k), None)];
    }
    let (mut warp, mut block) = (Vec::new(), Vec::new());
    for (g, w) in layout.offsets().windows(2).enumerate() {
        match GroupPath::of(w[1] - w[0]) {
            GroupPath::Warp => warp.push(g as i64),
            GroupPath::Block => block.push(g as i64),
        }
    }
    match (warp.is_empty(), block.is_empty()) {
        (_, true) => vec![(GroupPath::Warp, None)],
        (true, false) => vec![(GroupPath::Block, None)],
        (false, false) => vec![(GroupPath::Warp, Some(warp)), (GroupPath::Block, Some(block))],
    }
}

impl DeviceLayout {
    /// The host-side layout.
    pub fn layout(&self) -> &GroupLayout {
        &self.host
    }
}

/// The device-side error word of one call (see [`CudaTpo::check`]).
#[derive(Debug)]
pub struct DeviceStatus(CudaSlice<u64>);

/// Outputs of [`CudaTpo::target`].
#[derive(Debug)]
pub struct TargetBuffers {
    /// The target `q`, one `f32` per member.
    pub q: CudaSlice<f32>,
    /// Per-group diagnostics, when allocated: rows of `B` floats, `[H(q), KL(q || p_old)]`.
    pub stats: Option<CudaSlice<f32>>,
    /// The call's error word.
    pub status: DeviceStatus,
}

/// Outputs of [`CudaTpo::fit`] (and the fit part of [`CudaTpo::target_and_fit`]).
#[derive(Debug)]
pub struct FitBuffers<G: DeviceFloat> {
    /// `d(grad_scale * loss) / d l`, one `G` per member.
    pub grad: CudaSlice<G>,
    /// Unreduced per-group loss `L_g`.
    pub group_loss: CudaSlice<f32>,
    /// The scalar loss `w * sum_g L_g` (one element), reduced on the device.
    pub loss: CudaSlice<f32>,
    /// Per-group diagnostics, when allocated: rows of `B` floats, `[KL(q || p), H(q), |grad|]`
    /// from `fit`, `[KL(q || p), H(q), KL(q || p_old), |grad|]` from `target_and_fit`.
    pub stats: Option<CudaSlice<f32>>,
    /// The call's error word.
    pub status: DeviceStatus,
}

/// Outputs of [`CudaTpo::target_and_fit`].
#[derive(Debug)]
pub struct FusedBuffers<G: DeviceFloat> {
    /// The target `q`, to keep for later epochs.
    pub q: CudaSlice<f32>,
    /// Loss, per-group loss, gradient, diagnostics and error word.
    pub fit: FitBuffers<G>,
}

/// A kernel's name in parts, `tpo_{kind}[_{path}][_{t}][_{g}]` with empty parts left out, so that
/// a launch finds its kernel from static strings without building the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    kind: &'static str,
    path: &'static str,
    t: &'static str,
    g: &'static str,
}

impl KernelKey {
    pub(crate) const fn new(
        kind: &'static str,
        path: &'static str,
        t: &'static str,
        g: &'static str,
    ) -> Self {
        Self { kind, path, t, g }
    }

    fn name(&self) -> String {
        ["tpo", self.kind, self.path, self.t, self.g]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("_")
    }
}

/// The CUDA backend: a context, a stream and the loaded kernels.
pub struct CudaTpo {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: std::collections::HashMap<KernelKey, CudaFunction>,
    reduce: CudaFunction,
    sm_count: u32,
    /// Whether NVTX ranges are emitted (feature `nvtx` and libnvToolsExt loadable).
    nvtx: bool,
}

impl std::fmt::Debug for CudaTpo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTpo")
            .field("device", &self.ctx.ordinal())
            .field("sm_count", &self.sm_count)
            .field("nvtx", &self.nvtx)
            .finish()
    }
}

fn cuda_err(what: &str, e: DriverError) -> TpoError {
    TpoError::Cuda(format!("{what}: {e:?}"))
}

impl CudaTpo {
    /// Opens GPU `ordinal` on a new stream of its primary context and loads the kernels.
    ///
    /// Errors clearly when the machine has no NVIDIA driver, no GPU, or a driver too old for
    /// the embedded PTX. The context's cross-stream event tracking is turned off: every buffer
    /// passed to this backend must be used on [`stream`](Self::stream) (or synchronised with it).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !library_present(&["cuda", "nvcuda"]) {
            return Err(TpoError::Cuda(
                "no NVIDIA driver found (libcuda.so could not be loaded): this machine cannot run the \
                 CUDA backend; use the CPU reference instead"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| cuda_err("cannot query CUDA devices", e))?;
        if count <= 0 {
            return Err(TpoError::Cuda("the NVIDIA driver reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(TpoError::Cuda(format!("GPU {ordinal} requested but only {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cannot open the GPU", e))?;
        // SAFETY: all our launches and copies are ordered on one stream, so the per-buffer events
        // cudarc would record for cross-stream ordering are not needed; turning them off removes
        // an event record per buffer per launch from the hot path.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_err("cannot create a stream", e))?;
        Self::with_stream(stream)
    }

    /// Uses a caller-given stream (and its context). All calls are ordered on it. If the
    /// context tracks events across streams (cudarc's default), this backend does not record its
    /// launches in that tracking: order other streams against this one yourself.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let module = load_fatbin(&ctx, "tpo")?;
        let reduce = module.load_function("tpo_reduce_loss").map_err(|e| cuda_err("missing kernel", e))?;
        // Look every entry point up once, so launches do no name lookups.
        let mut kernels = std::collections::HashMap::new();
        let tok_module = load_fatbin(&ctx, "tokens")?;
        let types = ["f32", "bf16", "f16"];
        let mut group_keys = Vec::new();
        for path in ["warp", "block"] {
            for t in types {
                group_keys.push(KernelKey::new("target", path, t, ""));
                for g in types {
                    group_keys.push(KernelKey::new("fit", path, t, g));
                    group_keys.push(KernelKey::new("fused", path, t, g));
                }
            }
        }
        let bl_module = load_fatbin(&ctx, "baselines")?;
        for (m, keys) in [
            (&tok_module, tokens::KERNEL_KEYS.to_vec()),
            (&module, group_keys),
            (&bl_module, baselines::kernel_keys()),
        ] {
            for key in keys {
                let n = key.name();
                let f = m.load_function(&n).map_err(|e| cuda_err(&format!("missing kernel {n}"), e))?;
                kernels.insert(key, f);
            }
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("cannot query the GPU", e))? as u32;
        // Without libnvToolsExt (or the `nvtx` feature) no range is emitted.
        let nvtx = cfg!(feature = "nvtx") && library_present(&["nvToolsExt"]);
        Ok(Self { ctx, stream, kernels, reduce, sm_count, nvtx })
    }

    /// The stream every call is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name.
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_err("cannot query the GPU name", e))
    }

    /// Copies a host slice to a new device buffer (asynchronous on the stream).
    pub fn to_device<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| cuda_err("host-to-device copy", e))
    }

    /// Copies host data into an existing device buffer of the same length.
    pub fn copy_to_device<T: DeviceRepr>(&self, host: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if host.len() != dst.len() {
            return Err(TpoError::LengthMismatch { name: "host data", got: host.len(), expected: dst.len() });
        }
        self.stream.memcpy_htod(host, dst).map_err(|e| cuda_err("host-to-device copy", e))
    }

    /// Copies a device buffer to the host (synchronises the stream).
    ///
    /// The copy is queued on the stream and then waited for explicitly: a device-to-host copy
    /// into pageable memory happens to return only once done on today's drivers, but that is
    /// not a documented guarantee, and the returned vector must hold the data.
    pub fn to_host<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(dev).map_err(|e| cuda_err("device-to-host copy", e))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("stream synchronisation", e))
    }

    /// Uploads a layout once.
    pub fn layout(&self, layout: &GroupLayout) -> Result<DeviceLayout> {
        let max = layout.max_group_size();
        if max > MAX_GROUP {
            return Err(TpoError::BadOffsets(format!(
                "a group of {max} members exceeds the CUDA kernels' limit of {MAX_GROUP}"
            )));
        }
        // The kernels index with i64: every offset, hence the total, must fit.
        i64::try_from(layout.len()).map_err(|_| {
            TpoError::SizeOverflow(format!("{} members (the kernels index with i64)", layout.len()))
        })?;
        let offsets = match layout.uniform_size() {
            Some(_) => None,
            None => Some(self.to_device(&layout.offsets().iter().map(|&o| o as i64).collect::<Vec<_>>())?),
        };
        let mut classes = Vec::new();
        for (path, ids) in size_classes(layout) {
            let count = ids.as_ref().map_or(layout.num_groups(), Vec::len);
            let ids = ids.map(|v| self.to_device(&v)).transpose()?;
            classes.push(SizeClass { path, count, ids });
        }
        Ok(DeviceLayout { host: layout.clone(), offsets, classes })
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(|e| cuda_err("device allocation", e))
    }

    fn status(&self) -> Result<DeviceStatus> {
        Ok(DeviceStatus(self.zeros(1)?))
    }

    /// Allocates the outputs of [`target`](Self::target), once.
    pub fn alloc_target(&self, layout: &DeviceLayout, stats: bool) -> Result<TargetBuffers> {
        let b = layout.host.num_groups();
        Ok(TargetBuffers {
            q: self.zeros(layout.host.len())?,
            stats: if stats { Some(self.zeros(2 * b)?) } else { None },
            status: self.status()?,
        })
    }

    /// Allocates the outputs of [`fit`](Self::fit), once.
    pub fn alloc_fit<G: DeviceFloat>(&self, layout: &DeviceLayout, stats: bool) -> Result<FitBuffers<G>> {
        self.alloc_fit_rows(layout, if stats { 3 } else { 0 })
    }

    /// Allocates the outputs of [`target_and_fit`](Self::target_and_fit), once.
    pub fn alloc_fused<G: DeviceFloat>(&self, layout: &DeviceLayout, stats: bool) -> Result<FusedBuffers<G>> {
        Ok(FusedBuffers {
            q: self.zeros(layout.host.len())?,
            fit: self.alloc_fit_rows(layout, if stats { 4 } else { 0 })?,
        })
    }

    fn alloc_fit_rows<G: DeviceFloat>(&self, layout: &DeviceLayout, rows: usize) -> Result<FitBuffers<G>> {
        let b = layout.host.num_groups();
        Ok(FitBuffers {
            grad: self.zeros(layout.host.len())?,
            group_loss: self.zeros(b)?,
            loss: self.zeros(1)?,
            stats: if rows > 0 { Some(self.zeros(rows * b)?) } else { None },
            status: self.status()?,
        })
    }

    /// Builds the target `q` on the device (see [`crate::cpu::target`]).
    pub fn target<T: DeviceFloat>(
        &self,
        logp_old: &CudaSlice<T>,
        scores: &CudaSlice<f32>,
        layout: &DeviceLayout,
        cfg: &TargetConfig,
        out: &mut TargetBuffers,
    ) -> Result<()> {
        cfg.validate()?;
        let l = &layout.host;
        l.check_len("logp_old", logp_old.len())?;
        l.check_len("scores", scores.len())?;
        l.check_len("target output", out.q.len())?;
        check_rows(out.stats.as_ref(), 2, l.num_groups())?;
        let _range = self.range("tpo::target");
        self.reset(&mut out.status)?;
        let s = &self.stream;
        let (p_old, _a) = logp_old.device_ptr(s);
        let (p_s, _b) = scores.device_ptr(s);
        let (p_q, _c) = out.q.device_ptr_mut(s);
        let (p_st, _d) = opt_ptr_mut(out.stats.as_mut(), s);
        let (p_status, _e) = out.status.0.device_ptr_mut(s);
        let (p_off, _f) = opt_ptr(layout.offsets.as_ref(), s);
        let params = Params {
            logp: 0,
            logp_old: p_old,
            scores: p_s,
            q_in: 0,
            offsets: p_off,
            q_out: p_q,
            grad: 0,
            group_loss: 0,
            stats: p_st,
            status: p_status,
            num_groups: l.num_groups() as i64,
            k: l.uniform_size().unwrap_or(0) as i64,
            inv_eta: inv_eta_parts(cfg.eta).0,
            zero_std_threshold: cfg.zero_std_threshold as f32,
            grad_coef: 0.0,
            anchored: i32::from(cfg.anchor == Anchor::Anchored),
            loss_kl: 0,
            inv_eta_exp: inv_eta_parts(cfg.eta).1,
            group_ids: 0,
            num_items: 0,
        };
        self.launch_group("target", T::SUFFIX, None, layout, params)
    }

    /// Fits `logp` to a stored target `q` on the device (see [`crate::cpu::fit`]); also reduces
    /// the scalar loss into `out.loss`.
    pub fn fit<T: DeviceFloat, G: DeviceFloat>(
        &self,
        logp: &CudaSlice<T>,
        q: &CudaSlice<f32>,
        layout: &DeviceLayout,
        cfg: &FitConfig,
        out: &mut FitBuffers<G>,
    ) -> Result<()> {
        let l = &layout.host;
        let w = cfg.validate(l.num_groups())?;
        l.check_len("logp", logp.len())?;
        l.check_len("target", q.len())?;
        self.check_fit_outputs(out, l, cfg, 3)?;
        let _range = self.range("tpo::fit");
        self.reset(&mut out.status)?;
        let s = &self.stream;
        let (p_l, _a) = logp.device_ptr(s);
        let (p_q, _b) = q.device_ptr(s);
        let (p_off, _f) = opt_ptr(layout.offsets.as_ref(), s);
        let params = Params { logp: p_l, q_in: p_q, offsets: p_off, ..self.fit_params(l, cfg, w, out) };
        self.launch_group("fit", T::SUFFIX, Some(G::SUFFIX), layout, params)?;
        self.reduce_loss(&out.group_loss, w, &mut out.loss)
    }

    /// The fused first-epoch call (see [`crate::cpu::target_and_fit`]): builds `q` from
    /// `logp_old` (or from `logp` when `None`: on-policy) and fits `logp` to it in one launch,
    /// writing `q`, the gradient, the losses and (when allocated) the diagnostics.
    #[allow(clippy::too_many_arguments)]
    pub fn target_and_fit<T: DeviceFloat, G: DeviceFloat>(
        &self,
        logp: &CudaSlice<T>,
        logp_old: Option<&CudaSlice<T>>,
        scores: &CudaSlice<f32>,
        layout: &DeviceLayout,
        tcfg: &TargetConfig,
        fcfg: &FitConfig,
        out: &mut FusedBuffers<G>,
    ) -> Result<()> {
        tcfg.validate()?;
        let l = &layout.host;
        let w = fcfg.validate(l.num_groups())?;
        l.check_len("logp", logp.len())?;
        if let Some(o) = logp_old {
            l.check_len("logp_old", o.len())?;
        }
        l.check_len("scores", scores.len())?;
        l.check_len("target output", out.q.len())?;
        self.check_fit_outputs(&out.fit, l, fcfg, 4)?;
        let _range = self.range("tpo::target_and_fit");
        self.reset(&mut out.fit.status)?;
        let s = &self.stream;
        let (p_l, _a) = logp.device_ptr(s);
        let (p_old, _b) = opt_ptr(logp_old, s);
        let (p_s, _c) = scores.device_ptr(s);
        let (p_q, _d) = out.q.device_ptr_mut(s);
        let (p_off, _f) = opt_ptr(layout.offsets.as_ref(), s);
        let params = Params {
            logp: p_l,
            logp_old: p_old,
            scores: p_s,
            q_out: p_q,
            offsets: p_off,
            inv_eta: inv_eta_parts(tcfg.eta).0,
            inv_eta_exp: inv_eta_parts(tcfg.eta).1,
            zero_std_threshold: tcfg.zero_std_threshold as f32,
            anchored: i32::from(tcfg.anchor == Anchor::Anchored),
            ..self.fit_params(l, fcfg, w, &mut out.fit)
        };
        self.launch_group("fused", T::SUFFIX, Some(G::SUFFIX), layout, params)?;
        self.reduce_loss(&out.fit.group_loss, w, &mut out.fit.loss)
    }

    /// Synchronises the stream, reads a call's error word and returns the first data error it
    /// recorded (the smallest offending flat index), or `Ok(())`.
    pub fn check(&self, status: &DeviceStatus, layout: &DeviceLayout) -> Result<()> {
        let word = self.to_host(&status.0)?[0];
        crate::status::decode_status(word, &layout.host)
    }

    /// Downloads diagnostics written by [`fit`](Self::fit) or [`target_and_fit`](Self::target_and_fit)
    /// into the CPU reference's [`GroupStats`] (synchronises).
    pub fn stats_to_host<G: DeviceFloat>(
        &self,
        out: &FitBuffers<G>,
        layout: &DeviceLayout,
    ) -> Result<Option<GroupStats>> {
        let Some(st) = out.stats.as_ref() else { return Ok(None) };
        let b = layout.host.num_groups();
        let v: Vec<f64> = self.to_host(st)?.into_iter().map(f64::from).collect();
        let row = |i: usize| v[i * b..(i + 1) * b].to_vec();
        Ok(Some(if v.len() == 4 * b {
            GroupStats { kl_q_p: row(0), entropy_q: row(1), kl_q_pold: Some(row(2)), grad_norm: row(3) }
        } else {
            GroupStats { kl_q_p: row(0), entropy_q: row(1), kl_q_pold: None, grad_norm: row(2) }
        }))
    }

    fn fit_params<G: DeviceFloat>(
        &self,
        l: &GroupLayout,
        cfg: &FitConfig,
        w: f64,
        out: &mut FitBuffers<G>,
    ) -> Params {
        let s = &self.stream;
        // Raw addresses only; the buffers outlive the launch that follows on the same stream.
        let (p_g, _a) = out.grad.device_ptr_mut(s);
        let (p_gl, _b) = out.group_loss.device_ptr_mut(s);
        let (p_st, _c) = opt_ptr_mut(out.stats.as_mut(), s);
        let (p_status, _d) = out.status.0.device_ptr_mut(s);
        Params {
            logp: 0,
            logp_old: 0,
            scores: 0,
            q_in: 0,
            offsets: 0,
            q_out: 0,
            grad: p_g,
            group_loss: p_gl,
            stats: p_st,
            status: p_status,
            num_groups: l.num_groups() as i64,
            k: l.uniform_size().unwrap_or(0) as i64,
            inv_eta: 1.0,
            zero_std_threshold: 0.0,
            grad_coef: (cfg.grad_scale * w) as f32,
            anchored: 1,
            loss_kl: i32::from(cfg.form == LossForm::Kl),
            inv_eta_exp: 0,
            group_ids: 0,
            num_items: 0,
        }
    }

    fn check_fit_outputs<G: DeviceFloat>(
        &self,
        out: &FitBuffers<G>,
        l: &GroupLayout,
        cfg: &FitConfig,
        rows: usize,
    ) -> Result<()> {
        l.check_len("gradient output", out.grad.len())?;
        if out.group_loss.len() != l.num_groups() {
            return Err(TpoError::LengthMismatch {
                name: "group_loss output",
                got: out.group_loss.len(),
                expected: l.num_groups(),
            });
        }
        if cfg.diagnostics && out.stats.is_none() {
            return Err(TpoError::BadConfig {
                name: "diagnostics (outputs allocated without stats)",
                requirement: "allocated with stats = true",
                got: 0.0,
            });
        }
        check_rows(out.stats.as_ref(), rows, l.num_groups())
    }

    #[cfg(feature = "nvtx")]
    fn range(&self, name: &str) -> Option<cudarc::nvtx::Range> {
        self.nvtx.then(|| cudarc::nvtx::scoped_range(name))
    }

    #[cfg(not(feature = "nvtx"))]
    fn range(&self, _name: &str) -> Option<()> {
        None
    }

    fn reset(&self, status: &mut DeviceStatus) -> Result<()> {
        self.stream.memset_zeros(&mut status.0).map_err(|e| cuda_err("clearing the status word", e))
    }

    fn kernel(&self, key: KernelKey) -> Result<&CudaFunction> {
        self.kernels.get(&key).ok_or_else(|| TpoError::Cuda(format!("missing kernel {}", key.name())))
    }

    fn launch_group<P: GroupParams>(
        &self,
        kind: &'static str,
        t: &'static str,
        g: Option<&'static str>,
        layout: &DeviceLayout,
        params: P,
    ) -> Result<()> {
        for class in &layout.classes {
            let n = class.count as u64;
            let (path, threads, grid) = match class.path {
                GroupPath::Warp => {
                    let groups_per_block = u64::from(WARP_THREADS / 32);
                    ("warp", WARP_THREADS, n.div_ceil(groups_per_block).min(u64::from(self.sm_count) * 32))
                }
                GroupPath::Block => ("block", BLOCK_THREADS, n.min(u64::from(self.sm_count) * 4)),
            };
            let key = KernelKey::new(kind, path, t, g.unwrap_or(""));
            let f = self.kernel(key)?;
            let (p_ids, _ids) = opt_ptr(class.ids.as_ref(), &self.stream);
            let params = params.with_items(p_ids, class.count as i64);
            let cfg = LaunchConfig {
                grid_dim: (grid.max(1) as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = self.stream.launch_builder(f);
            builder.arg(&params);
            // SAFETY: every address in `params` belongs to a live buffer whose length was checked
            // against the layout above (per-member buffers hold `layout.len()` elements, per-group
            // ones `num_groups` or `rows * num_groups`, offsets `num_groups + 1`, the class's group
            // ids `num_items` indices below `num_groups`, made at upload); the kernel reads and
            // writes only within those bounds, and all buffers are ordered on this stream.
            unsafe { builder.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {}", key.name()), e))?;
        }
        Ok(())
    }

    fn reduce_loss(&self, group_loss: &CudaSlice<f32>, w: f64, loss: &mut CudaSlice<f32>) -> Result<()> {
        let n = group_loss.len() as i64;
        let mut builder = self.stream.launch_builder(&self.reduce);
        builder.arg(group_loss).arg(&n).arg(&w).arg(loss);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel reads `n` = group_loss.len() floats and writes one float to `loss`
        // (allocated with at least one element); a single block of 1024 threads as it expects.
        unsafe { builder.launch(cfg) }.map_err(|e| cuda_err("launching tpo_reduce_loss", e))?;
        Ok(())
    }
}

/// The `(address, guard)` of an optional buffer, 0 when absent.
fn opt_ptr<'a, T>(
    s: Option<&'a CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

fn opt_ptr_mut<'a, T>(
    s: Option<&'a mut CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

fn check_rows(stats: Option<&CudaSlice<f32>>, rows: usize, b: usize) -> Result<()> {
    match stats {
        Some(s) if s.len() != rows * b => {
            Err(TpoError::LengthMismatch { name: "stats output", got: s.len(), expected: rows * b })
        }
        _ => Ok(()),
    }
}

/// The names under which cudarc looks for CUDA library `lib` when it loads it at run time
/// (cudarc 0.19's `get_lib_name_candidates`, for the CUDA version it was built for). That function
/// exists only when cudarc loads libraries itself, not when the final binary links them (its
/// `dynamic-linking`, which candle's `cuda` feature asks for), so tpo, which must build either
/// way, rebuilds the list.
fn lib_candidates(lib: &str) -> Vec<String> {
    use std::env::consts::{DLL_PREFIX as P, DLL_SUFFIX as S};
    let w = usize::BITS;
    let (major, minor) = (sys::CUDA_VERSION / 1000, sys::CUDA_VERSION % 1000 / 10);
    vec![
        format!("{P}{lib}{S}"),
        format!("{P}{lib}{w}{S}"),
        format!("{P}{lib}{w}_{major}{S}"),
        format!("{P}{lib}{w}_{major}{minor}{S}"),
        format!("{P}{lib}{w}_{major}{minor}_0{S}"),
        format!("{P}{lib}{w}_{major}0_{minor}{S}"),
        format!("{P}{lib}{w}_10{S}"),
        format!("{P}{lib}{w}_11{S}"),
        format!("{P}{lib}{w}_12{S}"),
        format!("{P}{lib}{w}_{major}0_0{S}"),
        format!("{P}{lib}{w}_9{S}"),
        format!("{P}{lib}{S}.{major}"),
        format!("{P}{lib}{S}.12"),
        format!("{P}{lib}{S}.11"),
        format!("{P}{lib}{S}.10"),
        format!("{P}{lib}{S}.9"),
        format!("{P}{lib}{S}.1"),
    ]
}

/// Whether one of the CUDA libraries `libs` can be loaded under a name cudarc would load it by,
/// so that cudarc's first call into it finds it instead of panicking. When the binary links the
/// library, it is already loaded and this is true.
fn library_present(libs: &[&str]) -> bool {
    libs.iter().flat_map(|l| lib_candidates(l)).any(|name| {
        // SAFETY: loading a shared library runs its initialisers; these are the CUDA libraries'
        // own, which cudarc would load on its first call anyway. No symbol is called, and the
        // handle is dropped (the library stays loaded while cudarc holds its own handle).
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// [`TpoBackend`](crate::experiments::tabular::TpoBackend) for the tabular experiments on the GPU:
/// each call uploads the logits (as f32), runs [`CudaTpo::target_and_fit`] on-policy with the sum
/// reduction, checks the status and downloads the gradient. Internal, like `experiments` (used by
/// `tpo reproduce --backend cuda` and the GPU suite).
#[doc(hidden)]
pub struct TabularCudaBackend {
    tpo: std::sync::Mutex<CudaTpo>,
}

impl TabularCudaBackend {
    /// Opens GPU 0.
    pub fn new() -> Result<Self> {
        Ok(Self { tpo: std::sync::Mutex::new(CudaTpo::new(0)?) })
    }
}

impl crate::experiments::tabular::TpoBackend for TabularCudaBackend {
    fn on_policy_grad(
        &self,
        logits: &[f64],
        scores: &[f64],
        layout: &GroupLayout,
        eta: f64,
    ) -> Result<Vec<f64>> {
        let tpo = self.tpo.lock().map_err(|_| TpoError::Cuda("a previous GPU call panicked".into()))?;
        let dl = tpo.layout(layout)?;
        let l: Vec<f32> = logits.iter().map(|&x| x as f32).collect();
        let s: Vec<f32> = scores.iter().map(|&x| x as f32).collect();
        let (l, s) = (tpo.to_device(&l)?, tpo.to_device(&s)?);
        let mut out = tpo.alloc_fused::<f32>(&dl, false)?;
        let fit = FitConfig { reduction: crate::Reduction::Sum, ..FitConfig::default() };
        tpo.target_and_fit(&l, None, &s, &dl, &TargetConfig::with_eta(eta), &fit, &mut out)?;
        tpo.check(&out.fit.status, &dl)?;
        Ok(tpo.to_host(&out.fit.grad)?.into_iter().map(f64::from).collect())
    }
    fn name(&self) -> &'static str {
        "cuda"
    }
}

/// The fewest bytes [`CudaTpo::target_and_fit`] must move through device memory: each input read
/// once (`logp`, `logp_old` unless on-policy, `scores`), each output written once (`q`, the
/// gradient, the per-group loss). Used for the effective-bandwidth figures of the benchmarks.
pub fn fused_bytes(layout: &GroupLayout, input_bytes: usize, grad_bytes: usize, with_old: bool) -> u64 {
    let n = layout.len() as u64;
    let per_member = input_bytes as u64 * if with_old { 2 } else { 1 } + 4 + 4 + grad_bytes as u64;
    n * per_member + 4 * layout.num_groups() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(sizes: &[usize]) -> Vec<(GroupPath, Option<Vec<i64>>)> {
        size_classes(&GroupLayout::from_sizes(sizes).unwrap())
    }

    /// Each group takes the path of its own size, whatever the other groups of the layout are;
    /// one class covering every group needs no index list (no GPU needed).
    #[test]
    fn size_classes_follow_each_groups_own_size() {
        use GroupPath::{Block, Warp};
        assert_eq!(size_classes(&GroupLayout::uniform(5, 256).unwrap()), vec![(Warp, None)]);
        assert_eq!(size_classes(&GroupLayout::uniform(5, 257).unwrap()), vec![(Block, None)]);
        assert_eq!(classes(&[1, 256, 3]), vec![(Warp, None)]);
        assert_eq!(classes(&[300, 257, 4096]), vec![(Block, None)]);
        assert_eq!(
            classes(&[3, 257, 256, 1, 1000, 2]),
            vec![(Warp, Some(vec![0, 2, 3, 5])), (Block, Some(vec![1, 4]))]
        );
        // A pseudo-random ragged layout: every group is in exactly one class, by its own size.
        let sizes: Vec<usize> = (0..500u64).map(|i| 1 + ((i * 2654435761) % 600) as usize).collect();
        let mut seen = vec![0; sizes.len()];
        for (path, ids) in classes(&sizes) {
            for g in ids.unwrap() {
                assert_eq!(path, GroupPath::of(sizes[g as usize]));
                seen[g as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    /// The probe tries exactly the names cudarc loads by. tpo's own builds let cudarc load
    /// libraries itself, so its list exists here to compare with (not beside candle's `cuda`,
    /// whose `dynamic-linking` turns cudarc's loading, and that list, off).
    #[cfg(not(feature = "candle-cuda"))]
    #[test]
    fn library_probe_uses_cudarc_names() {
        for lib in ["cuda", "nvcuda", "nvToolsExt"] {
            assert_eq!(lib_candidates(lib), cudarc::get_lib_name_candidates(lib), "{lib}");
        }
    }

    /// Without a driver library, opening a device is one clear line, not a panic. (Skipped where
    /// a driver, real or emulated, can be loaded.)
    #[test]
    fn no_driver_is_a_one_line_error() {
        if library_present(&["cuda", "nvcuda"]) {
            return;
        }
        let e = CudaTpo::new(0).unwrap_err().to_string();
        assert!(e.contains("no NVIDIA driver found") && !e.contains('\n'), "{e}");
    }

    /// The PTX texts inside a fatbin (uncompressed; layout in emu/driver/loader.cpp), with the
    /// architectures of its SASS images.
    fn fatbin_contents(image: &[u8]) -> (Vec<String>, Vec<u32>) {
        let u16_at = |o: usize| usize::from(u16::from_le_bytes([image[o], image[o + 1]]));
        let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(0), 0xBA55_ED50, "not a fatbin");
        let (mut o, mut ptx, mut sass) = (u16_at(6), Vec::new(), Vec::new());
        let end = o + u64_at(8);
        while o < end {
            let (kind, header, size, arch, flags) =
                (u16_at(o), u32_at(o + 4) as usize, u64_at(o + 8), u32_at(o + 28), u64_at(o + 40));
            assert_eq!(flags & 0x2000, 0, "compressed fatbin entry");
            let payload = &image[o + header..o + header + size];
            if kind == 1 {
                ptx.push(String::from_utf8_lossy(payload).trim_end_matches('\0').to_string());
            } else {
                sass.push(arch);
            }
            o += header + size;
        }
        (ptx, sass)
    }

    /// Each fatbin holds SASS for sm_80 and sm_90 (the default TPO_CUDA_ARCH) and PTX for
    /// compute_90 at ISA 9.0 (no GPU needed).
    #[test]
    fn fatbins_hold_sass_for_each_architecture_and_ptx() {
        for (stem, image) in kernels::FATBIN {
            let (ptx, sass) = fatbin_contents(image);
            assert_eq!(ptx.len(), 1, "{stem}: one PTX");
            assert!(
                ptx[0].contains(".version 9.0") && ptx[0].contains(".target sm_90"),
                "{stem}: PTX header"
            );
            if std::env::var_os("TPO_CUDA_ARCH").is_none() {
                assert_eq!(sass, [80, 90], "{stem}: SASS architectures");
            }
        }
    }

    /// Every key names an entry point of the PTX inside the embedded fatbins (no GPU needed).
    #[test]
    fn kernel_keys_name_the_ptx_entry_points() {
        let all: String = kernels::FATBIN.iter().flat_map(|(_, f)| fatbin_contents(f).0).collect();
        let mut keys = tokens::KERNEL_KEYS.to_vec();
        keys.extend(baselines::kernel_keys());
        keys.push(KernelKey::new("fused", "block", "bf16", "f16"));
        keys.push(KernelKey::new("target", "warp", "f32", ""));
        for k in keys {
            let n = k.name();
            assert!(all.contains(&format!(".entry {n}(")), "{n} is not in the PTX");
        }
    }

    /// `1 / eta = m 2^e` with `m` in `[1, 2]` (`(1, 2]` before the rounding to f32), for every finite
    /// `eta > 0` (no GPU needed).
    #[test]
    fn inv_eta_parts_cover_every_finite_eta() {
        let sub = f64::from_bits(1);
        for eta in [sub, 1e-320, 1e-40, 2.9e-39, 1e-14, 0.3, 0.5, 1.0, 3.0, 1e6, 1e39, 1e300, f64::MAX] {
            let (m, e) = inv_eta_parts(eta);
            assert!((1.0..=2.0).contains(&m), "eta {eta:e}: m = {m}");
            // log2(m 2^e) = -log2(eta), checked in logs since 1 / eta itself may overflow.
            let got = f64::from(m).log2() + f64::from(e);
            let want = -eta.log2();
            assert!((got - want).abs() <= 2e-7, "eta {eta:e}: 2^{got} vs 2^{want}");
        }
        assert_eq!(inv_eta_parts(1.0), (2.0, -1));
        assert_eq!(inv_eta_parts(0.25), (2.0, 1));
        assert_eq!(std::mem::size_of::<Params>(), 136, "the kernels take the struct by value");
    }
}
