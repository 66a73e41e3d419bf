//! The only module with FFI and `unsafe`: owning wrappers over ggml's type traits, quantizer,
//! log hook and GGUF context (all from the llama-cpp-sys-2 build), and read-only file mappings.
//!
//! Every handle is an owning type freed in `Drop`. ggml aborts the process on some misuse
//! (asking for a key with the wrong type, a duplicate tensor name, a row length that does not
//! fit the block size), so every call below checks those preconditions in Rust first.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fs::File;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// A ggml tensor type, known to be a valid id of this ggml build.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct GgmlType(pub(crate) u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(sys::GGML_TYPE_F32);
    pub const F16: GgmlType = GgmlType(sys::GGML_TYPE_F16);
    pub const BF16: GgmlType = GgmlType(sys::GGML_TYPE_BF16);
    pub const Q8_0: GgmlType = GgmlType(sys::GGML_TYPE_Q8_0);
    pub const Q6_K: GgmlType = GgmlType(sys::GGML_TYPE_Q6_K);
    pub const Q5_K: GgmlType = GgmlType(sys::GGML_TYPE_Q5_K);
    pub const Q5_1: GgmlType = GgmlType(sys::GGML_TYPE_Q5_1);
    pub const Q5_0: GgmlType = GgmlType(sys::GGML_TYPE_Q5_0);
    pub const Q4_K: GgmlType = GgmlType(sys::GGML_TYPE_Q4_K);
    pub const Q4_0: GgmlType = GgmlType(sys::GGML_TYPE_Q4_0);
    pub const Q3_K: GgmlType = GgmlType(sys::GGML_TYPE_Q3_K);
    pub const Q2_K: GgmlType = GgmlType(sys::GGML_TYPE_Q2_K);

    /// The type with this raw id, if this ggml build knows it as a weight type: not a removed
    /// type, and not one of the intermediates of its dot products (q8_1, q8_K), which no
    /// kernel takes as weights (the CPU backend has no dot product for them: a matrix
    /// multiplication would call a null function).
    pub fn from_raw(raw: u32) -> Option<GgmlType> {
        if raw >= sys::GGML_TYPE_COUNT || raw == sys::GGML_TYPE_Q8_1 || raw == sys::GGML_TYPE_Q8_K {
            return None;
        }
        // SAFETY: `raw` is below GGML_TYPE_COUNT, so ggml indexes its static traits table in
        // bounds; the call has no other preconditions.
        let blck = unsafe { sys::ggml_blck_size(raw) };
        // Removed types (Q4_2, Q4_3, ...) keep a table row with block size 0.
        (blck > 0).then_some(GgmlType(raw))
    }

    pub fn raw(self) -> u32 {
        self.0
    }

    /// ggml's name of the type, e.g. `q4_K`.
    pub fn name(self) -> &'static str {
        // SAFETY: self.0 is a valid type id (checked in from_raw or a constant); ggml returns a
        // pointer to a static NUL-terminated string that lives for the whole program.
        let p = unsafe { sys::ggml_type_name(self.0) };
        if p.is_null() {
            return "?";
        }
        // SAFETY: p is non-null and points to a static C string (see above).
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
    }

    /// Elements per block (1 for float types, 32 or 256 for quantized types).
    pub fn block_size(self) -> u64 {
        // SAFETY: valid type id; plain table lookup.
        unsafe { sys::ggml_blck_size(self.0) as u64 }
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        // SAFETY: valid type id; plain table lookup.
        unsafe { sys::ggml_type_size(self.0) as u64 }
    }

    /// Bytes of one row of `ne0` elements, or None when `ne0` is not a multiple of the block.
    pub fn row_size(self, ne0: u64) -> Option<u64> {
        let blck = self.block_size();
        if !ne0.is_multiple_of(blck) {
            return None;
        }
        (ne0 / blck).checked_mul(self.type_size())
    }

    /// Bytes of a tensor with these dimensions (ggml order, ne[0] first), or None when the rows
    /// do not fit the block size or the size overflows.
    pub fn tensor_size(self, ne: &[u64]) -> Option<u64> {
        let row = self.row_size(*ne.first()?)?;
        ne[1..].iter().try_fold(row, |acc, &n| acc.checked_mul(n))
    }

    fn traits(self) -> &'static sys::ggml_type_traits {
        // SAFETY: valid type id; ggml returns a pointer into its static traits table, which
        // lives for the whole program and is never written after start-up.
        unsafe { &*sys::ggml_get_type_traits(self.0) }
    }

    /// Whether ggml can convert this type to f32 (needed to re-quantize).
    pub fn can_dequantize(self) -> bool {
        self == GgmlType::F32 || self.traits().to_float.is_some()
    }

    /// Whether ggml's CPU kernels can multiply a matrix of this type (it has a dot product),
    /// as every weight but the norms is used. Types that are only intermediate forms (q8_1,
    /// q8_K) or integers have none, and ggml would abort on them mid-graph.
    pub fn can_matmul(self) -> bool {
        // SAFETY: valid type id; ggml returns a pointer into its static CPU traits table
        // (or null for an id it does not know, checked), never written after start-up.
        let t = unsafe { sys::ggml_get_type_traits_cpu(self.0) };
        // SAFETY: non-null pointers from that table point at a live static entry.
        !t.is_null() && unsafe { (*t).vec_dot.is_some() }
    }

    /// Whether ggml can quantize f32 into this type without an importance matrix.
    pub fn can_quantize(self) -> bool {
        // SAFETY: valid type id; plain table lookup.
        let needs_imatrix = unsafe { sys::ggml_quantize_requires_imatrix(self.0) };
        !needs_imatrix && (self.traits().from_float_ref.is_some() || self == GgmlType::F32)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of this module; callers attach file and tensor names.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FfiError {
    #[error("{0} cannot be converted to f32 by this ggml build")]
    NoDequantize(GgmlType),
    #[error("ggml cannot quantize to {0} without an importance matrix")]
    NoQuantize(GgmlType),
    #[error("{what}: {got} bytes do not hold a whole number of {ty} rows of {n_per_row}")]
    BadLength { what: &'static str, ty: GgmlType, n_per_row: u64, got: usize },
    #[error("name '{0}' is longer than ggml's limit of {1} bytes or contains NUL")]
    BadName(String, usize),
    #[error("tensor '{name}': a row of {ne0} does not fit {ty} blocks of {blck}")]
    RowNotBlock { name: String, ty: GgmlType, ne0: u64, blck: u64 },
    #[error("{0}")]
    Gguf(String),
    #[error("{0}")]
    Llama(String),
}

/// Convert `src` (whole rows of `ty`, `n_per_row` elements each) to f32.
pub fn dequantize(ty: GgmlType, src: &[u8], n_per_row: u64) -> Result<Vec<f32>, FfiError> {
    let mut out = Vec::new();
    dequantize_into(ty, src, n_per_row, &mut out)?;
    Ok(out)
}

/// `dequantize` into a reused buffer (no allocation once it is large enough).
pub fn dequantize_into(ty: GgmlType, src: &[u8], n_per_row: u64, out: &mut Vec<f32>) -> Result<(), FfiError> {
    if ty == GgmlType::F32 {
        // ggml has no to_float for f32 itself.
        if n_per_row == 0 || !(src.len() as u64).is_multiple_of(4 * n_per_row) {
            return Err(FfiError::BadLength { what: "dequantize", ty, n_per_row, got: src.len() });
        }
        out.clear();
        out.extend(src.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        return Ok(());
    }
    let to_float = ty.traits().to_float.ok_or(FfiError::NoDequantize(ty))?;
    let row = ty
        .row_size(n_per_row)
        .filter(|&r| r > 0 && (src.len() as u64).is_multiple_of(r))
        .ok_or(FfiError::BadLength { what: "dequantize", ty, n_per_row, got: src.len() })?;
    let n_rows = src.len() as u64 / row;
    let n = (n_rows * n_per_row) as usize;
    out.clear();
    out.resize(n, 0.0);
    let f32_row = n_per_row as usize;
    for_row_chunks(src, row as usize, out, f32_row, |src_part, dst_part| {
        // SAFETY: src_part holds exactly dst_part.len() / n_per_row whole rows of `ty`
        // (both split at the same row), so ggml reads src_part.len() bytes and writes
        // dst_part.len() floats, all inside the two slices.
        unsafe { to_float(src_part.as_ptr() as *const c_void, dst_part.as_mut_ptr(), dst_part.len() as i64) };
    });
    Ok(())
}

/// Quantize `src` (rows of `n_per_row` f32) into `ty` with ggml's own quantizer.
pub fn quantize(ty: GgmlType, src: &[f32], n_per_row: u64) -> Result<Vec<u8>, FfiError> {
    let mut out = Vec::new();
    quantize_into(ty, src, n_per_row, &mut out)?;
    Ok(out)
}

/// `quantize` into a reused buffer (no allocation once it is large enough).
pub fn quantize_into(ty: GgmlType, src: &[f32], n_per_row: u64, out: &mut Vec<u8>) -> Result<(), FfiError> {
    if !ty.can_quantize() {
        return Err(FfiError::NoQuantize(ty));
    }
    let row = ty
        .row_size(n_per_row)
        .filter(|_| n_per_row > 0 && (src.len() as u64).is_multiple_of(n_per_row))
        .ok_or(FfiError::BadLength { what: "quantize", ty, n_per_row, got: src.len() * 4 })?;
    let n_rows = src.len() as u64 / n_per_row;
    out.clear();
    out.resize((n_rows * row) as usize, 0);
    // SAFETY: ggml_quantize_init only fills ggml's lookup tables for `ty`; it guards itself
    // with a critical section and is safe to call more than once.
    unsafe { sys::ggml_quantize_init(ty.0) };
    for_row_chunks(src, n_per_row as usize, out, row as usize, |src_part, dst_part| {
        let rows = (src_part.len() as u64 / n_per_row) as i64;
        // SAFETY: src_part is `rows` whole rows of n_per_row floats and dst_part exactly
        // `rows` rows of `row` bytes (both split at the same row); start = 0 makes ggml read
        // and write only inside these two slices; the type needs no importance matrix
        // (checked above), so passing null is allowed.
        unsafe {
            sys::ggml_quantize_chunk(
                ty.0,
                src_part.as_ptr(),
                dst_part.as_mut_ptr() as *mut c_void,
                0,
                rows,
                n_per_row as i64,
                std::ptr::null(),
            )
        };
    });
    Ok(())
}

/// Run `f` on matching row ranges of `src` (rows of `src_row` items) and `dst` (rows of
/// `dst_row` items), one range per worker thread.
fn for_row_chunks<S: Sync, D: Send>(
    src: &[S],
    src_row: usize,
    dst: &mut [D],
    dst_row: usize,
    f: impl Fn(&[S], &mut [D]) + Sync,
) {
    let n_rows = src.len() / src_row.max(1);
    let rows_per = n_rows.div_ceil(worker_threads().min(n_rows.max(1))).max(1);
    std::thread::scope(|s| {
        for (a, b) in src.chunks(rows_per * src_row).zip(dst.chunks_mut(rows_per * dst_row)) {
            let f = &f;
            s.spawn(move || f(a, b));
        }
    });
}

fn worker_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// Logging: ggml and llama.cpp print through one hook; route it into the `log` crate and keep the
// error lines of this thread since the last take, so a failed gguf_init can say why.

thread_local! {
    static LAST_GGML_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

unsafe extern "C" fn log_hook(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a valid NUL-terminated string that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    match level {
        sys::GGML_LOG_LEVEL_ERROR => {
            // Keep every error line of the failing call, the first (the cause) first, without
            // ggml's function-name prefix.
            let line = match msg.split_once(": ") {
                Some((f, rest)) if f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => rest,
                _ => msg,
            };
            LAST_GGML_ERROR.with(|e| {
                let mut e = e.borrow_mut();
                if e.len() > 4096 {
                    return; // nobody took them: keep the first ones
                }
                if !e.is_empty() {
                    e.push_str("; ");
                }
                e.push_str(line);
            });
            log::debug!(target: "ggml", "{msg}");
        }
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => log::debug!(target: "ggml", "{msg}"),
        _ => log::trace!(target: "ggml", "{msg}"),
    }
}

/// Send ggml's and llama.cpp's log output to the `log` crate (once per process).
pub fn route_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: log_hook is a plain function valid for the whole program and ignores
        // user_data, so a null user_data is fine; both setters only store the pointers.
        unsafe {
            sys::ggml_log_set(Some(log_hook), std::ptr::null_mut());
            sys::llama_log_set(Some(log_hook), std::ptr::null_mut());
        }
    });
}

pub(crate) fn take_last_error() -> String {
    LAST_GGML_ERROR.with(|e| std::mem::take(&mut *e.borrow_mut()))
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(GgufArray),
}

/// A GGUF metadata array (GGUF arrays are homogeneous and not nested).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
            GgufValue::Array(_) => "array",
        }
    }
}

