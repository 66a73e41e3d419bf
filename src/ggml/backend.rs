//! Compute devices and initialized backends (CPU, CUDA, Metal, …), and the buffer types they
//! allocate from.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::graph::status;
use super::{route_logs, take_last_error, Buffer, Context, FfiError, Graph, Tensor};

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
    pub(super) ptr: NonNull<sys::ggml_backend>,
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

    /// The alignment the backend's default buffer type gives tensor data (a GPU's storage
    /// buffer offset alignment).
    pub fn alignment(&self) -> usize {
        // SAFETY: valid backend; its default buffer type is static; a query.
        unsafe { sys::ggml_backend_buft_get_alignment(sys::ggml_backend_get_default_buffer_type(self.ptr.as_ptr())) }
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
    /// Wait until everything queued on the backend is done.
    pub fn synchronize(&self) {
        // SAFETY: valid backend.
        unsafe { sys::ggml_backend_synchronize(self.ptr.as_ptr()) };
    }

    /// Whether the backend runs the op of node `t` with its sources' types and shapes.
    pub fn supports_op(&self, t: Tensor<'_>) -> bool {
        // SAFETY: valid backend and tensor; a query that reads the node's op, types and shapes.
        unsafe { sys::ggml_backend_supports_op(self.ptr.as_ptr(), t.ptr.as_ptr()) }
    }

    pub fn compute(&self, graph: &Graph<'_>) -> Result<(), FfiError> {
        // SAFETY: valid backend and graph; all tensors have data (allocated by the caller).
        let st = unsafe { sys::ggml_backend_graph_compute(self.ptr.as_ptr(), graph.ptr.as_ptr()) };
        status(st, "graph compute")
    }
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
