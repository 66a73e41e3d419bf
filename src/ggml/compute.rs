//! Compute side of the FFI module: backends, buffers, tensor contexts, graph ops, the graph
//! allocator. Owning types free their handle in `Drop`; `Tensor<'c>` handles borrow the
//! context that holds them.
//!
//! ggml asserts (aborts) on ill-shaped ops. Shapes here come from the engine's own graph
//! code over a model directory whose shapes were checked when it was opened, so an abort is
//! a bug in sage, not bad input.

use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{route_logs, take_last_error, FfiError, GgmlType};

/// llama.cpp's NEOX RoPE mode (`GGML_ROPE_TYPE_NEOX` in ggml.h, a macro bindgen skips).
pub const ROPE_TYPE_NEOX: i32 = 2;

fn status(st: sys::ggml_status, what: &str) -> Result<(), FfiError> {
    if st == sys::GGML_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(FfiError::Gguf(format!("{what} failed with status {st}")))
    }
}

/// A compute device known to this ggml build.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub description: String,
    pub is_gpu: bool,
}

/// Devices this build can run on (CPU always; CUDA or Metal when built with those features,
/// or loadable backend modules with `dynamic-backends`).
pub fn devices() -> Vec<DeviceInfo> {
    route_logs();
    #[cfg(feature = "dynamic-backends")]
    {
        static LOAD: std::sync::Once = std::sync::Once::new();
        // SAFETY: loads the backend modules found next to the executable into ggml's static
        // registry; guarded to run once.
        LOAD.call_once(|| unsafe { sys::ggml_backend_load_all() });
    }
    // SAFETY: the device registry is static; indices below the count are valid; names are
    // static C strings owned by the registry.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let d = sys::ggml_backend_dev_get(i);
                let s = |p: *const std::ffi::c_char| {
                    if p.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(p).to_string_lossy().into_owned()
                    }
                };
                let ty = sys::ggml_backend_dev_type(d);
                DeviceInfo {
                    name: s(sys::ggml_backend_dev_name(d)),
                    description: s(sys::ggml_backend_dev_description(d)),
                    is_gpu: ty == sys::GGML_BACKEND_DEVICE_TYPE_GPU || ty == sys::GGML_BACKEND_DEVICE_TYPE_IGPU,
                }
            })
            .collect()
    }
}

/// An initialized ggml backend (CPU, CUDA, Metal, …).
pub struct Backend {
    ptr: NonNull<sys::ggml_backend>,
    is_cpu: bool,
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: created by ggml_backend_*_init, freed once here; buffers made from it hold no
        // reference to the backend itself (they reference its buffer type, which is static).
        unsafe { sys::ggml_backend_free(self.ptr.as_ptr()) };
    }
}

impl Backend {
    /// The device named `name` (case-insensitive, as `devices()` lists them, or "gpu" for the
    /// first GPU), with `n_threads` CPU threads where the backend uses them.
    pub fn open(name: &str, n_threads: usize) -> Result<Backend, FfiError> {
        let devs = devices();
        let want = name.to_ascii_lowercase();
        let idx = devs.iter().position(|d| {
            let n = d.name.to_ascii_lowercase();
            n == want || (want == "gpu" && d.is_gpu) || (want != "cpu" && n.starts_with(&want))
        });
        let Some(idx) = idx else {
            let have: Vec<String> = devs.iter().map(|d| format!("{} ({})", d.name, d.description)).collect();
            return Err(FfiError::Gguf(format!(
                "no device '{name}' in this build; available: {} (CUDA and Metal need the cargo features `cuda` / `metal`)",
                have.join(", ")
            )));
        };
        // SAFETY: idx is below the device count; init with null params is the documented
        // default; a null result is handled.
        let ptr = unsafe { sys::ggml_backend_dev_init(sys::ggml_backend_dev_get(idx), std::ptr::null()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            FfiError::Gguf(format!("device '{}' failed to start: {}", devs[idx].name, take_last_error()))
        })?;
        let b = Backend { ptr, is_cpu: !devs[idx].is_gpu };
        // Threads through the registry's generic entry point, which also works when the CPU
        // backend is a loadable module (`dynamic-backends`).
        let name = CString::new("ggml_backend_set_n_threads").expect("no NUL");
        // SAFETY: the device's registry is static; the proc address, if any, has the
        // documented signature `ggml_backend_set_n_threads_t` and takes this live backend.
        unsafe {
            let reg = sys::ggml_backend_dev_backend_reg(sys::ggml_backend_get_device(b.ptr.as_ptr()));
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if !f.is_null() {
                let f: unsafe extern "C" fn(sys::ggml_backend_t, i32) = std::mem::transmute(f);
                f(b.ptr.as_ptr(), n_threads.max(1) as i32);
            }
        }
        Ok(b)
    }

