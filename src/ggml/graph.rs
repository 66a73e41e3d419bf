//! Tensor contexts, tensors and their ops, compute graphs and the graph allocator. `Tensor<'c>`
//! handles borrow the context that holds them.

use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{route_logs, Backend, FfiError, GgmlType};

/// llama.cpp's NEOX RoPE mode (`GGML_ROPE_TYPE_NEOX` in ggml.h, a macro bindgen skips).
pub const ROPE_TYPE_NEOX: i32 = 2;
/// Interleaved M-RoPE (`GGML_ROPE_TYPE_IMROPE`): Qwen3-VL's and Qwen3.5's, through
/// `ggml_rope_multi`.
pub const ROPE_TYPE_IMROPE: i32 = 40;

pub(super) fn status(st: sys::ggml_status, what: &str) -> Result<(), FfiError> {
    if st == sys::GGML_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(FfiError::Gguf(format!("{what} failed with status {st}")))
    }
}

/// A ggml context holding tensor and graph metadata (never tensor data: `no_alloc`).
pub struct Context {
    pub(super) ptr: NonNull<sys::ggml_context>,
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
    pub(super) ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'c Context>,
}

impl<'c> Tensor<'c> {
    pub(super) fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives in its context, which outlives 'c.
        unsafe { self.ptr.as_ref() }
    }

    pub fn ne(&self) -> [i64; 4] {
        self.raw().ne
    }

    pub fn ty(&self) -> GgmlType {
        GgmlType(self.raw().type_)
    }

    pub fn nb(&self) -> [usize; 4] {
        self.raw().nb
    }

    pub fn nbytes(&self) -> usize {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_nbytes(self.ptr.as_ptr()) }
    }

    pub(super) fn data_ptr(&self) -> *mut c_void {
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

    /// Rows of a 2-D tensor `nb1` bytes apart (biases inside arena slots), before allocation.
    pub fn set_row_stride(&self, nb1: usize) {
        assert!(!self.is_allocated());
        let t = self.ptr.as_ptr();
        // SAFETY: the tensor is not allocated yet, so no computed size depends on nb; rows
        // never overlap (asserted).
        unsafe {
            assert!(nb1 >= (*t).nb[0] * (*t).ne[0] as usize);
            (*t).nb[1] = nb1;
            (*t).nb[2] = nb1 * (*t).ne[1] as usize;
            (*t).nb[3] = (*t).nb[2] * (*t).ne[2] as usize;
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

    pub fn write_i64(&self, v: &[i64]) {
        self.write(0, bytemuck::cast_slice(v));
    }

    /// Read `len` bytes of the tensor's data from byte `offset`.
    pub fn read_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(self.is_allocated() && offset + len <= self.nbytes(), "read past the tensor");
        let mut out = vec![0u8; len];
        // SAFETY: allocated tensor; [offset, offset + len) lies inside it (asserted) and fits `out`.
        unsafe { sys::ggml_backend_tensor_get(self.ptr.as_ptr(), out.as_mut_ptr() as *mut c_void, offset, len) };
        out
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

/// `ggml_rope_ext`'s parameters: rotated dimensions, mode (`GGML_ROPE_TYPE_*`), base, and
/// YaRN's (original context, frequency scale, extrapolation mix, attention factor, betas), as
/// llama.cpp passes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub n_dims: i32,
    pub mode: i32,
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
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
    /// Row i of `b` [ne0, n] (f32) into row `rows[i]` of `a` [ne0, ..] (converting to `a`'s
    /// type), `rows` an i64 [n]; the result aliases `a`. llama.cpp stores K and V this way.
    pub fn set_rows<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, rows: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_set_rows(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr(), rows.ptr.as_ptr()))
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
    /// `a` clamped to [min, max], elementwise.
    pub fn clamp<'a>(&'a self, a: Tensor<'a>, min: f32, max: f32) -> Tensor<'a> {
        op!(self, sys::ggml_clamp(self.c(), a.ptr.as_ptr(), min, max))
    }
    /// A tensor of `a`'s shape with every value `c`.
    pub fn fill<'a>(&'a self, a: Tensor<'a>, c: f32) -> Tensor<'a> {
        op!(self, sys::ggml_fill(self.c(), a.ptr.as_ptr(), c))
    }
    /// Sum of each row: [1, ne1, ...].
    pub fn sum_rows<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_sum_rows(self.c(), a.ptr.as_ptr()))
    }
    /// x · sigmoid(x), elementwise.
    pub fn silu<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_silu(self.c(), a.ptr.as_ptr()))
    }
    /// a / b (b broadcast over a).
    pub fn div<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_div(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr()))
    }
    /// RoPE of `a` [head_dim, n_head, n_tokens] at positions `pos` (i32 [n_tokens]), with
    /// `r`'s mode, base and YaRN parameters (plain RoPE: freq_scale 1, ext_factor 0).
    pub fn rope<'a>(&'a self, a: Tensor<'a>, pos: Tensor<'a>, r: &RopeParams) -> Tensor<'a> {
        op!(
            self,
            sys::ggml_rope_ext(
                self.c(),
                a.ptr.as_ptr(),
                pos.ptr.as_ptr(),
                std::ptr::null_mut(),
                r.n_dims,
                r.mode,
                r.n_ctx_orig,
                r.freq_base,
                r.freq_scale,
                r.ext_factor,
                r.attn_factor,
                r.beta_fast,
                r.beta_slow
            )
        )
    }
    /// M-RoPE of `a` [head_dim, n_head, n_tokens] at positions `pos` (i32 [4 * n_tokens], the
    /// four components of each position one after the other), the first `r.n_dims` dimensions
    /// of each head rotated, their frequencies assigned to the components by `sections`.
    pub fn rope_multi<'a>(&'a self, a: Tensor<'a>, pos: Tensor<'a>, sections: [i32; 4], r: &RopeParams) -> Tensor<'a> {
        let mut sections = sections;
        op!(
            self,
            sys::ggml_rope_multi(
                self.c(),
                a.ptr.as_ptr(),
                pos.ptr.as_ptr(),
                std::ptr::null_mut(),
                r.n_dims,
                sections.as_mut_ptr(),
                r.mode,
                r.n_ctx_orig,
                r.freq_base,
                r.freq_scale,
                r.ext_factor,
                r.attn_factor,
                r.beta_fast,
                r.beta_slow
            )
        )
    }
    /// The depthwise causal convolution of Mamba-style layers: `sx` [d_conv - 1 + n_t, d_inner,
    /// n_s] (the kept window, then the batch, along ne0) with kernels `c` [d_conv, d_inner];
    /// returns [d_inner, n_t, n_s].
    pub fn ssm_conv<'a>(&'a self, sx: Tensor<'a>, c: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_ssm_conv(self.c(), sx.ptr.as_ptr(), c.ptr.as_ptr()))
    }
    /// The gated delta rule over a batch (`ggml_gated_delta_net`, K = 1): q, k [S, H_k, n_t,
    /// n_s], v [S, H_v, n_t, n_s], gate g and beta [1, H_v, n_t, n_s], state [S, S, H_v, n_s].
    /// Returns the outputs [S, H_v, n_t, n_s] followed by the final state, flat (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn gated_delta_net<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        g: Tensor<'a>,
        beta: Tensor<'a>,
        state: Tensor<'a>,
    ) -> Tensor<'a> {
        op!(
            self,
            sys::ggml_gated_delta_net(
                self.c(),
                q.ptr.as_ptr(),
                k.ptr.as_ptr(),
                v.ptr.as_ptr(),
                g.ptr.as_ptr(),
                beta.ptr.as_ptr(),
                state.ptr.as_ptr(),
                1
            )
        )
    }
    /// `a` repeated (tiled) to the shape `ne`, each a multiple of `a`'s.
    pub fn repeat_4d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 4]) -> Tensor<'a> {
        op!(self, sys::ggml_repeat_4d(self.c(), a.ptr.as_ptr(), ne[0], ne[1], ne[2], ne[3]))
    }
    pub fn sigmoid<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_sigmoid(self.c(), a.ptr.as_ptr()))
    }
    pub fn softplus<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_softplus(self.c(), a.ptr.as_ptr()))
    }
    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        op!(self, sys::ggml_scale(self.c(), a.ptr.as_ptr(), s))
    }
    /// `a` and `b` one after the other along `dim`.
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        op!(self, sys::ggml_concat(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr(), dim))
    }
    pub fn reshape_4d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 4]) -> Tensor<'a> {
        op!(self, sys::ggml_reshape_4d(self.c(), a.ptr.as_ptr(), ne[0], ne[1], ne[2], ne[3]))
    }
    pub fn view_4d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 4], nb: [usize; 3], offset: usize) -> Tensor<'a> {
        op!(self, sys::ggml_view_4d(self.c(), a.ptr.as_ptr(), ne[0], ne[1], ne[2], ne[3], nb[0], nb[1], nb[2], offset))
    }
    /// `a` plus row `ids[i, j]` of `b` ([ne0, n_rows]) at `a[:, i, j]` (`a` [ne0, k, n], `ids`
    /// i32 [k, n]): per-expert biases after `mul_mat_id`.
    pub fn add_id<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        op!(self, sys::ggml_add_id(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr(), ids.ptr.as_ptr()))
    }
    /// gpt-oss's clamped SwiGLU of gate `a` and up `b`: x = min(a, limit), y = clamp(b, ±limit),
    /// x · sigmoid(alpha · x) · (y + 1).
    pub fn swiglu_oai<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, alpha: f32, limit: f32) -> Tensor<'a> {
        op!(self, sys::ggml_swiglu_oai(self.c(), a.ptr.as_ptr(), b.ptr.as_ptr(), alpha, limit))
    }
    /// `soft_max_ext` with attention sinks: one extra logit per head (`sinks`, f32 [n_head],
    /// heads along `a`'s dimension 2) in each row's normalization, with no output column.
    pub fn soft_max_ext_sinks<'a>(
        &'a self,
        a: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
        sinks: Tensor<'a>,
    ) -> Tensor<'a> {
        let t = self.soft_max_ext(a, mask, scale);
        // SAFETY: `t` is the soft_max node just made in this context and `sinks` a live tensor;
        // ggml only records `sinks` as the node's third source (asserting the op, the f32 type
        // and one sink per head).
        unsafe { sys::ggml_soft_max_add_sinks(t.ptr.as_ptr(), sinks.ptr.as_ptr()) };
        t
    }

    /// Attention in one fused op (`ggml_flash_attn_ext`): `q` [hd, n, n_head], `k` and `v`
    /// [hd, n_kv, n_head_kv] (V not transposed), `mask` f16 [n_kv, n] (contiguous); returns
    /// [hd, n_head, n] (heads before tokens). With `sinks` (f32 [n_head]) each row's
    /// normalization adds one logit per head, as `soft_max_ext_sinks`. Accumulates in f32, as
    /// llama.cpp asks for.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_ext<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
        sinks: Option<Tensor<'a>>,
    ) -> Tensor<'a> {
        // ggml aborts on these; check them here, where a bug in sage's graph code names itself.
        assert!(mask.raw().type_ == sys::GGML_TYPE_F16, "flash attention's mask must be f16");
        // SAFETY: valid tensor; a query.
        assert!(unsafe { sys::ggml_is_contiguous(mask.ptr.as_ptr()) }, "flash attention's mask must be contiguous");
        assert_eq!(k.ne()[0], q.ne()[0], "flash attention: K and Q head sizes");
        assert_eq!(k.ne()[1], v.ne()[1], "flash attention: K and V cells");
        let t = op!(
            self,
            sys::ggml_flash_attn_ext(
                self.c(),
                q.ptr.as_ptr(),
                k.ptr.as_ptr(),
                v.ptr.as_ptr(),
                mask.ptr.as_ptr(),
                scale,
                0.0,
                0.0
            )
        );
        // SAFETY: `t` is the flash-attention node just made; ggml only records `sinks` as its
        // fifth source (asserting the op and the f32 type) and the precision in its op params.
        unsafe {
            if let Some(s) = sinks {
                assert!(s.raw().type_ == sys::GGML_TYPE_F32, "attention sinks must be f32");
                sys::ggml_flash_attn_ext_add_sinks(t.ptr.as_ptr(), s.ptr.as_ptr());
            }
            sys::ggml_prec_set_acc(t.ptr.as_ptr(), sys::GGML_PREC_F32);
        }
        t
    }
    /// `a` converted to type `ty`.
    pub fn cast<'a>(&'a self, a: Tensor<'a>, ty: GgmlType) -> Tensor<'a> {
        op!(self, sys::ggml_cast(self.c(), a.ptr.as_ptr(), ty.0))
    }
    /// `a` as a contiguous [ne0, ne1] tensor (copied when it is a strided view).
    pub fn cont_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        op!(self, sys::ggml_cont_2d(self.c(), a.ptr.as_ptr(), ne0, ne1))
    }
    /// `rot` · each group of `rot.ne[0]` consecutive values of `a` (a Walsh-Hadamard rotation,
    /// `rot` [n, n] f32, orthonormal and symmetric), in `a`'s shape: how llama.cpp rotates
    /// Q, K and V around a quantized KV cache (`llama_mul_mat_hadamard`), with ggml's hint that
    /// `rot` is a Hadamard matrix.
    pub fn mul_mat_hadamard<'a>(&'a self, a: Tensor<'a>, rot: Tensor<'a>) -> Tensor<'a> {
        let n = rot.ne()[0];
        let ne = a.ne();
        let total = ne.iter().product::<i64>();
        assert_eq!(total % n, 0, "rotation of {n} over a tensor of {total} values");
        // SAFETY: valid tensor; a query.
        let x = if unsafe { sys::ggml_is_contiguous(a.ptr.as_ptr()) } {
            self.reshape_2d(a, n, total / n)
        } else {
            self.cont_2d(a, n, total / n)
        };
        let r = self.mul_mat(rot, x);
        // SAFETY: `r` is the mul_mat node just made; the hint is recorded in its op params.
        unsafe { sys::ggml_mul_mat_set_hint(r.ptr.as_ptr(), sys::GGML_HINT_SRC0_IS_HADAMARD) };
        op!(self, sys::ggml_reshape_4d(self.c(), r.ptr.as_ptr(), ne[0], ne[1], ne[2], ne[3]))
    }

    /// Bytes of the work buffer ggml's CPU backend needs to compute `graph` with `n_threads`
    /// threads (kept by the backend, grown to the largest graph, beside the compute buffer).
    pub fn cpu_work_size(graph: &Graph<'_>, n_threads: usize) -> usize {
        // SAFETY: valid graph; planning reads its nodes' ops, types and shapes, allocates nothing.
        unsafe { sys::ggml_graph_plan(graph.ptr.as_ptr(), n_threads.max(1) as i32, std::ptr::null_mut()).work_size }
    }

    pub fn graph(&self, nodes: usize) -> Graph<'_> {
        // SAFETY: valid context created with graph room (Context::new); null is checked.
        let p = unsafe { sys::ggml_new_graph_custom(self.c(), nodes, false) };
        Graph { ptr: NonNull::new(p).expect("ggml_new_graph_custom failed: context too small"), _ctx: PhantomData }
    }
}