/// One tensor's entry in a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// None when the file names a type this ggml build does not know.
    pub ty: Option<GgmlType>,
    pub raw_type: u32,
    /// Dimensions in ggml order (ne[0] is the row length), trailing 1s removed.
    pub ne: Vec<u64>,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub size: u64,
}

/// An owned `gguf_context`: read from a file (metadata and tensor infos only), or built empty
/// to write one.
pub struct Gguf {
    ptr: NonNull<sys::gguf_context>,
}

// SAFETY: a gguf_context is plain heap data with no thread affinity; all mutation goes through
// &mut self.
unsafe impl Send for Gguf {}

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: ptr came from gguf_init_* and is freed exactly once, here.
        unsafe { sys::gguf_free(self.ptr.as_ptr()) };
    }
}

fn cstring(s: &str) -> Result<CString, FfiError> {
    CString::new(s).map_err(|_| FfiError::BadName(s.to_string(), usize::MAX))
}

impl Gguf {
    /// Read the header, metadata and tensor infos of a GGUF file (not the tensor data).
    /// The error is ggml's own description of what is wrong.
    pub fn open(path: &Path) -> Result<Gguf, FfiError> {
        route_logs();
        let cpath = cstring(&path.to_string_lossy())?;
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        take_last_error();
        // SAFETY: cpath is a valid C string; with no_alloc and a null ctx, ggml only reads the
        // file and returns either a new context or null.
        let ptr = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        NonNull::new(ptr).map(|ptr| Gguf { ptr }).ok_or_else(|| {
            let why = take_last_error();
            FfiError::Gguf(if why.is_empty() { "ggml could not parse it".into() } else { why })
        })
    }