    /// Bytes the backend's buffers reserve for `t` beyond `t.nbytes()` (some GPU backends pad
    /// the last row of quantized matrices).
    pub fn alloc_padding(&self, t: Tensor<'_>) -> usize {
        // SAFETY: valid backend and tensor; its default buffer type is static; a size query.
        let alloc = unsafe {
            sys::ggml_backend_buft_get_alloc_size(
                sys::ggml_backend_get_default_buffer_type(self.ptr.as_ptr()),
                t.ptr.as_ptr(),
            )
        };
        alloc.saturating_sub(t.nbytes())
    }

    pub fn name(&self) -> String {
        // SAFETY: valid backend; the name is a static C string.
        unsafe { CStr::from_ptr(sys::ggml_backend_name(self.ptr.as_ptr())) }.to_string_lossy().into_owned()
    }

    pub fn is_cpu(&self) -> bool {
        self.is_cpu
    }

    /// A buffer of `size` bytes on this backend's device.
    pub fn alloc_buffer(&self, size: usize) -> Result<Buffer, FfiError> {
        // SAFETY: valid backend; a null result (out of memory) is handled.
        let p = unsafe { sys::ggml_backend_alloc_buffer(self.ptr.as_ptr(), size.max(1)) };
        NonNull::new(p)
            .map(|ptr| Buffer { ptr })
            .ok_or_else(|| FfiError::Gguf(format!("could not allocate {size} bytes on {}", self.name())))
    }

    /// Allocate every tensor of `ctx` in one new buffer.
    pub fn alloc_ctx_tensors(&self, ctx: &Context) -> Result<Buffer, FfiError> {
        // SAFETY: valid context (no_alloc) and backend; a null result is handled.
        let p = unsafe { sys::ggml_backend_alloc_ctx_tensors(ctx.ptr.as_ptr(), self.ptr.as_ptr()) };
        NonNull::new(p)
            .map(|ptr| Buffer { ptr })
            .ok_or_else(|| FfiError::Gguf(format!("could not allocate tensors on {}", self.name())))
    }

    /// Run a graph whose tensors are all allocated (by `Allocator::alloc` or in buffers).
    pub fn compute(&self, graph: &Graph<'_>) -> Result<(), FfiError> {
        // SAFETY: valid backend and graph; all tensors have data (allocated by the caller).
        let st = unsafe { sys::ggml_backend_graph_compute(self.ptr.as_ptr(), graph.ptr.as_ptr()) };
        status(st, "graph compute")
    }
}

/// Memory on a backend's device.
pub struct Buffer {
    ptr: NonNull<sys::ggml_backend_buffer>,
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

/// A ggml context holding tensor and graph metadata (never tensor data: `no_alloc`).
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init, freed once here; Tensor handles borrow self, so none
        // outlive it.
        unsafe { sys::ggml_free(self.ptr.as_ptr()) };
    }
}

/// A tensor in a `Context`.
#[derive(Clone, Copy)]
pub struct Tensor<'c> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'c Context>,
}

