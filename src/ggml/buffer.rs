//! Memory on a backend's device: placing tensors at offsets (how the expert arena's per-layer
//! views alias one region), repacked writes, and handles another thread may fill host memory
//! through.

use std::ffi::c_void;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::graph::status;
use super::{Context, FfiError, GgmlType, Tensor};

/// Memory on a backend's device.
pub struct Buffer {
    pub(super) ptr: NonNull<sys::ggml_backend_buffer>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: created by ggml_backend_alloc_*, freed once here.
        unsafe { sys::ggml_backend_buffer_free(self.ptr.as_ptr()) };
    }
}

/// A buffer that other threads may write into through a [`HostWriter`] while its owner keeps
/// using it (the engine's I/O thread fills arena slots while graphs compute on other slots).
/// The buffer is freed when the last handle, the owner's or a writer's, is dropped.
pub struct SharedBuffer(Buffer);

// SAFETY: other threads reach the buffer only through `HostWriter::fill` (a byte range of host
// memory, bounds checked) and `Drop` (ggml_backend_buffer_free, run once, by whichever thread
// drops the last handle); ggml keeps no per-thread state for a buffer.
unsafe impl Send for SharedBuffer {}
// SAFETY: as above: the engine keeps the `Arc` itself and gives other threads `HostWriter`s,
// whose only use is `fill`; the buffer's other methods run on the owner's thread.
unsafe impl Sync for SharedBuffer {}

impl std::ops::Deref for SharedBuffer {
    type Target = Buffer;
    fn deref(&self) -> &Buffer {
        &self.0
    }
}

impl SharedBuffer {
    pub fn new(b: Buffer) -> std::sync::Arc<SharedBuffer> {
        std::sync::Arc::new(SharedBuffer(b))
    }

    /// A writer into this buffer for another thread; None unless its memory is host memory.
    pub fn host_writer(self: &std::sync::Arc<Self>) -> Option<HostWriter> {
        let p = self.0.ptr.as_ptr();
        // SAFETY: valid buffer; queries only.
        let (host, base) = unsafe { (sys::ggml_backend_buffer_is_host(p), sys::ggml_backend_buffer_get_base(p)) };
        (host && !base.is_null()).then(|| HostWriter { buf: self.clone(), base: base as usize, len: self.size() })
    }
}

/// Fills ranges of a host buffer from any thread. The buffer stays allocated while a writer
/// exists. Writing a range that a running graph reads gives that graph torn data: the owner
/// hands out ranges no graph reads until the write is reported done.
#[derive(Clone)]
pub struct HostWriter {
    buf: std::sync::Arc<SharedBuffer>,
    base: usize,
    len: usize,
}

impl HostWriter {
    /// Let `f` fill bytes `offset..offset + len` of the buffer (read a file into them).
    pub fn fill<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "a range past the buffer's end");
        let _alive = &self.buf;
        // SAFETY: the range lies inside the buffer (asserted), host memory kept allocated by
        // `buf` for the whole call. Nothing else holds it as a slice: this module hands out
        // a buffer's memory only here, for the length of `f`, and the owner gives each range
        // to one writer at a time and runs no graph on it meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut((self.base + offset) as *mut u8, len) };
        f(dst)
    }
}

