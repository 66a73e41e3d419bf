//! Shared helpers: fixture paths, the stored transformers reference, temp directories,
//! conversions, and llama.cpp (through llama-cpp-2) as the reference engine.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use safetensors::SafeTensors;
use sage::convert::{convert, ConvertOptions, ConvertReport};
use sage::ggml::GgmlType;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Published model configs (configs/README.md).
pub fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

pub fn plain() -> PathBuf {
    fixtures().join("tiny-qwen3moe")
}

pub fn omni() -> PathBuf {
    fixtures().join("tiny-qwen3-omni")
}

/// The bundled trained model (scripts/train_model.py).
pub fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sage-moe-16m")
}

/// The bundled 128-expert top-8 model (scripts/train_model.py, Qwen3-30B-A3B's routing shape).
pub fn bundled128() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sage-moe-28m")
}

/// Held by a test that writes and loads gigabytes (the real-shaped synthetic layers): one at a
/// time, so that two of them never share this machine's memory and page cache (24 GiB, no
/// swap) and push each other's files out of it; the lighter tests run beside. (The budget
/// test runs in a memory cgroup of about a GiB and takes no part.)
pub fn big_test() -> std::sync::MutexGuard<'static, ()> {
    static BIG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed big test poisons the lock; the next one runs all the same.
    BIG.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("sage-test-").tempdir().unwrap()
}

/// One prompt of the transformers reference (scripts/make_fixtures.py).
pub struct RefPrompt {
    pub name: String,
    pub text: String,
    pub ids: Vec<i32>,
    /// [n_tokens][n_vocab], f32 transformers, eager attention.
    pub logits: Vec<Vec<f32>>,
    /// The same with routing restricted to `reference_pool()`.
    pub pool_logits: Vec<Vec<f32>>,
}

/// The transformers reference of the Qwen3-MoE fixture (scripts/make_fixtures.py).
pub fn reference() -> Vec<RefPrompt> {
    reference_from("reference").0
}

pub fn reference_pool() -> Vec<u32> {
    reference_from("reference").1
}

/// The prompts and the pool of `fixtures/{name}.json` and `.safetensors`.
pub fn reference_from(name: &str) -> (Vec<RefPrompt>, Vec<u32>, serde_json::Value) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
    let bytes = std::fs::read(fixtures().join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = |name: &str| -> Vec<Vec<f32>> {
        let t = st.tensor(name).unwrap();
        let n_vocab = t.shape()[1];
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        v.chunks(n_vocab).map(|r| r.to_vec()).collect()
    };
    let prompts = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            let ids = st.tensor(&format!("{name}.ids")).unwrap();
            RefPrompt {
                text: p["text"].as_str().unwrap().to_string(),
                ids: ids.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(),
                logits: rows(&format!("{name}.logits")),
                pool_logits: rows(&format!("{name}.pool_logits")),
                name,
            }
        })
        .collect();
    let pool = meta["pool"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (prompts, pool, meta)
}

pub fn opts(quant: Option<GgmlType>) -> ConvertOptions {
    ConvertOptions { quant_base: quant, quant_experts: quant, ..Default::default() }
}

/// Convert `input` into `<tmp>/model`.
pub fn convert_into(input: &Path, dir: &Path, opts: &ConvertOptions) -> (PathBuf, ConvertReport) {
    let out = dir.join("model");
    let r = convert(input, &out, opts).unwrap_or_else(|e| panic!("converting {}: {e}", input.display()));
    (out, r)
}

/// Copy a fixture checkpoint so a test can damage it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Rewrite a safetensors file through `edit` on (name -> (dtype, shape, bytes)).
pub fn rewrite_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: BTreeMap<_, _> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut m);
    let views: Vec<(String, safetensors::tensor::TensorView)> = m
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// llama.cpp as the reference engine

pub fn backend() -> &'static LlamaBackend {
    static B: OnceLock<LlamaBackend> = OnceLock::new();
    B.get_or_init(|| {
        sage::ggml::route_logs();
        LlamaBackend::init().unwrap()
    })
}

/// llama.cpp with its default parameters.
pub fn load_llama(gguf: &Path) -> LlamaModel {
    LlamaModel::load_from_file(backend(), gguf, &LlamaModelParams::default())
        .unwrap_or_else(|e| panic!("llama.cpp failed to load {}: {e}", gguf.display()))
}

/// How the reference llama.cpp context is set up: flash attention always off (sage's
/// attention is the unfused one), 256 tokens of context, 2 threads.
#[derive(Clone, Copy)]
pub struct LlamaCtx {
    /// K and V cache type.
    pub kv: KvCacheType,
    /// Most tokens per graph: llama.cpp splits a longer batch into ubatches of this size.
    pub n_ubatch: u32,
    /// Flash attention on (`-fa on`); off by default.
    pub flash: bool,
    /// Context length.
    pub n_ctx: u32,
    /// Sliding layers in a full-length cache (`--swa-full`; llama.cpp's default, true).
    pub swa_full: bool,
}