impl<'c> Tensor<'c> {
    fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives in its context, which outlives 'c.
        unsafe { self.ptr.as_ref() }
    }

    pub fn ne(&self) -> [i64; 4] {
        self.raw().ne
    }

    pub fn nb(&self) -> [usize; 4] {
        self.raw().nb
    }

    pub fn ty(&self) -> GgmlType {
        GgmlType(self.raw().type_)
    }

    pub fn nbytes(&self) -> usize {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_nbytes(self.ptr.as_ptr()) }
    }

    fn data_ptr(&self) -> *mut c_void {
        self.raw().data
    }

    pub fn is_allocated(&self) -> bool {
        !self.raw().data.is_null()
    }

    /// Set the byte strides of dims 2 and 3 (only before the tensor is allocated): lets one
    /// 3-D tensor address equal-sized records spaced `nb2` apart, as the expert arena does.
    pub fn set_outer_strides(&self, nb2: usize) {
        assert!(!self.is_allocated());
        let t = self.ptr.as_ptr();
        // SAFETY: the tensor is not allocated yet, so no computed size depends on nb; nb2 is
        // at least one whole matrix apart (checked by the caller's layout).
        unsafe {
            assert!(nb2 >= (*t).nb[1] * (*t).ne[1] as usize);
            (*t).nb[2] = nb2;
            (*t).nb[3] = nb2 * (*t).ne[2] as usize;
        }
    }

    pub fn set_name(&self, name: &str) {
        if let Ok(c) = CString::new(&name[..name.len().min(63)]) {
            // SAFETY: valid tensor and C string (copied by ggml, truncated to its limit).
            unsafe { sys::ggml_set_name(self.ptr.as_ptr(), c.as_ptr()) };
        }
    }

    /// Mark as a graph input / output (the allocator then never reuses its memory early).
    pub fn set_input(&self) {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_input(self.ptr.as_ptr()) };
    }

    pub fn set_output(&self) {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_output(self.ptr.as_ptr()) };
    }

    /// Write `bytes` at byte `offset` of the tensor's data (not for repacked tensors, which
    /// take only whole writes: `write_whole`).
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(self.is_allocated(), "tensor written before allocation");
        assert!(offset + bytes.len() <= self.nbytes(), "write past the tensor");
        if self.in_repack_buffer() {
            assert!(self.raw().extra.is_null(), "partial write to a repacked tensor");
            // SAFETY: CPU_REPACK buffers are host memory; [offset, offset + len) lies inside
            // the tensor's data (asserted); the regions cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.raw().data as *mut u8).add(offset), bytes.len())
            };
            return;
        }
        // SAFETY: allocated tensor; the range lies inside it (asserted).
        unsafe {
            sys::ggml_backend_tensor_set(self.ptr.as_ptr(), bytes.as_ptr() as *const c_void, offset, bytes.len())
        };
    }

    pub fn write_f32(&self, v: &[f32]) {
        self.write(0, bytemuck::cast_slice(v));
    }

    pub fn write_i32(&self, v: &[i32]) {
        self.write(0, bytemuck::cast_slice(v));
    }

    /// Read `n` f32 values from the start of the tensor's data.
    pub fn read_f32(&self, n: usize) -> Vec<f32> {
        assert!(self.is_allocated() && n * 4 <= self.nbytes());
        let mut out = vec![0f32; n];
        // SAFETY: allocated tensor; n * 4 bytes lie inside it (asserted) and fit `out`.
        unsafe { sys::ggml_backend_tensor_get(self.ptr.as_ptr(), out.as_mut_ptr() as *mut c_void, 0, n * 4) };
        out
    }

    /// Read `n` i32 values from the start of the tensor's data.
    pub fn read_i32(&self, n: usize) -> Vec<i32> {
        assert!(self.is_allocated() && n * 4 <= self.nbytes());
        let mut out = vec![0i32; n];
        // SAFETY: allocated tensor; n * 4 bytes lie inside it (asserted) and fit `out`.
        unsafe { sys::ggml_backend_tensor_get(self.ptr.as_ptr(), out.as_mut_ptr() as *mut c_void, 0, n * 4) };
        out
    }
}

macro_rules! op {
    ($self:ident, $e:expr) => {{
        // SAFETY: valid context and tensors of live contexts; ggml checks shapes (aborting on
        // a bug in sage's graph code, see the module comment) and returns a new tensor in
        // this context.
        let p = unsafe { $e };
        Tensor { ptr: NonNull::new(p).expect("ggml op returned null"), _ctx: PhantomData }
    }};
}