    /// An empty context to build a new file in (alignment 32, GGUF v3).
    pub fn new_empty() -> Gguf {
        // SAFETY: no preconditions; returns a fresh context (ggml aborts on out-of-memory).
        let ptr = unsafe { sys::gguf_init_empty() };
        Gguf { ptr: NonNull::new(ptr).expect("gguf_init_empty returned null") }
    }

    fn c(&self) -> *const sys::gguf_context {
        self.ptr.as_ptr()
    }

    pub fn version(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_version(self.c()) }
    }

    pub fn alignment(&self) -> u64 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_alignment(self.c()) as u64 }
    }

    /// File offset of the data section.
    pub fn data_offset(&self) -> u64 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_data_offset(self.c()) as u64 }
    }

    pub fn n_kv(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_n_kv(self.c()) as usize }
    }

    /// Key of entry `i` (0 ≤ i < n_kv).
    pub fn key(&self, i: usize) -> String {
        assert!(i < self.n_kv());
        // SAFETY: i is in range (asserted); ggml returns a string owned by the context, which
        // outlives this borrow; it is copied before returning.
        unsafe { CStr::from_ptr(sys::gguf_get_key(self.c(), i as i64)) }.to_string_lossy().into_owned()
    }

    pub fn find_key(&self, key: &str) -> Option<usize> {
        let k = CString::new(key).ok()?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_key(self.c(), k.as_ptr()) };
        (id >= 0).then_some(id as usize)
    }

    /// All keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        (0..self.n_kv()).map(|i| self.key(i)).collect()
    }

    /// The value under `key`, or None if absent.
    pub fn get(&self, key: &str) -> Option<GgufValue> {
        self.find_key(key).map(|i| self.value(i))
    }

    /// Value of entry `i` (0 ≤ i < n_kv), whatever its type.
    pub fn value(&self, i: usize) -> GgufValue {
        assert!(i < self.n_kv());
        let c = self.c();
        let id = i as i64;
        // SAFETY (all calls below): id is in range; each getter is called only for the type
        // gguf_get_kv_type reported, which is ggml's precondition (it aborts otherwise).
        let ty = unsafe { sys::gguf_get_kv_type(c, id) };
        unsafe {
            match ty {
                sys::GGUF_TYPE_UINT8 => GgufValue::U8(sys::gguf_get_val_u8(c, id)),
                sys::GGUF_TYPE_INT8 => GgufValue::I8(sys::gguf_get_val_i8(c, id)),
                sys::GGUF_TYPE_UINT16 => GgufValue::U16(sys::gguf_get_val_u16(c, id)),
                sys::GGUF_TYPE_INT16 => GgufValue::I16(sys::gguf_get_val_i16(c, id)),
                sys::GGUF_TYPE_UINT32 => GgufValue::U32(sys::gguf_get_val_u32(c, id)),
                sys::GGUF_TYPE_INT32 => GgufValue::I32(sys::gguf_get_val_i32(c, id)),
                sys::GGUF_TYPE_FLOAT32 => GgufValue::F32(sys::gguf_get_val_f32(c, id)),
                sys::GGUF_TYPE_BOOL => GgufValue::Bool(sys::gguf_get_val_bool(c, id)),
                sys::GGUF_TYPE_STRING => {
                    GgufValue::Str(CStr::from_ptr(sys::gguf_get_val_str(c, id)).to_string_lossy().into_owned())
                }
                sys::GGUF_TYPE_UINT64 => GgufValue::U64(sys::gguf_get_val_u64(c, id)),
                sys::GGUF_TYPE_INT64 => GgufValue::I64(sys::gguf_get_val_i64(c, id)),
                sys::GGUF_TYPE_FLOAT64 => GgufValue::F64(sys::gguf_get_val_f64(c, id)),
                sys::GGUF_TYPE_ARRAY => GgufValue::Array(self.array(id)),
                other => unreachable!("ggml accepted unknown GGUF type {other}"),
            }
        }
    }

    fn array(&self, id: i64) -> GgufArray {
        let c = self.c();
        // SAFETY: id is a valid key of type ARRAY (checked by the caller).
        let (ety, n) = unsafe { (sys::gguf_get_arr_type(c, id), sys::gguf_get_arr_n(c, id)) };
        if ety == sys::GGUF_TYPE_STRING {
            let v = (0..n)
                .map(|j| {
                    // SAFETY: string array, j < n; the string is owned by the context and
                    // copied before the borrow ends.
                    unsafe { CStr::from_ptr(sys::gguf_get_arr_str(c, id, j)) }.to_string_lossy().into_owned()
                })
                .collect();
            return GgufArray::Str(v);
        }
        let esize = match ety {
            sys::GGUF_TYPE_UINT8 | sys::GGUF_TYPE_INT8 | sys::GGUF_TYPE_BOOL => 1,
            sys::GGUF_TYPE_UINT16 | sys::GGUF_TYPE_INT16 => 2,
            sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_INT32 | sys::GGUF_TYPE_FLOAT32 => 4,
            _ => 8,
        };
        // SAFETY: non-string array: ggml returns a pointer to n contiguous elements of esize
        // bytes owned by the context (n = 0 may give any pointer, so it is not dereferenced).
        let bytes: &[u8] = if n == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(sys::gguf_get_arr_data(c, id) as *const u8, n * esize) }
        };
        fn conv<T: bytemuck::AnyBitPattern>(b: &[u8], size: usize) -> Vec<T> {
            b.chunks_exact(size).map(bytemuck::pod_read_unaligned).collect()
        }
        match ety {
            sys::GGUF_TYPE_UINT8 => GgufArray::U8(bytes.to_vec()),
            sys::GGUF_TYPE_INT8 => GgufArray::I8(conv(bytes, 1)),
            sys::GGUF_TYPE_BOOL => GgufArray::Bool(bytes.iter().map(|&b| b != 0).collect()),
            sys::GGUF_TYPE_UINT16 => GgufArray::U16(conv(bytes, 2)),
            sys::GGUF_TYPE_INT16 => GgufArray::I16(conv(bytes, 2)),
            sys::GGUF_TYPE_UINT32 => GgufArray::U32(conv(bytes, 4)),
            sys::GGUF_TYPE_INT32 => GgufArray::I32(conv(bytes, 4)),
            sys::GGUF_TYPE_FLOAT32 => GgufArray::F32(conv(bytes, 4)),
            sys::GGUF_TYPE_UINT64 => GgufArray::U64(conv(bytes, 8)),
            sys::GGUF_TYPE_INT64 => GgufArray::I64(conv(bytes, 8)),
            _ => GgufArray::F64(conv(bytes, 8)),
        }
    }

    pub fn n_tensors(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_n_tensors(self.c()) as usize }
    }

    /// Info of tensor `i` (0 ≤ i < n_tensors).
    pub fn tensor(&self, i: usize) -> GgufTensorInfo {
        assert!(i < self.n_tensors());
        let c = self.c();
        let id = i as i64;
        // SAFETY: id in range (asserted). The name is owned by the context and copied; ne points
        // to GGML_MAX_DIMS (4) elements owned by the context.
        unsafe {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(c, id)).to_string_lossy().into_owned();
            let ne_ptr = sys::gguf_get_tensor_ne(c, id);
            let mut ne: Vec<u64> = std::slice::from_raw_parts(ne_ptr, 4).iter().map(|&x| x as u64).collect();
            while ne.len() > 1 && ne[ne.len() - 1] == 1 {
                ne.pop();
            }
            let raw_type = sys::gguf_get_tensor_type(c, id);
            GgufTensorInfo {
                name,
                ty: GgmlType::from_raw(raw_type),
                raw_type,
                ne,
                offset: sys::gguf_get_tensor_offset(c, id) as u64,
                size: sys::gguf_get_tensor_size(c, id) as u64,
            }
        }
    }

    pub fn tensors(&self) -> Vec<GgufTensorInfo> {
        (0..self.n_tensors()).map(|i| self.tensor(i)).collect()
    }

    pub fn find_tensor(&self, name: &str) -> Option<usize> {
        let n = CString::new(name).ok()?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_tensor(self.c(), n.as_ptr()) };
        (id >= 0).then_some(id as usize)
    }

    /// Set `key` to `value` (replacing any earlier value).
    pub fn set(&mut self, key: &str, value: &GgufValue) -> Result<(), FfiError> {
        if key == "general.alignment" {
            // ggml aborts on a non-u32 or non-power-of-two alignment, and does not apply a new
            // alignment to a context it did not read; sage writes the default alignment only.
            return Err(FfiError::Gguf("general.alignment cannot be set by sage".into()));
        }
        let k = cstring(key)?;
        let c = self.ptr.as_ptr();
        let kp = k.as_ptr();
        // SAFETY (all calls below): valid context and key string; ggml copies the key and the
        // value (strings and array data included) before returning.
        unsafe {
            match value {
                GgufValue::U8(v) => sys::gguf_set_val_u8(c, kp, *v),
                GgufValue::I8(v) => sys::gguf_set_val_i8(c, kp, *v),
                GgufValue::U16(v) => sys::gguf_set_val_u16(c, kp, *v),
                GgufValue::I16(v) => sys::gguf_set_val_i16(c, kp, *v),
                GgufValue::U32(v) => sys::gguf_set_val_u32(c, kp, *v),
                GgufValue::I32(v) => sys::gguf_set_val_i32(c, kp, *v),
                GgufValue::F32(v) => sys::gguf_set_val_f32(c, kp, *v),
                GgufValue::Bool(v) => sys::gguf_set_val_bool(c, kp, *v),
                GgufValue::Str(s) => {
                    let cs = cstring(s)?;
                    sys::gguf_set_val_str(c, kp, cs.as_ptr())
                }
                GgufValue::U64(v) => sys::gguf_set_val_u64(c, kp, *v),
                GgufValue::I64(v) => sys::gguf_set_val_i64(c, kp, *v),
                GgufValue::F64(v) => sys::gguf_set_val_f64(c, kp, *v),
                GgufValue::Array(a) => {
                    fn raw<T: bytemuck::NoUninit>(v: &[T]) -> (*const c_void, usize) {
                        (bytemuck::cast_slice::<T, u8>(v).as_ptr() as *const c_void, v.len())
                    }
                    let bools: Vec<u8>;
                    let (ty, (p, n)) = match a {
                        GgufArray::Str(v) => {
                            let cs = v.iter().map(|s| cstring(s)).collect::<Result<Vec<_>, _>>()?;
                            let ptrs: Vec<*const c_char> = cs.iter().map(|s| s.as_ptr()).collect();
                            sys::gguf_set_arr_str(c, kp, ptrs.as_ptr() as *mut *const c_char, ptrs.len());
                            return Ok(());
                        }
                        GgufArray::U8(v) => (sys::GGUF_TYPE_UINT8, raw(v)),
                        GgufArray::I8(v) => (sys::GGUF_TYPE_INT8, raw(v)),
                        GgufArray::Bool(v) => {
                            bools = v.iter().map(|&b| b as u8).collect();
                            (sys::GGUF_TYPE_BOOL, raw(&bools))
                        }
                        GgufArray::U16(v) => (sys::GGUF_TYPE_UINT16, raw(v)),
                        GgufArray::I16(v) => (sys::GGUF_TYPE_INT16, raw(v)),
                        GgufArray::U32(v) => (sys::GGUF_TYPE_UINT32, raw(v)),
                        GgufArray::I32(v) => (sys::GGUF_TYPE_INT32, raw(v)),
                        GgufArray::F32(v) => (sys::GGUF_TYPE_FLOAT32, raw(v)),
                        GgufArray::U64(v) => (sys::GGUF_TYPE_UINT64, raw(v)),
                        GgufArray::I64(v) => (sys::GGUF_TYPE_INT64, raw(v)),
                        GgufArray::F64(v) => (sys::GGUF_TYPE_FLOAT64, raw(v)),
                    };
                    sys::gguf_set_arr_data(c, kp, ty, p, n)
                }
            }
        }
        Ok(())
    }

    pub fn remove_key(&mut self, key: &str) {
        if let Ok(k) = CString::new(key) {
            // SAFETY: valid context and C string; removing an absent key is a no-op.
            unsafe { sys::gguf_remove_key(self.ptr.as_ptr(), k.as_ptr()) };
        }
    }

    /// Declare a tensor (its data is written separately, in declaration order, by the caller).
    pub fn add_tensor(&mut self, name: &str, ty: GgmlType, ne: &[u64]) -> Result<(), FfiError> {
        // GGML_MAX_NAME in ggml.h (a macro bindgen does not export).
        const MAX_NAME: usize = 64;
        if name.len() >= MAX_NAME || name.contains('\0') {
            return Err(FfiError::BadName(name.to_string(), MAX_NAME - 1));
        }
        if ne.is_empty()
            || ne.len() > 4
            || ty.tensor_size(ne).is_none()
            || ne.iter().any(|&n| n == 0 || n > i64::MAX as u64)
        {
            return Err(FfiError::RowNotBlock {
                name: name.to_string(),
                ty,
                ne0: ne.first().copied().unwrap_or(0),
                blck: ty.block_size(),
            });
        }
        if self.find_tensor(name).is_some() {
            return Err(FfiError::Gguf(format!("duplicate tensor name '{name}'")));
        }
        let cname = cstring(name)?;
        let ne_i: Vec<i64> = ne.iter().map(|&n| n as i64).collect();
        // SAFETY: a no_alloc context sized for one tensor header; ggml_new_tensor only records
        // the shape (row size checked above so it does not assert); gguf_add_tensor copies the
        // tensor struct (name included), so freeing the ggml context right after is fine; the
        // name is unique (checked above) and shorter than GGML_MAX_NAME.
        unsafe {
            let params = sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() + 256,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            };
            let gctx = sys::ggml_init(params);
            assert!(!gctx.is_null(), "ggml_init failed");
            let t = sys::ggml_new_tensor(gctx, ty.0, ne_i.len() as i32, ne_i.as_ptr());
            sys::ggml_set_name(t, cname.as_ptr());
            sys::gguf_add_tensor(self.ptr.as_ptr(), t);
            sys::ggml_free(gctx);
        }
        Ok(())
    }

    /// The header, metadata and tensor infos as they are written to a file, padded to the
    /// alignment; tensor data follows at `tensor(i).offset` from its end.
    pub fn meta_bytes(&self) -> Vec<u8> {
        // SAFETY: valid context; gguf_get_meta_data writes exactly gguf_get_meta_size bytes.
        unsafe {
            let n = sys::gguf_get_meta_size(self.c());
            let mut buf = vec![0u8; n];
            sys::gguf_get_meta_data(self.c(), buf.as_mut_ptr() as *mut c_void);
            buf
        }
    }
}