impl Default for LlamaCtx {
    /// f32 KV and one graph per batch: the setting that agrees tightly with an f32
    /// transformers reference.
    fn default() -> Self {
        LlamaCtx { kv: KvCacheType::F32, n_ubatch: 256, flash: false, n_ctx: 256, swa_full: true }
    }
}

pub fn llama_context(model: &LlamaModel) -> llama_cpp_2::context::LlamaContext<'_> {
    llama_context_with(model, LlamaCtx::default())
}

pub fn llama_context_with(model: &LlamaModel, c: LlamaCtx) -> llama_cpp_2::context::LlamaContext<'_> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(c.n_ctx))
        .with_n_batch(c.n_ctx)
        .with_swa_full(c.swa_full)
        .with_n_ubatch(c.n_ubatch)
        .with_n_threads(2)
        .with_n_threads_batch(2)
        .with_type_k(c.kv)
        .with_type_v(c.kv)
        .with_flash_attention_policy(if c.flash {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        });
    model.new_context(backend(), params).unwrap()
}

/// llama.cpp's logits at every position of `ids`, evaluating one token per decode call.
pub fn llama_logits_stepwise(model: &LlamaModel, ids: &[i32]) -> Vec<Vec<f32>> {
    llama_logits_split(model, ids, 0, LlamaCtx::default())
}

/// llama.cpp's logits at every position of `ids`, all in one batch.
pub fn llama_logits(model: &LlamaModel, ids: &[i32]) -> Vec<Vec<f32>> {
    llama_logits_with(model, ids, LlamaCtx::default())
}

/// llama.cpp's logits at every position of `ids` given as one batch (split into ubatches as
/// `c.n_ubatch` says).
pub fn llama_logits_with(model: &LlamaModel, ids: &[i32], c: LlamaCtx) -> Vec<Vec<f32>> {
    llama_logits_split(model, ids, ids.len(), c)
}

/// llama.cpp's logits at every position of `ids`: the first `batch` tokens in one decode
/// call, then one token per call (llama.cpp's decode step).
pub fn llama_logits_split(model: &LlamaModel, ids: &[i32], batch: usize, c: LlamaCtx) -> Vec<Vec<f32>> {
    let mut ctx = llama_context_with(model, c);
    let mut out = Vec::new();
    if batch > 0 {
        let mut b = LlamaBatch::new(batch, 1);
        for (i, &id) in ids[..batch].iter().enumerate() {
            b.add(llama_cpp_2::token::LlamaToken(id), i as i32, &[0], true).unwrap();
        }
        ctx.decode(&mut b).unwrap();
        out.extend((0..batch).map(|i| ctx.get_logits_ith(i as i32).to_vec()));
    }
    for (i, &id) in ids.iter().enumerate().skip(batch) {
        let mut b = LlamaBatch::new(1, 1);
        b.add(llama_cpp_2::token::LlamaToken(id), i as i32, &[0], true).unwrap();
        ctx.decode(&mut b).unwrap();
        out.push(ctx.get_logits_ith(0).to_vec());
    }
    out
}