impl Context {
    /// A context for up to `n_tensors` tensors and, if `graph_nodes > 0`, one graph.
    pub fn new(n_tensors: usize, graph_nodes: usize) -> Context {
        route_logs();
        // SAFETY: size queries without preconditions; ggml_init with no_alloc only reserves
        // metadata space; null (out of memory) is checked.
        unsafe {
            let mut mem = n_tensors * sys::ggml_tensor_overhead() + 1024;
            if graph_nodes > 0 {
                mem += sys::ggml_graph_overhead_custom(graph_nodes, false);
            }
            let p = sys::ggml_init(sys::ggml_init_params {
                mem_size: mem,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            Context { ptr: NonNull::new(p).expect("ggml_init failed") }
        }
    }

    fn c(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    pub fn new_tensor(&self, ty: GgmlType, ne: &[i64]) -> Tensor<'_> {
        assert!(!ne.is_empty() && ne.len() <= 4);
        assert!(ty.row_size(ne[0] as u64).is_some(), "row of {} does not fit {ty}", ne[0]);
        op!(self, sys::ggml_new_tensor(self.c(), ty.0, ne.len() as i32, ne.as_ptr()))
    }

    pub fn get_rows<'a>(&'a self, a: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_get_rows(self.c(), a.ptr.as_ptr(), ids.ptr.as_ptr()))
    }
    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        op!(self, sys::ggml_rms_norm(self.c(), a.ptr.as_ptr(), eps))
    }
    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_mul(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_add(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    pub fn mul_mat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_mul_mat(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    /// `as_` [ne0, ne1, n_mat] chosen per column of `b` by `ids` [n_used, n_tokens] (i32).
    pub fn mul_mat_id<'a>(&'a self, as_: Tensor<'a>, b: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_mul_mat_id(self.c(), as_.ptr.as_ptr(), b.ptr.as_ptr(), ids.ptr.as_ptr()))
    }
    /// silu(a) * b.
    pub fn swiglu_split<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_swiglu_split(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    pub fn reshape_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        op!(self, sys::ggml_reshape_2d(self.c(), a.ptr.as_ptr(), ne0, ne1))
    }
    pub fn reshape_3d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'a> {
        op!(self, sys::ggml_reshape_3d(self.c(), a.ptr.as_ptr(), ne0, ne1, ne2))
    }
    pub fn view_1d<'a>(&'a self, a: Tensor<'a>, ne0: i64, offset: usize) -> Tensor<'a> {
        op!(self, sys::ggml_view_1d(self.c(), a.ptr.as_ptr(), ne0, offset))
    }
    pub fn view_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, nb1: usize, offset: usize) -> Tensor<'a> {
        op!(self, sys::ggml_view_2d(self.c(), a.ptr.as_ptr(), ne0, ne1, nb1, offset))
    }
    #[allow(clippy::too_many_arguments)]
    pub fn view_3d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 3], nb1: usize, nb2: usize, offset: usize) -> Tensor<'a> {
        op!(self, sys::ggml_view_3d(self.c(), a.ptr.as_ptr(), ne[0], ne[1], ne[2], nb1, nb2, offset))
    }
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        op!(self, sys::ggml_permute(self.c(), a.ptr.as_ptr(), axes[0], axes[1], axes[2], axes[3]))
    }
    pub fn transpose<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_transpose(self.c(), a.ptr.as_ptr()))
    }
    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_cont(self.c(), a.ptr.as_ptr()))
    }
    /// Copy `a` into `b` (converting type); the result aliases `b`.
    pub fn cpy<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_cpy(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    pub fn soft_max_ext<'a>(&'a self, a: Tensor<'a>, mask: Tensor<'a>, scale: f32) -> Tensor<'a> {
        op!(self, sys::ggml_soft_max_ext(self.c(), a.ptr.as_ptr(), mask.ptr.as_ptr(), scale, 0.0))
    }
    /// Softmax along rows.
    pub fn soft_max<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_soft_max(self.c(), a.ptr.as_ptr()))
    }
    /// Indices (i32) of each row's values, largest first.
    pub fn argsort_desc<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_argsort(self.c(), a.ptr.as_ptr(), sys::GGML_SORT_ORDER_DESC))
    }
    /// Sum of each row: [1, ne1, ...].
    pub fn sum_rows<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_sum_rows(self.c(), a.ptr.as_ptr()))
    }
    /// a / b (b broadcast over a).
    pub fn div<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_div(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    /// RoPE of `a` [head_dim, n_head, n_tokens] at positions `pos` (i32 [n_tokens]).
    pub fn rope<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        n_dims: i32,
        mode: i32,
        n_ctx_orig: i32,
        freq_base: f32,
    ) -> Tensor<'a> {
        op!(
            self,
            sys::ggml_rope_ext(
                self.c(),
                a.ptr.as_ptr(),
                pos.ptr.as_ptr(),
                std::ptr::null_mut(),
                n_dims,
                mode,
                n_ctx_orig,
                freq_base,
                1.0,
                0.0,
                1.0,
                32.0,
                1.0
            )
        )
    }

    /// A graph of up to `nodes` nodes in this context (which must have been made with room).
    pub fn graph(&self, nodes: usize) -> Graph<'_> {
        // SAFETY: valid context created with graph room (Context::new); null is checked.
        let p = unsafe { sys::ggml_new_graph_custom(self.c(), nodes, false) };
        Graph { ptr: NonNull::new(p).expect("ggml_new_graph_custom failed: context too small"), _ctx: PhantomData }
    }
}