// ---------------------------------------------------------------------------------------------
// llama.cpp's own quantizer (a reference for conversion speed)

/// Re-quantize a whole GGUF with `llama_model_quantize`, every quantizable tensor to q4_K
/// (`pure`), on `nthread` threads; as `llama-quantize --pure IN OUT Q4_K_S` does.
pub fn llama_quantize_pure_q4_k(input: &Path, output: &Path, nthread: i32) -> Result<(), FfiError> {
    route_logs();
    let (i, o) = (cstring(&input.to_string_lossy())?, cstring(&output.to_string_lossy())?);
    // SAFETY: default params are plain values; the pointers in them are null (no imatrix or
    // overrides), which llama.cpp accepts.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = nthread;
    params.ftype = sys::LLAMA_FTYPE_MOSTLY_Q4_K_S;
    params.pure_ = true;
    // SAFETY: both paths are valid C strings and params lives across the call.
    let rc = unsafe { sys::llama_model_quantize(i.as_ptr(), o.as_ptr(), &params) };
    if rc == 0 {
        Ok(())
    } else {
        Err(FfiError::Gguf(format!("llama_model_quantize failed ({rc}): {}", take_last_error())))
    }
}

// ---------------------------------------------------------------------------------------------
// File mappings

/// A read-only memory map of a whole file: safetensors files (to validate their headers;
/// the converter reads data with `pread`) and expert shards (the engine copies experts from
/// them into the arena). Reading a mapping whose file another process truncates raises
/// SIGBUS; the engine checks shard sizes when it opens them, not while it runs.
pub struct Mapped {
    map: memmap2::Mmap,
}