/// llama.cpp greedy decoding: the prompt in one batch, then one token at a time, argmax.
pub fn llama_greedy(model: &LlamaModel, prompt: &[i32], n: usize) -> Vec<i32> {
    let mut ctx = llama_context(model);
    let mut batch = LlamaBatch::new(prompt.len(), 1);
    for (i, &id) in prompt.iter().enumerate() {
        batch.add(llama_cpp_2::token::LlamaToken(id), i as i32, &[0], i + 1 == prompt.len()).unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut last = (prompt.len() - 1) as i32;
    let mut out = Vec::new();
    for step in 0..n {
        let logits = ctx.get_logits_ith(last);
        let next =
            logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
                as i32;
        out.push(next);
        let mut b = LlamaBatch::new(1, 1);
        b.add(llama_cpp_2::token::LlamaToken(next), (prompt.len() + step) as i32, &[0], true).unwrap();
        ctx.decode(&mut b).unwrap();
        last = 0;
    }
    out
}

pub fn llama_tokenize(model: &LlamaModel, text: &str) -> Vec<i32> {
    model.vocab().tokenize(text.as_bytes(), false, true).into_iter().map(|t| t.0).collect()
}

pub fn tokenizers_ids(tokenizer_json: &Path, text: &str) -> Vec<i32> {
    let t = tokenizers::Tokenizer::from_file(tokenizer_json).unwrap();
    t.encode(text, false).unwrap().get_ids().iter().map(|&i| i as i32).collect()
}

/// `flat` ([n_tokens × n_vocab] as the engine returns it) as one row per position.
pub fn rows(flat: Vec<f32>, n_vocab: usize) -> Vec<Vec<f32>> {
    flat.chunks(n_vocab).map(|r| r.to_vec()).collect()
}

/// The engine as the reference comparisons run it: f32 KV cache, 2 threads, 256 positions.
pub fn exact(arena: sage::engine::ArenaSize) -> sage::engine::EngineOptions {
    sage::engine::EngineOptions {
        arena,
        k_type: sage::engine::KvType::F32,
        v_type: sage::engine::KvType::F32,
        threads: 2,
        n_ctx: 256,
        ..Default::default()
    }
}

/// sage's logits at every position of `ids` from an empty cache: the first `batch` tokens in
/// one `eval`, then one token per call (its decode step); as `llama_logits_split`.
pub fn sage_logits_split(e: &mut sage::engine::Engine, ids: &[u32], batch: usize) -> Vec<Vec<f32>> {
    let n_vocab = e.config.n_vocab as usize;
    e.reset();
    let mut out = if batch > 0 { rows(e.eval(&ids[..batch], true).unwrap(), n_vocab) } else { vec![] };
    for &t in &ids[batch..] {
        out.push(e.eval(&[t], false).unwrap());
    }
    out
}

/// The largest of per-position differences.
pub fn worst(d: &[f32]) -> f32 {
    d.iter().copied().fold(0f32, f32::max)
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "positions");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "vocab");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

/// At the smallest arena a batch runs its experts in groups, and ggml's quantized kernels
/// tile the rows each expert gets (repacked GEMM blocks, GEMV for the rest), so a row's
/// float sums can differ in the last bits; where such a difference moves an activation across
/// a q8 rounding step (activations are quantized for these kernels, one scale per row at
/// n_embd 256), the logits after it move by a few hundredths. llama.cpp's own batched and
/// one-token paths differ that way on these files: up to 7e-2 (qwen2moe q4_K, "mixed"),
/// 5e-2 (olmoe q8_0, "code"). A prompt may have one such position, within this bound; every
/// other position is held to the type's tolerance.
pub const ROUNDING_STEP_TOL: f32 = 0.1;

/// Every position within `tol` or, alone (the positions beside it within `tol`), within
/// `ROUNDING_STEP_TOL`: a q8 rounding step crossed in the last layer's output, which moves no
/// other position. Measured on GLM-4.5's fixture at q8_0 and the smallest arena (a scaled
/// sigmoid router, 16 experts over 4 slots): 4 of 31 positions by at most 4.5e-2, each alone;
/// the softmax families measure 0 there.
pub fn isolated_rounding_steps(d: &[f32], tol: f32) -> bool {
    let over = |i: usize| d.get(i).is_some_and(|&x| x > tol);
    d.iter().all(|&x| x <= ROUNDING_STEP_TOL) && (0..d.len()).all(|i| !(over(i) && over(i + 1)))
}

/// `isolated_rounding_steps`, or at most two positions beyond `tol` side by side: a scaled
/// sigmoid router at a k-quant, where a crossed step's last bits can cross another at the next
/// position (measured on DeepSeek-V3's fixture at q4_K and 4 slots: positions 8 and 9 of the
/// "fox" prompt by 5.8e-3 and 1.5e-2, 0 after).
pub fn scaled_router_rounding_steps(d: &[f32], tol: f32) -> bool {
    isolated_rounding_steps(d, tol)
        || d.iter().all(|&x| x <= ROUNDING_STEP_TOL) && d.iter().filter(|&&x| x > tol).count() <= 2
}

/// Max abs difference of `got` and `want` ([n_tokens][n_vocab]) per position.
pub fn per_position(got: &[Vec<f32>], want: &[Vec<f32>]) -> Vec<f32> {
    got.iter().zip(want).map(|(a, b)| max_abs_diff(std::slice::from_ref(a), std::slice::from_ref(b))).collect()
}

/// Every position within `ROUNDING_STEP_TOL`, and at least half of them within `tol`
/// (`synth::within_real_shape_tol`).
pub fn half_rounding_steps(d: &[f32], tol: f32) -> bool {
    d.iter().all(|&x| x <= ROUNDING_STEP_TOL) && 2 * d.iter().filter(|&&x| x > tol).count() <= d.len()
}

/// Every position within `tol`, but at most one within `ROUNDING_STEP_TOL` (see there).
pub fn close_but_one_rounding_step(d: &[f32], tol: f32) -> bool {
    d.iter().all(|&x| x <= ROUNDING_STEP_TOL) && d.iter().filter(|&&x| x > tol).count() <= 1
}