/// A compute graph in a `Context`.
pub struct Graph<'c> {
    ptr: NonNull<sys::ggml_cgraph>,
    _ctx: PhantomData<&'c Context>,
}

impl<'c> Graph<'c> {
    pub fn expand(&mut self, t: Tensor<'c>) {
        // SAFETY: graph and tensor live in the same or an outliving context.
        unsafe { sys::ggml_build_forward_expand(self.ptr.as_ptr(), t.ptr.as_ptr()) };
    }
}

/// Allocates the intermediate tensors of graphs, reusing one buffer across graphs.
pub struct Allocator {
    ptr: NonNull<sys::ggml_gallocr>,
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: created by ggml_gallocr_new, freed once here.
        unsafe { sys::ggml_gallocr_free(self.ptr.as_ptr()) };
    }
}

impl Allocator {
    pub fn new(backend: &Backend) -> Allocator {
        // SAFETY: valid backend; its default buffer type is static.
        let p = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend.ptr.as_ptr())) };
        Allocator { ptr: NonNull::new(p).expect("ggml_gallocr_new failed") }
    }

    /// Give every unallocated tensor of `graph` memory (growing the allocator's buffer when
    /// needed).
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<(), FfiError> {
        // SAFETY: valid allocator and graph.
        if unsafe { sys::ggml_gallocr_alloc_graph(self.ptr.as_ptr(), graph.ptr.as_ptr()) } {
            Ok(())
        } else {
            Err(FfiError::Gguf("could not allocate the compute graph".into()))
        }
    }

    /// Bytes of the allocator's compute buffer.
    pub fn buffer_size(&self) -> usize {
        // SAFETY: valid allocator; buffer 0 is the only one (single backend).
        unsafe { sys::ggml_gallocr_get_buffer_size(self.ptr.as_ptr(), 0) }
    }
}

/// A context that owns its tensors' handles, so a struct can keep tensors and their context
/// together (a `Tensor<'c>` alone cannot live beside the context it borrows).
pub struct TensorSet {
    ctx: Context,
    tensors: Vec<NonNull<sys::ggml_tensor>>,
}

impl TensorSet {
    pub fn new(capacity: usize) -> TensorSet {
        TensorSet { ctx: Context::new(capacity, 0), tensors: Vec::with_capacity(capacity) }
    }

    /// Add a tensor; returns its index.
    pub fn add(&mut self, ty: GgmlType, ne: &[i64], name: &str) -> usize {
        let t = self.ctx.new_tensor(ty, ne);
        t.set_name(name);
        self.tensors.push(t.ptr);
        self.tensors.len() - 1
    }