impl Mapped {
    pub fn open(file: &File) -> std::io::Result<Mapped> {
        // SAFETY: the mapping is read-only and private to this process; sage never writes the
        // files it maps. The file could still be truncated by another process while mapped;
        // callers only touch ranges they checked against the file's length just before.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Mapped { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_sizes_match_ggml_block_layout() {
        // Block layouts as documented in ggml-common.h.
        assert_eq!(GgmlType::Q4_K.row_size(256), Some(144));
        assert_eq!(GgmlType::Q8_0.row_size(64), Some(68));
        assert_eq!(GgmlType::Q6_K.row_size(512), Some(420));
        assert_eq!(GgmlType::F16.row_size(3), Some(6));
        assert_eq!(GgmlType::Q4_K.row_size(128), None);
        assert_eq!(GgmlType::Q2_K.name(), "q2_K");
        assert!(GgmlType::from_raw(4).is_none(), "Q4_2 was removed from ggml");
        assert!(GgmlType::from_raw(10_000).is_none());
    }

    #[test]
    fn quantize_round_trip_within_q8_tolerance() {
        // q8_0 keeps 8 bits per weight with one f16 scale d = max|x|/127 per block of 32: the
        // error is at most half a step (d/2) plus the f16 rounding of d times |q| <= 127
        // (127 * 2^-11 * d < 0.07 d); 0.6 d bounds both.
        let src: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let q = quantize(GgmlType::Q8_0, &src, 256).unwrap();
        assert_eq!(q.len(), 2 * 8 * 34);
        let back = dequantize(GgmlType::Q8_0, &q, 256).unwrap();
        for (blk_src, blk_back) in src.chunks(32).zip(back.chunks(32)) {
            let tol = 0.6 * blk_src.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (a, b) in blk_src.iter().zip(blk_back) {
                assert!((a - b).abs() <= tol, "{a} vs {b}");
            }
        }
        assert!(matches!(dequantize(GgmlType::Q8_0, &q[..100], 256), Err(FfiError::BadLength { .. })));
    }

