//! ggml's tensor types (block sizes, row sizes, what each can do) and its quantizer and
//! dequantizer, run row-parallel.

use std::ffi::{c_void, CStr};

use llama_cpp_sys_2 as sys;

use super::FfiError;

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
    /// OCP microscaling FP4 (gpt-oss's experts): 32 E2M1 values and one E8M0 scale per block.
    pub const MXFP4: GgmlType = GgmlType(sys::GGML_TYPE_MXFP4);
    /// ggml's 8-bit integer type (used for raw byte regions).
    pub const I8: GgmlType = GgmlType(sys::GGML_TYPE_I8);
    pub const I32: GgmlType = GgmlType(sys::GGML_TYPE_I32);
    pub const I64: GgmlType = GgmlType(sys::GGML_TYPE_I64);

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
}