    pub fn get(&self, i: usize) -> Tensor<'_> {
        Tensor { ptr: self.tensors[i], _ctx: PhantomData }
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

impl GgmlType {
    /// ggml's 8-bit integer type (used for raw byte regions).
    pub const I8: GgmlType = GgmlType(sys::GGML_TYPE_I8);
    pub const I32: GgmlType = GgmlType(sys::GGML_TYPE_I32);
}

/// A backend buffer type (static in ggml; nothing to free).
#[derive(Clone, Copy)]
pub struct BufType(sys::ggml_backend_buffer_type_t);

impl BufType {
    pub fn name(&self) -> String {
        // SAFETY: buffer types are static; the name is a static C string.
        unsafe { CStr::from_ptr(sys::ggml_backend_buft_name(self.0)) }.to_string_lossy().into_owned()
    }
}

impl Backend {
    /// The CPU's repacking buffer type (`CPU_REPACK`), where ggml lays quantized matrices out
    /// for its faster kernels (as llama.cpp does by default), if this build and CPU have one.
    pub fn repack_buffer_type(&self) -> Option<BufType> {
        if !self.is_cpu {
            return None;
        }
        let name = CString::new("ggml_backend_dev_get_extra_bufts").expect("no NUL");
        // SAFETY: the device and registry of a live backend are static; the proc address, if
        // any, has the documented signature `ggml_backend_dev_get_extra_bufts_t`, returning a
        // null-terminated static array of buffer types.
        unsafe {
            let dev = sys::ggml_backend_get_device(self.ptr.as_ptr());
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if f.is_null() {
                return None;
            }
            let f: unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t =
                std::mem::transmute(f);
            let mut p = f(dev);
            while !p.is_null() && !(*p).is_null() {
                let bt = BufType(*p);
                if bt.name() == "CPU_REPACK" {
                    return Some(bt);
                }
                p = p.add(1);
            }
            None
        }
    }

    /// A buffer of `size` bytes of type `bt` (the backend's default when None).
    pub fn alloc_buffer_in(&self, bt: Option<BufType>, size: usize) -> Result<Buffer, FfiError> {
        let Some(bt) = bt else { return self.alloc_buffer(size) };
        // SAFETY: static buffer type; null (out of memory) is handled.
        let p = unsafe { sys::ggml_backend_buft_alloc_buffer(bt.0, size.max(1)) };
        NonNull::new(p)
            .map(|ptr| Buffer { ptr })
            .ok_or_else(|| FfiError::Gguf(format!("could not allocate {size} bytes of {}", bt.name())))
    }

    /// Allocate every tensor of `ctx` in one new buffer of type `bt` (default when None).
    pub fn alloc_ctx_tensors_in(&self, ctx: &Context, bt: Option<BufType>) -> Result<Buffer, FfiError> {
        let Some(bt) = bt else { return self.alloc_ctx_tensors(ctx) };
        // SAFETY: valid no_alloc context and static buffer type; null is handled.
        let p = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr.as_ptr(), bt.0) };
        NonNull::new(p)
            .map(|ptr| Buffer { ptr })
            .ok_or_else(|| FfiError::Gguf(format!("could not allocate tensors in {}", bt.name())))
    }
}

impl Tensor<'_> {
    fn in_repack_buffer(&self) -> bool {
        !self.raw().buffer.is_null() && {
            // SAFETY: the buffer of an allocated tensor is live; its type and name are static.
            let name = unsafe {
                CStr::from_ptr(sys::ggml_backend_buft_name(sys::ggml_backend_buffer_get_type(self.raw().buffer)))
            };
            name.to_bytes() == b"CPU_REPACK"
        }
    }

    /// Whether ggml gave `other` the same repacked layout as this tensor (the same repacking
    /// of the same type), so rows written through one are laid out as the other reads them.
    pub fn same_layout(&self, other: Tensor<'_>) -> bool {
        self.raw().type_ == other.raw().type_ && self.raw().extra == other.raw().extra
    }

    /// Whether the tensor lives in a repacking buffer with a repacked layout for its type.
    pub fn is_repacked(&self) -> bool {
        !self.raw().extra.is_null() && self.in_repack_buffer()
    }

    /// Write the tensor's whole data. In a repacking buffer ggml converts the layout when the
    /// type has a repacked form; other tensors there are plain host memory and are copied.
    pub fn write_whole(&self, bytes: &[u8]) {
        assert!(self.is_allocated() && bytes.len() == self.nbytes(), "whole-tensor write of the wrong size");
        if self.in_repack_buffer() && self.raw().extra.is_null() {
            self.write(0, bytes);
        } else {
            // SAFETY: allocated tensor, whole-size write (what the repack buffer requires).
            unsafe { sys::ggml_backend_tensor_set(self.ptr.as_ptr(), bytes.as_ptr() as *const c_void, 0, bytes.len()) };
        }
    }
}
