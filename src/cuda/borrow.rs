//! Device memory and streams that another library owns (a PyTorch tensor and
//! `torch.cuda.current_stream()`, a candle storage and its stream), used in place.
//!
//! * [`CudaTpo::with_borrowed_stream`] orders this backend's work on a caller's `CUstream`, sharing
//!   the kernels already loaded by a [`CudaTpo`] of the same device (no module load per call).
//! * [`CudaTpo::borrow`] sees `len` elements at a caller's device address as a [`Borrowed`]
//!   buffer: readable as a [`CudaSlice`] by every call of the backend, written only through
//!   [`Borrowed::copy_from`] or the calls that take a `&mut Borrowed`, and never freed here.
//!
//! Both are `unsafe`: the library cannot know how long the owner keeps the memory or the stream
//! alive. Their safe counterparts, for a caller that holds cudarc objects (candle's CUDA storage
//! is a `CudaSlice` and its device a `CudaStream`): [`CudaTpo::on_stream`] and
//! [`CudaTpo::window`], a sub-range of a `CudaSlice` as a `CudaSlice` (the calls take whole
//! slices; a tensor's storage may start at an offset), tied to the slice's borrow. What it can check, it does: [`CudaTpo::borrow`] asks the driver for the allocation that
//! holds the address (`cuPointerGetAttribute`) and refuses, with one line, a null, misaligned or
//! host address, memory of another context, and a range that runs past the end of its allocation.

use super::tokens::{DeviceSequenceBatch, DeviceTarget, LogitsPathBuffers};
use super::{cuda_err, CudaTpo, DeviceFloat};
use crate::cpu::tokens::PathConfig;
use crate::error::{Result, TpoError};
use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DeviceRepr, SyncOnDrop};
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::Arc;

/// `len` elements of `T` at a device address the caller owns, seen as a [`CudaSlice`] (through
/// `Deref`) without owning them: dropping a `Borrowed` frees nothing.
///
/// There is no `DerefMut`: a `&mut CudaSlice` could be swapped with an owned slice, which would
/// then free the owner's memory. Writes go through [`copy_from`](Self::copy_from) and the
/// backend's calls that take `&mut Borrowed`.
#[derive(Debug)]
pub struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;

    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken exactly once, here, and never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // Gives the address back without freeing it (the owner frees it); with event tracking
        // off (see `CudaTpo::new`) this waits for nothing and only drops the stream handle.
        let _ = slice.leak();
    }
}

impl<T: DeviceRepr> Borrowed<T> {
    /// Copies `src` into the borrowed memory (`dst = src`, same length), ordered on `tpo`'s stream.
    pub fn copy_from(&mut self, tpo: &CudaTpo, src: &CudaSlice<T>) -> Result<()> {
        if src.len() != self.slice.len() {
            return Err(TpoError::LengthMismatch {
                name: "copy into a borrowed buffer",
                got: src.len(),
                expected: self.slice.len(),
            });
        }
        if src.is_empty() {
            return Ok(());
        }
        tpo.stream.memcpy_dtod(src, &mut *self.slice).map_err(|e| cuda_err("device copy", e))
    }

    /// Copies `src` into elements `at..at + src.len()` of the borrowed memory, on `tpo`'s stream.
    /// `src` may be a [`CudaSlice`] or a view of one (`slice.slice(a..b)`).
    pub fn copy_from_at<S: DevicePtr<T>>(&mut self, tpo: &CudaTpo, at: usize, src: &S) -> Result<()> {
        let end = at.checked_add(src.len()).filter(|&e| e <= self.slice.len()).ok_or_else(|| {
            TpoError::LengthMismatch {
                name: "copy into a borrowed buffer (offset + length)",
                got: at.saturating_add(src.len()),
                expected: self.slice.len(),
            }
        })?;
        if src.is_empty() {
            return Ok(());
        }
        let mut dst = self.slice.slice_mut(at..end);
        tpo.stream.memcpy_dtod(src, &mut dst).map_err(|e| cuda_err("device copy", e))
    }
}

/// Elements `range` of a `CudaSlice` borrowed for `'a`, as a [`CudaSlice`] (through `Deref`), for
/// the backend's calls that read whole slices; made by [`CudaTpo::window`]. Read-only.
///
/// It holds the parent slice's read guard until it is dropped, after the view: where the context
/// tracks events across streams (cudarc's default, e.g. candle's), the parent's read event is
/// recorded after the last work queued through the window, so that a later write or free of the
/// parent on another stream waits for that work.
pub struct Window<'a, T> {
    view: Borrowed<T>,
    _guard: SyncOnDrop<'a>,
}

impl<T> std::fmt::Debug for Window<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window").field("len", &self.view.len()).finish()
    }
}

impl<T> std::ops::Deref for Window<'_, T> {
    type Target = CudaSlice<T>;

    fn deref(&self) -> &CudaSlice<T> {
        &self.view
    }
}

