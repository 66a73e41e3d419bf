//! llama.cpp's own loader and decoder through its C API, for the one option llama-cpp-2
//! 0.1.160 does not expose: `use_extra_bufts`. With it off, llama.cpp keeps no repacked copy
//! of the weights on the CPU, so with mmap the weights stay in the mapped file's pages: the
//! fair llama.cpp-with-mmap baseline under a memory limit (examples/bench_one `--no-repack`).
//! Everything else (the references in tests) goes through llama-cpp-2.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{cstring, route_logs, take_last_error, FfiError, GgmlType};

#[derive(Clone, Debug)]
pub struct LlamaRunOptions {
    /// Map the file (else read it into memory).
    pub mmap: bool,
    /// Let llama.cpp copy repackable matrices into its CPU repacking buffers (its default).
    pub repack: bool,
    pub n_ctx: u32,
    /// Most tokens per `decode` call.
    pub n_batch: u32,
    pub threads: i32,
    /// Element type of the KV cache: F16 (llama.cpp's default) or F32.
    pub kv_type: GgmlType,
    /// Most tokens per graph (llama.cpp's `n_ubatch`; at most `n_batch`).
    pub n_ubatch: u32,
    /// Flash attention on (`-fa on`), else off.
    pub flash_attn: bool,
}

/// A llama.cpp model and one context over it (CPU), both freed in
/// `Drop`.
pub struct LlamaRunner {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    n_vocab: usize,
}

impl LlamaRunner {
    pub fn load(path: &Path, o: &LlamaRunOptions) -> Result<LlamaRunner, FfiError> {
        let fail = |what: &str| FfiError::Llama(format!("{}: {what}", path.display()));
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| fail("the path contains a NUL byte"))?;
        super::route_logs();
        // SAFETY: global initialization without preconditions; calling it again is harmless.
        unsafe { sys::llama_backend_init() };
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.load_mode = if o.mmap { sys::LLAMA_LOAD_MODE_MMAP } else { sys::LLAMA_LOAD_MODE_NONE };
        mp.use_extra_bufts = o.repack;
        mp.n_gpu_layers = 0;
        // SAFETY: a valid C string and parameters whose pointers are llama.cpp's defaults;
        // null (any load failure) is checked.
        let model = NonNull::new(unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) })
            .ok_or_else(|| fail("llama.cpp could not load the model"))?;
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = o.n_ctx;
        cp.n_batch = o.n_batch;
        cp.n_ubatch = o.n_ubatch.min(o.n_batch).max(1);
        cp.n_threads = o.threads;
        cp.n_threads_batch = o.threads;
        cp.type_k = o.kv_type.0;
        cp.type_v = o.kv_type.0;
        cp.flash_attn_type =
            if o.flash_attn { sys::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { sys::LLAMA_FLASH_ATTN_TYPE_DISABLED };
        // SAFETY: `model` is a live model; null (failure) is checked.
        let Some(ctx) = NonNull::new(unsafe { sys::llama_init_from_model(model.as_ptr(), cp) }) else {
            // SAFETY: the model was loaded above and nothing else refers to it.
            unsafe { sys::llama_model_free(model.as_ptr()) };
            return Err(fail("llama.cpp could not create a context"));
        };
        // SAFETY: live model; the vocabulary lives as long as it.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model.as_ptr())) };
        Ok(LlamaRunner { model, ctx, n_vocab: n_vocab.max(0) as usize })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Evaluate `tokens` (at most `n_batch`) after everything evaluated so far; returns the
    /// last token's logits.
    pub fn decode(&mut self, tokens: &[i32]) -> Result<Vec<f32>, FfiError> {
        if tokens.is_empty() || tokens.iter().any(|&t| t < 0 || t as usize >= self.n_vocab) {
            return Err(FfiError::Llama(format!("decode: token ids must be in 0..{} (got {tokens:?})", self.n_vocab)));
        }
        let mut ids = tokens.to_vec();
        // SAFETY: the batch points into `ids`, which outlives the decode call below.
        let batch = unsafe { sys::llama_batch_get_one(ids.as_mut_ptr(), ids.len() as i32) };
        // SAFETY: live context; a batch of valid token ids (checked above).
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), batch) };
        if rc != 0 {
            return Err(FfiError::Llama(format!("llama_decode returned {rc}")));
        }
        // SAFETY: live context that just produced the last token's logits (a batch from
        // llama_batch_get_one outputs the last token); null is checked.
        let p = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), -1) };
        if p.is_null() {
            return Err(FfiError::Llama("llama.cpp returned no logits".into()));
        }
        // SAFETY: llama.cpp's logits row holds n_vocab floats and stays valid until the next
        // decode; copied out at once.
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) }.to_vec())
    }
}

impl Drop for LlamaRunner {
    fn drop(&mut self) {
        // SAFETY: both were created in `load` and are freed once, the context first.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

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