/// A compute graph in a `Context`.
pub struct Graph<'c> {
    pub(super) ptr: NonNull<sys::ggml_cgraph>,
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

    /// Bytes `graph` needs, as `alloc` would lay it out; allocates nothing and leaves the graph
    /// as it was.
    pub fn measure(&mut self, graph: &Graph<'_>) -> usize {
        let mut size = 0usize;
        // SAFETY: valid allocator and graph; one buffer (single buffer type), so one size is
        // written; null buffer ids mean buffer 0 for every node and leaf.
        unsafe {
            sys::ggml_gallocr_reserve_n_size(
                self.ptr.as_ptr(),
                graph.ptr.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                &mut size,
            )
        };
        size
    }

    /// Allocate the buffer `graph` needs now, at its size, so that no graph up to that size
    /// makes the buffer grow later (llama.cpp reserves its worst-case graph the same way).
    pub fn reserve(&mut self, graph: &Graph<'_>) -> Result<(), FfiError> {
        // SAFETY: valid allocator and graph; the graph's tensors are left unallocated.
        if unsafe { sys::ggml_gallocr_reserve(self.ptr.as_ptr(), graph.ptr.as_ptr()) } {
            Ok(())
        } else {
            Err(FfiError::Gguf("could not reserve the compute buffer".into()))
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
