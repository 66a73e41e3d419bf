//! GGUF files: an owned `gguf_context` read from a file (metadata and tensor infos) or built
//! to be written.

use std::ffi::{c_char, c_void, CStr, CString};
use std::fs::File;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{cstring, route_logs, take_last_error, FfiError, GgmlType};

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

impl Gguf {
    /// Open a GGUF file as `open` does and check that every tensor's data lies inside it;
    /// with the file, for reading tensor data, and the tensor infos.
    pub fn open_checked(path: &Path) -> crate::Result<(Gguf, File, Vec<GgufTensorInfo>)> {
        use crate::error::{Error, IoContext};
        let file = File::open(path).at(path)?;
        let gguf = Gguf::open(path).map_err(|e| Error::BadGguf { path: path.to_path_buf(), reason: e.to_string() })?;
        let len = file.metadata().at(path)?.len();
        let data = gguf.data_offset();
        let infos = gguf.tensors();
        for t in &infos {
            let end = data.saturating_add(t.offset).saturating_add(t.size);
            if end > len {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    what: format!("tensor '{}'", t.name),
                    needed: end,
                    got: len,
                });
            }
        }
        Ok((gguf, file, infos))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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