    #[test]
    fn gguf_kv_round_trip_through_meta() {
        let mut g = Gguf::new_empty();
        g.set("a.u32", &GgufValue::U32(7)).unwrap();
        g.set("a.s", &GgufValue::Str("héllo".into())).unwrap();
        g.set("a.arr", &GgufValue::Array(GgufArray::U64(vec![1, u64::MAX]))).unwrap();
        g.set("a.strs", &GgufValue::Array(GgufArray::Str(vec!["x".into(), "".into()]))).unwrap();
        g.add_tensor("t", GgmlType::Q8_0, &[64, 2]).unwrap();
        assert!(g.add_tensor("t", GgmlType::F32, &[1]).is_err(), "duplicate names are refused");
        assert!(g.add_tensor("u", GgmlType::Q4_K, &[128]).is_err(), "128 is not a q4_K row");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let mut bytes = g.meta_bytes();
        bytes.extend(vec![0u8; 136]);
        std::fs::write(&p, &bytes).unwrap();
        let r = Gguf::open(&p).unwrap();
        assert_eq!(r.get("a.u32"), Some(GgufValue::U32(7)));
        assert_eq!(r.get("a.s"), Some(GgufValue::Str("héllo".into())));
        assert_eq!(r.get("a.arr"), Some(GgufValue::Array(GgufArray::U64(vec![1, u64::MAX]))));
        assert_eq!(r.get("a.strs"), Some(GgufValue::Array(GgufArray::Str(vec!["x".into(), "".into()]))));
        let t = r.tensor(0);
        assert_eq!((t.name.as_str(), t.ty, t.ne.clone(), t.size), ("t", Some(GgmlType::Q8_0), vec![64, 2], 136));
        assert_eq!(r.data_offset() as usize, bytes.len() - 136);
    }

    #[test]
    fn gguf_open_reports_ggml_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00").unwrap();
        let err = Gguf::open(&p).err().unwrap();
        assert!(matches!(err, FfiError::Gguf(ref m) if !m.is_empty()), "{err}");
    }
}

mod compute;
pub use compute::*;
mod llama;
pub use llama::{LlamaRunOptions, LlamaRunner};