/// Perplexity of the second half of each window of `ids`, from llama.cpp's logits (here, not
/// through sage::eval); with `bos`, each window starts with it, as llama-perplexity does.
pub fn llama_cpp_ppl(gguf: &Path, ids: &[i32], window: usize, bos: Option<i32>) -> f64 {
    let model = load_llama(gguf);
    let (mut nll, mut n) = (0.0f64, 0usize);
    for w in ids.chunks_exact(window) {
        let mut w = w.to_vec();
        if let Some(b) = bos {
            w[0] = b;
        }
        let logits = llama_logits(&model, &w);
        for j in window / 2..window - 1 {
            let row = &logits[j];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll += max + z.ln() - row[w[j + 1] as usize] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

/// Max abs logit difference allowed between sage and llama.cpp on the same file (same KV
/// type, flash attention off, 2 threads), by the type the file was converted at, at every
/// position of the test prompts, with an f32 KV cache (`within_engine_tol` adds f16's).
/// Measured on the four families' fixtures (`engine::*_llama_cpp*`, `archs::*_engine_*`):
/// - every expert resident: 0, bit-identical at every type. One graph as llama.cpp's, the
///   same kernels and repacked layouts, and the same KV span (`sage::engine::KV_PAD`).
/// - a streaming arena adds an expert's output to the sum in another grouping:
///   - f32: 1e-4 (README's figure; measured at most 5e-6);
///   - q8_0: 0, measured 0 everywhere: its kernels quantize the activations the same way
///     whatever rows a batch gives an expert;
///   - q4_K and other k-quants: 1e-5 (measured at most 3e-6), and one position per prompt
///     may move by a q8 rounding step (`close_but_one_rounding_step`).
pub fn engine_tol(ty: GgmlType, streaming: bool) -> f32 {
    if !streaming || ty == GgmlType::Q8_0 {
        0.0
    } else if ty == GgmlType::F32 {
        1e-4
    } else {
        1e-5
    }
}

/// With an f16 KV cache, a streaming arena's last-bit differences (above) can move a cached
/// K or V value across an f16 rounding step (2^-11 relative), which moves the logits after it
/// by about that much: measured up to 1.7e-4 (f32 file) on the Qwen3 fixture.
pub const F16_KV_STEP_TOL: f32 = 1e-3;

/// Whether a streaming arena at `ty` may move one position of a prompt by a q8 rounding step
/// (see `ROUNDING_STEP_TOL`): k-quant kernels tile an expert's rows by how many it gets.
pub fn may_cross_rounding_step(ty: GgmlType) -> bool {
    ![GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0].contains(&ty)
}

/// `within_engine_tol` for a model with recurrent layers (`recurrent`), whose state carries a
/// crossed rounding step forward: the positions after it move too, by less as the state
/// decays (measured: Qwen3.5-35B-A3B's shape, 4 synthetic layers, q4_K at the smallest arena
/// in decode steps, 2.1e-3 and 3.9e-3 at two consecutive positions, 3e-6 after). There every
/// position is within `ROUNDING_STEP_TOL` and those before the first beyond the type's
/// tolerance within it.
pub fn within_engine_tol_of(d: &[f32], ty: GgmlType, streaming: bool, f16_kv: bool, recurrent: bool) -> bool {
    if !(recurrent && streaming && may_cross_rounding_step(ty)) {
        return within_engine_tol(d, ty, streaming, f16_kv);
    }
    let tol = if f16_kv { engine_tol(ty, streaming).max(F16_KV_STEP_TOL) } else { engine_tol(ty, streaming) };
    carried_rounding_step(d, tol)
}

/// `close_but_one_rounding_step` for a recurrent model (`within_engine_tol_of`): every position
/// within `ROUNDING_STEP_TOL`, those before the first beyond `tol` within `tol`.
pub fn carried_rounding_step(d: &[f32], tol: f32) -> bool {
    let first = d.iter().position(|&x| x > tol).unwrap_or(d.len());
    d.iter().all(|&x| x <= ROUNDING_STEP_TOL) && d[..first].iter().all(|&x| x <= tol)
}

/// `d` (per position) within sage's tolerance against llama.cpp at `ty` (`engine_tol`; with
/// `f16_kv`, also `F16_KV_STEP_TOL` where the arena streams).
pub fn within_engine_tol(d: &[f32], ty: GgmlType, streaming: bool, f16_kv: bool) -> bool {
    let mut tol = engine_tol(ty, streaming);
    if streaming && f16_kv && ty != GgmlType::Q8_0 {
        tol = tol.max(F16_KV_STEP_TOL);
    }
    if streaming && may_cross_rounding_step(ty) {
        close_but_one_rounding_step(d, tol)
    } else {
        d.iter().all(|&x| x <= tol)
    }
}