impl Buffer {
    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr.as_ptr()) }
    }

    /// Bytes from the start of this buffer to its first address that is a multiple of `align`
    /// (a power of two), as the backend reports its address.
    pub fn offset_to_aligned(&self, align: usize) -> usize {
        // SAFETY: valid buffer; only the base address is read.
        let base = unsafe { sys::ggml_backend_buffer_get_base(self.ptr.as_ptr()) } as usize;
        base.next_multiple_of(align) - base
    }

    pub fn clear(&self, value: u8) {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_clear(self.ptr.as_ptr(), value) };
    }

    /// Write `bytes`, a `ty` matrix of `ne1` rows of `ne0` in ggml's plain layout, at byte
    /// `offset` of this buffer (a CPU repacking buffer), where ggml repacks it on the way in.
    /// ggml repacks only whole tensors, so each part goes through a proxy tensor placed at
    /// its spot. With `threads` > 1 the rows are cut into that many slices of whole row groups
    /// (multiples of 64 rows, which every repacked layout's interleave divides; a repacked
    /// layout keeps each row group in the same bytes as unpacked), repacked in parallel; a
    /// matrix whose slices ggml would lay out differently from the whole goes in one piece.
    pub fn write_repacked(
        &self,
        ty: GgmlType,
        ne0: u64,
        ne1: u64,
        offset: usize,
        bytes: &[u8],
        threads: usize,
    ) -> Result<(), FfiError> {
        let row = bytes.len() / ne1.max(1) as usize;
        let per = (ne1.div_ceil(threads.max(1) as u64)).next_multiple_of(64);
        if threads <= 1 || ne1 <= per || !self.slices_keep_layout(ty, ne0, ne1, offset, row, per)? {
            let ctx = Context::new(1, 0);
            let whole = ctx.new_tensor(ty, &[ne0 as i64, ne1 as i64]);
            self.place(whole, offset)?;
            whole.write_whole(bytes);
            return Ok(());
        }
        let slices: Vec<(u64, u64)> = (0..ne1).step_by(per as usize).map(|r0| (r0, per.min(ne1 - r0))).collect();
        struct ForThreads(NonNull<sys::ggml_backend_buffer>);
        // SAFETY: the threads below only place proxy tensors in the buffer and write through
        // them; ggml's CPU buffer functions for that (tensor_alloc, init_tensor, set_tensor
        // with repacking) keep no state of their own and write only to the proxy and to its
        // bytes, and the slices' bytes are disjoint. The buffer outlives the scope.
        unsafe impl Sync for ForThreads {}
        let shared = ForThreads(self.ptr);
        let shared = &shared;
        std::thread::scope(|scope| {
            let jobs: Vec<_> = slices
                .iter()
                .map(|&(r0, n)| {
                    let part = &bytes[r0 as usize * row..(r0 + n) as usize * row];
                    scope.spawn(move || -> Result<(), FfiError> {
                        // A second handle to this buffer for `place`; never dropped (the
                        // buffer is freed once, by its owner).
                        let buf = std::mem::ManuallyDrop::new(Buffer { ptr: shared.0 });
                        let c = Context::new(1, 0);
                        let t = c.new_tensor(ty, &[ne0 as i64, n as i64]);
                        buf.place(t, offset + r0 as usize * row)?;
                        t.write_whole(part);
                        Ok(())
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|j| j.join().expect("a repack thread panicked"))
        })
    }

    /// Whether ggml gives every slice of `rows` rows (the last one may be shorter) of a `ty`
    /// matrix [ne0, ne1] with rows of `row` bytes at `offset` the layout it gives the whole
    /// matrix there (so the slices can be written, and repacked, one by one).
    pub fn slices_keep_layout(
        &self,
        ty: GgmlType,
        ne0: u64,
        ne1: u64,
        offset: usize,
        row: usize,
        rows: u64,
    ) -> Result<bool, FfiError> {
        let ctx = Context::new(2, 0);
        let whole = ctx.new_tensor(ty, &[ne0 as i64, ne1 as i64]);
        self.place(whole, offset)?;
        for r0 in (0..ne1).step_by(rows.max(1) as usize) {
            let c = Context::new(1, 0);
            let t = c.new_tensor(ty, &[ne0 as i64, rows.min(ne1 - r0) as i64]);
            self.place(t, offset + r0 as usize * row)?;
            if !t.same_layout(whole) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Byte offset of `t`'s data in this buffer; None when `t` lives elsewhere.
    pub fn offset_of(&self, t: Tensor<'_>) -> Option<usize> {
        if t.raw().buffer != self.ptr.as_ptr() {
            return None;
        }
        // SAFETY: valid buffer; only the base address is read.
        let base = unsafe { sys::ggml_backend_buffer_get_base(self.ptr.as_ptr()) } as usize;
        (t.raw().data as usize).checked_sub(base)
    }

    /// Give `t` (not yet allocated) its data at `offset` in this buffer.
    pub fn place(&self, t: Tensor<'_>, offset: usize) -> Result<(), FfiError> {
        // SAFETY: valid buffer and tensor; a size query (GPU buffers pad quantized rows).
        let alloc = unsafe { sys::ggml_backend_buffer_get_alloc_size(self.ptr.as_ptr(), t.ptr.as_ptr()) };
        let need = offset.saturating_add(alloc.max(t.nbytes()));
        if need > self.size() || !t.data_ptr().is_null() {
            return Err(FfiError::Gguf(format!(
                "tensor of {alloc} bytes at {offset} does not fit a buffer of {}",
                self.size()
            )));
        }
        // SAFETY: the range [offset, offset + alloc size) lies inside the buffer (checked) and
        // the tensor has no data yet; ggml records buffer and address in the tensor.
        let st = unsafe {
            let base = sys::ggml_backend_buffer_get_base(self.ptr.as_ptr()) as *mut u8;
            sys::ggml_backend_tensor_alloc(self.ptr.as_ptr(), t.ptr.as_ptr(), base.add(offset) as *mut c_void)
        };
        status(st, "placing a tensor")
    }
}