/// Asks the driver for one attribute of the allocation holding `ptr`.
fn pointer_attribute<V: Default>(
    ptr: u64,
    attr: sys::CUpointer_attribute,
) -> std::result::Result<V, sys::CUresult> {
    let mut v = V::default();
    // SAFETY: `v` is a live, writable `V`, and each caller asks for an attribute whose value has
    // `V`'s type and size (a context handle, a device address or a size, per the CUDA driver API).
    let r = unsafe { sys::cuPointerGetAttribute(&mut v as *mut V as *mut std::ffi::c_void, attr, ptr) };
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(v),
        e => Err(e),
    }
}

impl CudaTpo {
    /// This backend's kernels, ordered on a stream another library owns: `cu_stream` is a raw
    /// `CUstream` of this backend's device and context (PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`, a candle device's stream); `0` is the legacy
    /// default stream. Nothing is loaded again: the returned backend shares this one's context
    /// and kernels. The caller's stream is never synchronised, destroyed or otherwise touched
    /// but for the work queued on it (and the waits of [`check`](Self::check) and
    /// [`to_host`](Self::to_host), which synchronise it).
    ///
    /// # Safety
    /// `cu_stream` must be `0` or a live stream of this backend's context (the device's primary
    /// context, the one PyTorch and candle use), and must stay alive as long as the returned
    /// backend, or anything made with it, is used.
    pub unsafe fn with_borrowed_stream(&self, cu_stream: u64) -> CudaTpo {
        // SAFETY: the caller promises that `cu_stream` belongs to this context and outlives every
        // use of the wrapper; a borrowed stream is never destroyed by cudarc.
        let stream = unsafe { self.ctx.wrap_borrowed_stream(cu_stream as sys::CUstream) };
        CudaTpo {
            ctx: self.ctx.clone(),
            stream,
            kernels: self.kernels.clone(),
            reduce: self.reduce.clone(),
            sm_count: self.sm_count,
            nvtx: self.nvtx,
        }
    }

    /// This backend's kernels (context and loaded modules shared) ordered on `stream`, a cudarc
    /// stream of the same context, e.g. a candle CUDA device's `cuda_stream()`. The returned
    /// backend holds the stream. Errors if the stream belongs to another context.
    pub fn on_stream(&self, stream: &Arc<CudaStream>) -> Result<CudaTpo> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(TpoError::Cuda(format!(
                "the stream belongs to another CUDA context than this backend's (device {}); open the \
                 backend on the stream's device",
                self.ctx.ordinal()
            )));
        }
        Ok(CudaTpo {
            ctx: self.ctx.clone(),
            stream: stream.clone(),
            kernels: self.kernels.clone(),
            reduce: self.reduce.clone(),
            sm_count: self.sm_count,
            nvtx: self.nvtx,
        })
    }

    /// Elements `range` of `slice` as a [`Window`], a `CudaSlice` for this backend's calls (which
    /// take whole slices), valid while `slice` is borrowed. Errors if the range is out of bounds
    /// or `slice` belongs to another context.
    pub fn window<'a, T: DeviceRepr>(
        &'a self,
        slice: &'a CudaSlice<T>,
        range: Range<usize>,
    ) -> Result<Window<'a, T>> {
        if range.start > range.end || range.end > slice.len() {
            return Err(TpoError::Cuda(format!(
                "window {}..{} of a device buffer of {} elements",
                range.start,
                range.end,
                slice.len()
            )));
        }
        if slice.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(TpoError::Cuda("window of a device buffer of another CUDA context".into()));
        }
        let len = range.end - range.start;
        let (base, guard) = slice.device_ptr(&self.stream);
        let ptr = if len == 0 { 0 } else { base + (range.start * std::mem::size_of::<T>()) as u64 };
        // SAFETY: `[ptr, ptr + len)` lies inside `slice` (checked above), live device memory of this
        // context that holds `T`s and stays allocated for `'a`, the borrow the window carries;
        // the window only reads, and `Borrowed` never frees it.
        let view = unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len) };
        Ok(Window { view: Borrowed { slice: ManuallyDrop::new(view) }, _guard: guard })
    }

    /// Confirms with the driver that `[ptr, ptr + bytes)` is device memory of this backend's
    /// device and context, walking the allocations (or mappings) that cover it: a caching
    /// allocator's block is one allocation, but memory mapped page by page (PyTorch's expandable
    /// segments, `cuMemMap`) is reported one mapping at a time. The reason as one line, or `Ok`.
    fn check_device_range(&self, ptr: u64, bytes: u64) -> std::result::Result<(), String> {
        use sys::CUpointer_attribute as A;
        let end = ptr.checked_add(bytes).ok_or_else(|| format!("{bytes} bytes at {ptr:#x} overflow"))?;
        let mut at = ptr;
        // Each step moves past one whole mapping; the bound keeps a misbehaving driver from spinning.
        for _ in 0..1_000_000 {
            let what =
                |e: sys::CUresult| format!("address {at:#x} is not device memory the driver knows ({e:?})");
            // CU_MEMORYTYPE_DEVICE = 2 and CU_MEMORYTYPE_UNIFIED = 4 (managed); host (1) is refused.
            let kind: u32 = match pointer_attribute(at, A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE) {
                Ok(k) => k,
                Err(_) if at > ptr => {
                    return Err(format!(
                        "{bytes} bytes at {ptr:#x} run past the end of its allocation (only {} bytes from \
                         it are device memory)",
                        at - ptr
                    ))
                }
                Err(e) => return Err(what(e)),
            };
            if kind != 2 && kind != 4 {
                return Err(format!(
                    "address {at:#x} is host memory (memory type {kind}), not device memory"
                ));
            }
            let ordinal: i32 = pointer_attribute(at, A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL).map_err(what)?;
            if usize::try_from(ordinal).ok() != Some(self.ctx.ordinal()) {
                return Err(format!(
                    "address {at:#x} is memory of device {ordinal}, but this backend runs on device {}",
                    self.ctx.ordinal()
                ));
            }
            let ctx = pointer_attribute::<usize>(at, A::CU_POINTER_ATTRIBUTE_CONTEXT).map_err(what)?
                as sys::CUcontext;
            if !ctx.is_null() && ctx != self.ctx.cu_ctx() {
                return Err(format!("address {at:#x} belongs to another CUDA context than this backend's"));
            }
            let start: u64 = pointer_attribute(at, A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR).map_err(what)?;
            let size: usize = pointer_attribute(at, A::CU_POINTER_ATTRIBUTE_RANGE_SIZE).map_err(what)?;
            let next = start.saturating_add(size as u64);
            if start > at || next <= at {
                return Err(format!(
                    "the driver reports an allocation of {size} bytes at {start:#x} for {at:#x}"
                ));
            }
            if next >= end {
                return Ok(());
            }
            // The rest must be device memory too: the next, adjacent, allocation or mapping. (Past
            // the end of a lone allocation, the driver knows no memory: refused.)
            at = next;
        }
        Err(format!("{bytes} bytes at {ptr:#x} span more than a million allocations"))
    }

    /// `len` elements of `T` at device address `ptr` (e.g. a PyTorch tensor's `data_ptr()`), as a
    /// [`Borrowed`] buffer for this backend's calls. `name` names the buffer in errors.
    ///
    /// Refused with one line: a null address (for `len > 0`), an address not aligned to `T`,
    /// host memory, memory the driver does not know, memory of another device or context, and
    /// `len` elements that run past the end of the device memory at `ptr` (the driver is asked
    /// for the allocation, or for each mapping of memory mapped page by page, that covers the
    /// range). A caching allocator's allocation, e.g. PyTorch's, can hold many tensors: the check
    /// bounds the range by the allocation, not by the tensor.
    ///
    /// # Safety
    /// `[ptr, ptr + len * size_of::<T>())` must be device memory of this backend's context that
    /// holds valid `T` values (even a buffer the backend only writes: the value can be read),
    /// stays allocated as long as the returned value lives, and is not used by anyone else while
    /// this backend's work on it is queued, other than in stream order.
    pub unsafe fn borrow<T: DeviceRepr>(&self, name: &str, ptr: u64, len: usize) -> Result<Borrowed<T>> {
        let size = std::mem::size_of::<T>();
        let bad = |why: String| TpoError::Cuda(format!("borrowed buffer `{name}`: {why}"));
        let bytes =
            len.checked_mul(size).ok_or_else(|| bad(format!("{len} elements of {size} bytes overflow")))?;
        if len > 0 {
            if ptr == 0 {
                return Err(bad(format!("null device address for {len} elements")));
            }
            if !ptr.is_multiple_of(std::mem::align_of::<T>() as u64) {
                return Err(bad(format!(
                    "address {ptr:#x} is not aligned to {} bytes",
                    std::mem::align_of::<T>()
                )));
            }
            self.ctx.bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
            self.check_device_range(ptr, bytes as u64).map_err(bad)?;
        }
        // SAFETY: the caller promises the range is live device memory of this context for the
        // value's lifetime; the checks above confirmed what the driver can tell. The slice is
        // never freed: `Borrowed`'s drop leaks it back.
        let slice = unsafe { self.stream.upgrade_device_ptr::<T>(if len == 0 { 0 } else { ptr }, len) };
        Ok(Borrowed { slice: ManuallyDrop::new(slice) })
    }

    /// [`tpo_from_logits`](Self::tpo_from_logits) on borrowed logits, writing `dL/dlogits` over
    /// them (in place; `out.grad_logits` must be `None`). To keep the caller's logits, borrow a
    /// copy of them.
    pub fn tpo_from_logits_borrowed<T: DeviceFloat>(
        &self,
        logits: &mut Borrowed<T>,
        vocab: usize,
        batch: &DeviceSequenceBatch,
        source: DeviceTarget,
        cfg: &PathConfig,
        out: &mut LogitsPathBuffers<T>,
    ) -> Result<()> {
        if out.grad_logits.is_some() {
            return Err(TpoError::Cuda(
                "tpo_from_logits_borrowed writes the gradient over the borrowed logits: allocate the \
                 path buffers with PathAlloc { in_place: true, .. }"
                    .into(),
            ));
        }
        self.tpo_from_logits(&mut logits.slice, vocab, batch, source, cfg, out)
    }
}
