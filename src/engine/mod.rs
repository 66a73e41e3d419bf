//! The runtime: the base resident on a ggml backend, experts streamed from the shards into a
//! fixed-size arena, and the Qwen3-MoE forward pass built from ggml ops.
//!
//! When the arena holds every expert present (all of them, or a pool's), all are loaded with
//! the engine and a batch is one graph, the router included (`eval_fused`), as in llama.cpp.
//! Otherwise (the streaming mode) each layer and batch runs two graphs: (A) attention and the
//! router logits, read back so the router (`router.rs`) picks experts on the CPU; the
//! scheduler (`scheduler.rs`) makes them resident in arena slots; (B) the experts' SwiGLU FFN
//! through `mul_mat_id` over slot ids. When a batch needs more distinct experts in a layer
//! than the arena has slots, (B) runs once per group of experts, each group's contribution
//! added to the residual.

pub mod generate;
pub mod prefetch;
pub mod router;
pub mod sampler;
pub mod scheduler;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ggml::{
    Allocator, Backend, Buffer, Context, GgmlType, GgufValue, HostWriter, SharedBuffer, Tensor, TensorSet,
    ROPE_TYPE_NEOX,
};
use crate::io::{Record, WatchedFile, DIRECT_ALIGN};
use crate::model_dir::{ExpertLayer, ModelDir};
use crate::names::*;
use crate::usage::{RouteTrace, Usage};
use prefetch::{PrefetchGate, PrefetchStats, Prefetcher};
use router::route;
use scheduler::{SchedStats, Scheduler};

/// How big the expert arena is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArenaSize {
    /// At most this many bytes.
    Bytes(u64),
    /// This many expert slots.
    Experts(usize),
    /// One slot per expert present in the model directory.
    All,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvType {
    F32,
    F16,
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Device name: "cpu", "gpu", or one listed by `ggml::devices()`.
    pub device: String,
    pub threads: usize,
    /// KV cache length in tokens.
    pub n_ctx: usize,
    pub arena: ArenaSize,
    pub kv_type: KvType,
    /// Most tokens evaluated in one graph.
    pub n_batch: usize,
    /// On the CPU, keep quantized matrices in ggml's repacked layouts for its faster kernels,
    /// as llama.cpp does by default (base always; the arena as `arena_repack` says).
    pub repack: bool,
    /// Eviction policy of the arena (`scheduler::POLICIES`).
    pub policy: String,
    /// Leave expert bytes in the page cache after loading them (default: drop them, so a
    /// memory limit holds the arena, not a second copy of the experts).
    pub page_cache: bool,
    /// While a layer computes, read the next layer's predicted experts on an I/O thread: for a
    /// decode step into buffers, for a batch straight into reserved arena slots (a host arena
    /// in the files' layout). On by default: at Qwen3-30B-A3B scale with an arena of 25% of
    /// the experts it made decode 1.03–1.78× faster (median 1.09× over 6 alternating pairs)
    /// for 2% of its reads wasted, and a 512-token prompt 1.03–1.34× faster (median 1.12× over
    /// 5 pairs, docs/bench.md).
    pub prefetch: bool,
    /// Reads of a batch's missed experts kept in flight on the I/O thread ahead of the one
    /// being copied into its slot (0: each load reads its record itself, synchronously).
    pub read_ahead: usize,
    /// Whether the arena keeps experts in ggml's repacked layouts (with `repack`). None: only
    /// when every expert is resident (loaded once). A streaming arena stays in the file's
    /// layout, so a miss is a plain copy: repacking costs more than reading (about 1.8 ms
    /// against 0.4 ms for a Qwen3-30B-A3B expert at q4_K on 2 cores), more than the
    /// repacked kernels save on one use.
    pub arena_repack: Option<bool>,
    /// Threads that repack one expert into its slot (CPU repacked layouts); 0: `threads` for
    /// matrices of 256 KiB or more, one for smaller ones.
    pub load_threads: usize,
    /// Bytes per slice when base tensors are read from disk (repacked matrices go in slices
    /// of whole row groups, about this size).
    pub load_slice: usize,
    /// When the arena holds every expert present (a pool's, if the directory has one), load
    /// them all while loading the engine and evaluate each batch as one graph, the router on
    /// the backend (as llama.cpp does; a pooled layer's router logits are cut down to its
    /// experts). Off: the streaming path's two graphs per layer, whatever the arena.
    pub fused: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: "cpu".into(),
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n_ctx: 4096,
            arena: ArenaSize::All,
            kv_type: KvType::F16,
            n_batch: 512,
            repack: true,
            policy: "lru".into(),
            page_cache: false,
            prefetch: true,
            load_slice: 16 << 20,
            read_ahead: 2,
            load_threads: 0,
            arena_repack: None,
            fused: true,
        }
    }
}

/// Figures of a run (the scheduler's, plus time spent computing).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    pub sched: SchedStats,
    pub prefetch: PrefetchStats,
    pub tokens_evaluated: u64,
    pub compute: Duration,
}

/// Bytes the engine holds, by part (see `Engine::memory`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MemoryUse {
    /// Base weights (embeddings, attention, norms, routers, output).
    pub base: usize,
    /// The expert arena (fixed).
    pub arena: usize,
    /// The KV cache (fixed by --ctx).
    pub kv: usize,
    /// ggml's compute buffer (grows to the largest graph, then stays) and the activations
    /// carried between graphs.
    pub compute: usize,
    /// One expert record on its way from disk.
    pub staging: usize,
    /// The buffer that carried base tensors from disk while loading (freed after loading, so
    /// not part of `total`; it bounds what loading adds to the peak).
    pub load_buffer: usize,
}

impl MemoryUse {
    pub fn total(&self) -> usize {
        self.base + self.arena + self.kv + self.compute + self.staging
    }
}

/// Indices of one layer's tensors in the weight set.
struct LayerW {
    attn_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    q_norm: usize,
    k_norm: usize,
    ffn_norm: usize,
    router: usize,
}

pub struct Engine {
    pub config: ModelConfig,
    dir: ModelDir,
    backend: Backend,
    weights: TensorSet,
    _weights_buf: Buffer,
    /// The token embedding alone (plain layout: get_rows reads it).
    embd: TensorSet,
    _embd_buf: Buffer,
    layers: Vec<LayerW>,
    output_norm: usize,
    /// None when tied to the token embedding.
    output: Option<usize>,
    /// k[il]: [head_dim * n_head_kv, n_ctx]; v[il] transposed: [n_ctx, head_dim * n_head_kv].
    kv: TensorSet,
    _kv_buf: Buffer,
    /// Per layer gate/up/down views of the arena ([ne0, ne1, n_slots], slot stride apart),
    /// then one raw byte view of the whole arena (index 3 * n_layer).
    arena: TensorSet,
    arena_buf: Arc<SharedBuffer>,
    /// Writes into the arena from the I/O thread: when the arena is host memory in the files'
    /// layout (a plain copy loads a slot), for batches' reads straight into reserved slots.
    arena_writer: Option<HostWriter>,
    /// Where slot 0 starts in `arena_buf`.
    arena_head: usize,
    slot_stride: usize,
    /// hidden, ffn_inp, normed, moe_acc: [n_embd, n_batch] f32 carried between graphs.
    state: TensorSet,
    _state_buf: Buffer,
    alloc: Allocator,
    sched: Scheduler,
    shards: Arc<Vec<WatchedFile>>,
    /// The I/O thread: predicted experts (prefetch) and reads ahead of known misses.
    io: Prefetcher,
    /// Whether recent predictions were right enough to read them, and the last prediction
    /// (layer, experts not resident then), scored when that layer routes.
    gate: PrefetchGate,
    predicted: Option<(u32, Vec<u32>)>,
    /// One expert record on its way from a shard to the arena.
    staging: Record,
    /// Per layer: which experts exist (the pool).
    present: Vec<Vec<bool>>,
    opts: EngineOptions,
    n_past: usize,
    pub eos: Option<u32>,
    stats: EngineStats,
    /// Routing choices, recorded while `Some` (see `start_trace`).
    trace: Option<RouteTrace>,
    warm_stats: SchedStats,
    /// Capacity of the buffer that carried the base from disk (freed after loading).
    load_buffer: usize,
    /// In the all-resident mode (`EngineOptions::fused`), what the one graph needs.
    fused: Option<Fused>,
}

/// The all-resident mode's layout: per layer, the slot of the first expert of its pool (the
/// expert of rank r in the pool sits at that slot + r); and the expert ids of each pooled layer
/// (some experts absent), on the backend once, to cut its router logits to the pool.
struct Fused {
    first_slot: Vec<usize>,
    pool_ids: TensorSet,
    /// Per layer: its tensor in `pool_ids`; None where every expert is present.
    pool_index: Vec<Option<usize>>,
    _pool_buf: Option<Buffer>,
}

/// Where a group of experts stands among a layer's groups (see `Engine::experts`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum GroupStep {
    Only,
    First,
    Middle,
    Last,
}

/// Rows per slice when a repacked base matrix is loaded: a multiple of 64 (every row
/// interleave of ggml's repacked layouts divides it) of about `slice` bytes.
fn repack_slice_rows(row_bytes: u64, slice: u64) -> u64 {
    (slice / row_bytes.max(1) / 64).max(1) * 64
}

/// Load base tensor `t` into `dst`, which ggml keeps repacked. ggml repacks only whole
/// tensors, so a slice of rows goes through a proxy tensor of those rows placed at their spot
/// (a repacked layout keeps each group of rows in its own bytes, at the same offset as
/// unpacked): loading the 175 MB output matrix of Qwen3-30B-A3B then needs a buffer of one
/// slice (16 MiB by default), not a second copy of it. Where ggml would lay a slice out differently from the whole
/// matrix, the whole matrix is written at once.
fn write_repacked(
    md: &ModelDir,
    t: &crate::ggml::GgufTensorInfo,
    dst: Tensor<'_>,
    dst_buf: &Buffer,
    slice: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (ne0, ne1) = (t.ne[0], t.ne.get(1).copied().unwrap_or(1));
    let row = t.size / ne1.max(1);
    let rows = repack_slice_rows(row, slice as u64);
    let ty = t.ty.expect("checked when opened");
    let err = |e| ffi(&md.base_path, &t.name, e);
    let at = dst_buf.offset_of(dst);
    let sliced = match at {
        Some(at) if ne1 > rows && t.ne.iter().skip(2).all(|&n| n == 1) => {
            dst_buf.slices_keep_layout(ty, ne0, ne1, at, row as usize, rows).map_err(err)?
        }
        _ => false,
    };
    if !sliced {
        md.read_base_range(t, 0..t.size, buf)?;
        dst.write_whole(buf);
        return Ok(());
    }
    let at = at.expect("checked");
    for r0 in (0..ne1).step_by(rows as usize) {
        let n = rows.min(ne1 - r0);
        md.read_base_range(t, r0 * row..(r0 + n) * row, buf)?;
        dst_buf.write_repacked(ty, ne0, n, at + (r0 * row) as usize, buf, 1).map_err(err)?;
    }
    Ok(())
}

/// The arena as expert loads see it.
struct ArenaRef<'a> {
    /// Per-layer 3-D views (gate, up, down of each layer), then the raw byte view.
    views: &'a TensorSet,
    buf: &'a Buffer,
    /// Bytes from one slot to the next.
    stride: usize,
    /// Where slot 0 starts in the buffer.
    head: usize,
    /// Threads that repack one expert's matrices.
    threads: usize,
    /// Split only matrices of at least this many bytes (starting a thread costs tens of
    /// microseconds).
    split_min: usize,
}

impl<'a> ArenaRef<'a> {
    fn new(views: &'a TensorSet, buf: &'a Buffer, stride: usize, head: usize, opts: &EngineOptions) -> ArenaRef<'a> {
        // 0 (the default): --threads threads, for matrices of 256 KiB or more (a Qwen3-30B-A3B
        // expert projection at q4_K is 884 KiB); N: exactly N, for any matrix.
        let (threads, split_min) = match opts.load_threads {
            0 => (opts.threads, 256 << 10),
            n => (n, 0),
        };
        ArenaRef { views, buf, stride, head, threads, split_min }
    }
}

/// Copy one expert's record into the arena at byte `at`: projections whose arena tensor is
/// repacked are written through proxies placed at their spot (ggml repacks on write, split
/// over `threads`); the others are copied as they are.
fn load_slot(
    a: &ArenaRef<'_>,
    il: u32,
    at: usize,
    layer: &ExpertLayer,
    record: &[u8],
) -> std::result::Result<(), crate::ggml::FfiError> {
    let n_layer = (a.views.len() / 3) as u32;
    let raw = a.views.get(3 * n_layer as usize);
    let sizes = layer.sizes();
    let mut off = 0usize;
    for p in Proj::ALL {
        let size = sizes[p.index()] as usize;
        let part = &record[off..off + size];
        if a.views.get(3 * il as usize + p.index()).is_repacked() {
            let [ne0, ne1] = layer.shapes[p.index()];
            let threads = if part.len() >= a.split_min { a.threads } else { 1 };
            a.buf.write_repacked(layer.types[p.index()], ne0, ne1, a.head + at + off, part, threads)?;
        } else {
            raw.write(at + off, part);
        }
        off += size;
    }
    Ok(())
}

/// Read expert `e` of layer `il` from its shard (through the `staging` buffer, or from the
/// bytes the I/O thread read) into arena slot `slot`. Returns the bytes read and a buffer
/// free for reuse.
#[allow(clippy::too_many_arguments)]
fn load_expert(
    dir: &ModelDir,
    shards: &[WatchedFile],
    staging: &mut Record,
    arena: &ArenaRef<'_>,
    drop_cache: bool,
    il: u32,
    slot: usize,
    e: u32,
    prefetched: Option<Result<Record>>,
) -> Result<(u64, Record)> {
    let layer = &dir.manifest.layers[il as usize];
    let record = layer.record_size() as usize;
    let shard = &shards[il as usize];
    let rec = match prefetched {
        Some(r) => r?,
        None => {
            let at = layer.offsets[layer.slot_of(e).expect("routed experts are present")];
            shard.read_record(at, record, &format!("expert {e}"), drop_cache, staging)?;
            std::mem::take(staging)
        }
    };
    let r =
        load_slot(arena, il, slot * arena.stride, layer, rec.bytes()).map_err(|e| ffi(shard.path(), "expert arena", e));
    // The record just used becomes the staging buffer; the one it replaces is returned for
    // reuse (empty when the staging buffer itself was used).
    let spare = std::mem::replace(staging, rec);
    r?;
    Ok((record as u64, spare))
}

const GRAPH_NODES: usize = 1024;
/// Tensors and nodes per layer in the one-graph (all-resident) evaluation: about 70 of each
/// at n_expert_used 8.
const FUSED_PER_LAYER: usize = 160;
const GRAPH_TENSORS: usize = 1024;

fn ffi(path: &Path, what: &str, e: crate::ggml::FfiError) -> Error {
    Error::Tensor { path: path.to_path_buf(), tensor: what.to_string(), source: e }
}

/// One layer's attention block as built into a graph.
struct Attn<'a> {
    /// The copies of this batch's K and V into the cache (expand them before anything that
    /// reads the layer's output).
    k_store: Tensor<'a>,
    v_store: Tensor<'a>,
    /// The residual stream after attention ([n_embd, n]).
    ffn_inp: Tensor<'a>,
    /// `ffn_inp` through the FFN norm: what the router and the experts see.
    normed: Tensor<'a>,
}

/// Attention of layer `il` over `x` ([n_embd, n]) at positions `pos` after `n_past` cached
/// tokens, with `mask` ([n_past + n, n]): RMSNorm, q/k norms, NEOX RoPE, grouped-query
/// attention over the cache (this batch's K and V stored first), output projection, residual
/// and FFN norm.
#[allow(clippy::too_many_arguments)]
fn build_attention<'a>(
    ctx: &'a Context,
    cfg: &ModelConfig,
    w: &'a TensorSet,
    lw: &LayerW,
    kv: &'a TensorSet,
    il: u32,
    x: Tensor<'a>,
    pos: Tensor<'a>,
    mask: Tensor<'a>,
    n_past: usize,
) -> Attn<'a> {
    let n = x.ne()[1];
    let (hd, nh, nkv) = (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64);
    let n_kv = n_past as i64 + n;
    let eps = cfg.rms_eps;
    let cur = ctx.mul(ctx.rms_norm(x, eps), w.get(lw.attn_norm));
    let rope = |t| ctx.rope(t, pos, hd as i32, ROPE_TYPE_NEOX, cfg.n_ctx_train as i32, cfg.rope_theta);
    let q = ctx.reshape_3d(ctx.mul_mat(w.get(lw.q), cur), hd, nh, n);
    let q = rope(ctx.mul(ctx.rms_norm(q, eps), w.get(lw.q_norm)));
    let k = ctx.reshape_3d(ctx.mul_mat(w.get(lw.k), cur), hd, nkv, n);
    let k = rope(ctx.mul(ctx.rms_norm(k, eps), w.get(lw.k_norm)));
    let v = ctx.mul_mat(w.get(lw.v), cur);

    // Store this batch's K and V in the cache, then attend over everything cached. V is
    // cached transposed (a row per channel, positions along it), as llama.cpp caches it
    // without flash attention: KQ·V then reads it in place, with no per-step copy of the
    // whole V cache.
    let (kc, vc) = (kv.get(2 * il as usize), kv.get(2 * il as usize + 1));
    let (esz, row_k, row_v) = (kc.nb()[0], kc.nb()[1], vc.nb()[1]);
    let k_store = ctx.cpy(ctx.reshape_2d(k, hd * nkv, n), ctx.view_2d(kc, hd * nkv, n, row_k, n_past * row_k));
    let v_store = ctx.cpy(ctx.transpose(v), ctx.view_2d(vc, n, hd * nkv, row_v, n_past * esz));
    let kview = ctx.view_3d(kc, [hd, n_kv, nkv], row_k, hd as usize * esz, 0);
    let kq = ctx.mul_mat(kview, ctx.permute(q, [0, 2, 1, 3])); // [n_kv, n, n_head]
    let kq = ctx.soft_max_ext(kq, mask, 1.0 / (hd as f32).sqrt());
    let vt = ctx.view_3d(vc, [n_kv, hd, nkv], row_v, hd as usize * row_v, 0); // [n_kv, hd, n_head_kv]
    let kqv = ctx.mul_mat(vt, kq); // [hd, n, n_head]
    let o = ctx.reshape_2d(ctx.cont(ctx.permute(kqv, [0, 2, 1, 3])), hd * nh, n);
    let ffn_inp = ctx.add(ctx.mul_mat(w.get(lw.o), o), x);
    let normed = ctx.mul(ctx.rms_norm(ffn_inp, eps), w.get(lw.ffn_norm));
    Attn { k_store, v_store, ffn_inp, normed }
}

/// The experts' SwiGLU FFN over `x` ([n_embd, 1, n]): per token, the matrices `ids` ([k, n],
/// i32) picks from `exps` (gate, up, down: [ne0, ne1, n_mat] each), weighted by `wts`
/// ([1, k, n]) and summed over the k experts in id-list order. Returns [n_embd, n].
fn build_moe<'a>(
    ctx: &'a Context,
    exps: [Tensor<'a>; 3],
    x: Tensor<'a>,
    ids: Tensor<'a>,
    wts: Tensor<'a>,
) -> Tensor<'a> {
    let [gate, up, down] = exps;
    let (n_embd, k, n) = (x.ne()[0], ids.ne()[0], ids.ne()[1]);
    let g = ctx.mul_mat_id(gate, x, ids);
    let u = ctx.mul_mat_id(up, x, ids);
    let d = ctx.mul_mat_id(down, ctx.swiglu_split(g, u), ids); // [n_embd, k, n]
    let d = ctx.mul(d, wts);
    let nb = d.nb();
    let mut moe = ctx.view_2d(d, n_embd, n, nb[2], 0);
    for j in 1..k as usize {
        moe = ctx.add(moe, ctx.view_2d(d, n_embd, n, nb[2], j * nb[1]));
    }
    moe
}

/// Output norm and lm head over `x` ([n_embd, n_out]): the logits [n_vocab, n_out]. The lm
/// head is `output`, or the token embedding when tied to it (None).
fn build_output<'a>(
    ctx: &'a Context,
    eps: f32,
    w: &'a TensorSet,
    output_norm: usize,
    output: Option<usize>,
    embd: &'a TensorSet,
    x: Tensor<'a>,
) -> Tensor<'a> {
    let cur = ctx.mul(ctx.rms_norm(x, eps), w.get(output_norm));
    let out_w = match output {
        Some(i) => w.get(i),
        None => embd.get(0),
    };
    ctx.mul_mat(out_w, cur)
}

impl Engine {
    /// Open a model directory and load its base onto the device.
    pub fn load(dir: &Path, opts: EngineOptions) -> Result<Engine> {
        Engine::load_with_progress(dir, opts, &mut |_, _| {})
    }

    /// `load`, calling `progress(bytes done, bytes total)` as experts are loaded up front (the
    /// all-resident mode, see `EngineOptions::fused`).
    pub fn load_with_progress(dir: &Path, opts: EngineOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Engine> {
        let md = ModelDir::open(dir)?;
        let cfg = md.config.clone();
        let base_path = md.base_path.clone();
        if opts.n_ctx == 0 || opts.n_batch == 0 {
            return Err(Error::Usage("context and batch sizes must be positive".into()));
        }

        // Arena geometry first: a too-small arena is an error before anything is loaded.
        let record_max = md.manifest.layers.iter().map(|l| l.record_size()).max().unwrap_or(0);
        let slot_stride = (record_max as usize).next_multiple_of(DIRECT_ALIGN);
        let total_experts: usize = md.manifest.layers.iter().map(|l| l.ids.len()).sum();
        let backend = match Backend::open(&opts.device, opts.threads) {
            Ok(b) => b,
            // A device this build or machine lacks (no CUDA toolkit, no Metal): say so, use the CPU.
            Err(e) if !opts.device.eq_ignore_ascii_case("cpu") => {
                log::warn!("{e}; running on the CPU instead");
                Backend::open("cpu", opts.threads).map_err(|e| Error::Usage(e.to_string()))?
            }
            Err(e) => return Err(Error::Usage(e.to_string())),
        };
        if !backend.is_cpu() {
            // Measured on an H100 (examples/device_check.rs): runs, the same at every arena
            // size, but its logits differ from llama.cpp's by up to 0.2 on the tiny fixture.
            log::warn!(
                "{}: sage's GPU path does not yet match llama.cpp's numbers; prefer --device cpu",
                backend.name()
            );
        }
        // Room after the last slot for backends that pad quantized rows (0 on the CPU).
        let probe = Context::new(3 * md.manifest.layers.len(), 0);
        let tail = md
            .manifest
            .layers
            .iter()
            .flat_map(|l| Proj::ALL.map(|p| (l.types[p.index()], l.shapes[p.index()])))
            .map(|(ty, [ne0, ne1])| backend.alloc_padding(probe.new_tensor(ty, &[ne0 as i64, ne1 as i64])))
            .max()
            .unwrap_or(0);
        let n_slots = match opts.arena {
            ArenaSize::All => total_experts,
            ArenaSize::Experts(n) => n.min(total_experts),
            ArenaSize::Bytes(b) => {
                let room = b.saturating_sub((DIRECT_ALIGN + tail) as u64);
                ((room / slot_stride as u64) as usize).min(total_experts)
            }
        };
        if n_slots < cfg.n_expert_used as usize {
            return Err(Error::Usage(format!(
                "the arena holds {n_slots} experts of {slot_stride} bytes, but each token uses {}: give it at least {} bytes (--arena) or {} experts (--arena-experts)",
                cfg.n_expert_used,
                cfg.n_expert_used as usize * slot_stride,
                cfg.n_expert_used
            )));
        }

        let policy = scheduler::policy(&opts.policy, n_slots).ok_or_else(|| {
            Error::Usage(format!("unknown policy '{}'; sage has {}", opts.policy, scheduler::POLICIES.join(", ")))
        })?;
        log::info!("device {}; arena {n_slots} slots of {slot_stride} bytes, {} eviction", backend.name(), opts.policy);

        // Base weights: the token embedding (read by get_rows) in plain memory, the rest in
        // the repacking buffer when there is one (tensors without a repacked form stay plain
        // there).
        let repack = if opts.repack { backend.repack_buffer_type() } else { None };
        let mut weights = TensorSet::new(md.base_tensors.len() + 1);
        let mut embd = TensorSet::new(1);
        let mut index = std::collections::HashMap::new();
        for t in &md.base_tensors {
            let ne: Vec<i64> = t.ne.iter().map(|&n| n as i64).collect();
            let ty = t.ty.expect("checked when opened");
            if t.name != TOKEN_EMBD {
                index.insert(t.name.clone(), weights.add(ty, &ne, &t.name));
            } else {
                embd.add(ty, &ne, &t.name);
            }
        }
        let weights_buf =
            backend.alloc_ctx_tensors_in(weights.context(), repack).map_err(|e| ffi(&base_path, "base weights", e))?;
        let embd_buf = backend.alloc_ctx_tensors(embd.context()).map_err(|e| ffi(&base_path, "token embedding", e))?;
        let mut buf = Vec::new();
        for t in &md.base_tensors {
            let ty = t.ty.expect("checked when opened");
            let dst = match index.get(&t.name) {
                Some(&i) => weights.get(i),
                None => embd.get(0),
            };
            if dst.is_repacked() {
                write_repacked(&md, t, dst, &weights_buf, opts.load_slice, &mut buf)?;
                continue;
            }
            // A slice at a time, so reading a large embedding needs no second copy of it.
            // f32 tensors (norms, routers) are checked on the way: NaN or Inf there silently
            // ruins every token's routing.
            let step = (opts.load_slice as u64).max(4) / 4 * 4; // slices hold whole f32 values
            let mut at = 0;
            let mut bad = 0;
            while at < t.size {
                let end = (at + step).min(t.size);
                md.read_base_range(t, at..end, &mut buf)?;
                if ty == GgmlType::F32 {
                    bad += buf
                        .chunks_exact(4)
                        .filter(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
                        .count();
                }
                dst.write(at as usize, &buf);
                at = end;
            }
            if bad > 0 {
                log::warn!(
                    "{}: tensor '{}' has {bad} NaN or infinite values of {}; output will be wrong",
                    base_path.display(),
                    t.name,
                    t.size / 4
                );
            }
        }
        let load_buffer = buf.capacity();
        drop(buf);
        if !opts.page_cache {
            // The base now lives in backend memory; its file's pages would be a second copy.
            let _ = rustix::fs::fadvise(&md.base_file, 0, None, rustix::fs::Advice::DontNeed);
        }
        let get = |name: &str| -> Result<usize> {
            index
                .get(name)
                .copied()
                .ok_or_else(|| Error::MissingTensor { path: base_path.clone(), tensor: name.to_string() })
        };
        let layers = (0..cfg.n_layer)
            .map(|il| {
                Ok(LayerW {
                    attn_norm: get(&blk(il, ATTN_NORM))?,
                    q: get(&blk(il, ATTN_Q))?,
                    k: get(&blk(il, ATTN_K))?,
                    v: get(&blk(il, ATTN_V))?,
                    o: get(&blk(il, ATTN_OUT))?,
                    q_norm: get(&blk(il, ATTN_Q_NORM))?,
                    k_norm: get(&blk(il, ATTN_K_NORM))?,
                    ffn_norm: get(&blk(il, FFN_NORM))?,
                    router: get(&blk(il, FFN_GATE_INP))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = get(OUTPUT).ok();
        let output_norm = get(OUTPUT_NORM)?;

        // KV cache.
        let kv_ty = match opts.kv_type {
            KvType::F32 => GgmlType::F32,
            KvType::F16 => GgmlType::F16,
        };
        let n_embd_kv = (cfg.head_dim * cfg.n_head_kv as u64) as i64;
        // V transposed: a row of n_ctx positions per channel (see `build_attention`).
        let mut kv = TensorSet::new(2 * cfg.n_layer as usize);
        for il in 0..cfg.n_layer {
            kv.add(kv_ty, &[n_embd_kv, opts.n_ctx as i64], &format!("cache_k_l{il}"));
            kv.add(kv_ty, &[opts.n_ctx as i64, n_embd_kv], &format!("cache_v_l{il}"));
        }
        let kv_buf = backend.alloc_ctx_tensors(kv.context()).map_err(|e| ffi(dir, "KV cache", e))?;
        kv_buf.clear(0);

        // The arena: one buffer, fixed size, allocated once.
        let arena_bytes = n_slots * slot_stride;
        let all_resident = n_slots == total_experts;
        let arena_layout = if opts.arena_repack.unwrap_or(opts.fused && all_resident) { repack } else { None };
        let arena_buf = backend
            .alloc_buffer_in(arena_layout, DIRECT_ALIGN + arena_bytes + tail)
            .map_err(|e| ffi(dir, "expert arena", e))?;
        // Slots start on a DIRECT_ALIGN boundary (their stride is a multiple of it), so the I/O
        // thread can read records straight into them with O_DIRECT.
        let arena_head = arena_buf.offset_to_aligned(DIRECT_ALIGN);
        arena_buf.clear(0);
        let mut arena = TensorSet::new(3 * cfg.n_layer as usize + 1);
        for l in &md.manifest.layers {
            let sizes = l.sizes();
            let mut off = 0usize;
            for p in Proj::ALL {
                let [ne0, ne1] = l.shapes[p.index()];
                let i = arena.add(
                    l.types[p.index()],
                    &[ne0 as i64, ne1 as i64, n_slots as i64],
                    &format!("arena.{}.{}", l.il, p.exps()),
                );
                let t = arena.get(i);
                t.set_outer_strides(slot_stride);
                arena_buf.place(t, arena_head + off).map_err(|e| ffi(dir, "expert arena", e))?;
                off += sizes[p.index()] as usize;
            }
        }
        let raw = arena.add(GgmlType::I8, &[arena_bytes as i64], "arena.bytes");
        arena_buf.place(arena.get(raw), arena_head).map_err(|e| ffi(dir, "expert arena", e))?;
        // Zeros are valid weights of every type: a slot that a batch uses only with weight 0
        // (see `experts`) before anything was loaded into it contributes exactly 0, never NaN
        // from uninitialized device memory. It also commits the arena's memory up front.
        arena_buf.clear(0);
        let arena_buf = SharedBuffer::new(arena_buf);
        let arena_writer = if arena_layout.is_none() { arena_buf.host_writer() } else { None };

        let mut state = TensorSet::new(4);
        for name in ["hidden", "ffn_inp", "normed", "moe_acc"] {
            state.add(GgmlType::F32, &[cfg.n_embd as i64, opts.n_batch as i64], name);
        }
        let state_buf = backend.alloc_ctx_tensors(state.context()).map_err(|e| ffi(dir, "activations", e))?;

        let shards: Arc<Vec<WatchedFile>> =
            Arc::new(md.manifest.layers.iter().map(|l| WatchedFile::open(&dir.join(&l.file))).collect::<Result<_>>()?);
        let io = Prefetcher::new(shards.clone(), !opts.page_cache);
        let present =
            md.manifest.layers.iter().map(|l| (0..cfg.n_expert).map(|e| l.slot_of(e).is_some()).collect()).collect();
        let eos = match md.base.get(TOK_EOS) {
            Some(GgufValue::U32(id)) => Some(id),
            Some(GgufValue::I32(id)) if id >= 0 => Some(id as u32),
            _ => None,
        };
        let alloc = Allocator::new(&backend);
        let mut engine = Engine {
            config: cfg,
            dir: md,
            weights,
            _weights_buf: weights_buf,
            embd,
            _embd_buf: embd_buf,
            layers,
            output_norm,
            output,
            kv,
            _kv_buf: kv_buf,
            arena,
            arena_buf,
            arena_writer,
            arena_head,
            slot_stride,
            state,
            _state_buf: state_buf,
            alloc,
            sched: Scheduler::new(n_slots, policy),
            shards,
            io,
            gate: PrefetchGate::default(),
            predicted: None,
            staging: Record::default(),
            present,
            n_past: 0,
            eos,
            stats: EngineStats::default(),
            trace: None,
            warm_stats: SchedStats::default(),
            load_buffer,
            fused: None,
            backend,
            opts,
        };
        if engine.opts.fused && all_resident {
            engine.load_all_experts(progress)?;
        }
        Ok(engine)
    }

    /// Load every expert, layer by layer, into consecutive slots, and switch to evaluating
    /// whole batches in one graph. The loads are counted in `warm_stats`, not in the run's.
    fn load_all_experts(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let n_layer = self.config.n_layer;
        let total: u64 = self.dir.manifest.layers.iter().map(|l| l.record_size() * l.ids.len() as u64).sum();
        let mut done = 0;
        let mut base = Vec::with_capacity(n_layer as usize);
        for il in 0..n_layer {
            let layer = &self.dir.manifest.layers[il as usize];
            let (ids, bytes) = (layer.ids.clone(), layer.record_size() * layer.ids.len() as u64);
            let slots = self.ensure_group(il, &ids)?;
            // An empty arena fills from slot 0 up, so each layer's experts are consecutive.
            let first = slots.first().copied().unwrap_or(0);
            if slots.iter().enumerate().any(|(i, &s)| s != first + i) {
                log::warn!("blk.{il}: experts not in consecutive slots; evaluating layer by layer");
                return Ok(());
            }
            base.push(first);
            done += bytes;
            progress(done, total);
        }
        let pooled = |l: &&ExpertLayer| l.ids.len() < self.config.n_expert as usize;
        let mut pool_ids = TensorSet::new(self.dir.manifest.layers.len());
        let pool_index: Vec<Option<usize>> = self
            .dir
            .manifest
            .layers
            .iter()
            .map(|l| pooled(&l).then(|| pool_ids.add(GgmlType::I32, &[l.ids.len() as i64], &format!("pool.{}", l.il))))
            .collect();
        let pool_buf = if pool_ids.is_empty() {
            None
        } else {
            let buf =
                self.backend.alloc_ctx_tensors(pool_ids.context()).map_err(|e| ffi(&self.dir.path, "pool ids", e))?;
            for (l, i) in self.dir.manifest.layers.iter().zip(&pool_index) {
                if let Some(i) = *i {
                    pool_ids.get(i).write_i32(&l.ids.iter().map(|&e| e as i32).collect::<Vec<_>>());
                }
            }
            Some(buf)
        };
        self.warm_stats = std::mem::take(&mut self.sched.stats);
        self.fused = Some(Fused { first_slot: base, pool_ids, pool_index, _pool_buf: pool_buf });
        log::info!(
            "all {} experts resident ({} bytes loaded): one graph per batch",
            self.warm_stats.misses,
            self.warm_stats.bytes_read
        );
        Ok(())
    }

    pub fn device_name(&self) -> String {
        self.backend.name()
    }

    /// What the engine holds in backend memory, by part.
    pub fn memory(&self) -> MemoryUse {
        MemoryUse {
            base: self._weights_buf.size() + self._embd_buf.size(),
            arena: self.arena_buf.size(),
            kv: self._kv_buf.size(),
            compute: self.alloc.buffer_size() + self._state_buf.size(),
            staging: self.staging.capacity() + self.io.held_bytes(),
            load_buffer: self.load_buffer,
        }
    }

    /// Bytes of the expert arena (fixed for the engine's life).
    pub fn arena_bytes(&self) -> usize {
        self.arena_buf.size()
    }

    /// Whether every expert is resident and batches run as one graph (`EngineOptions::fused`).
    pub fn all_resident(&self) -> bool {
        self.fused.is_some()
    }

    pub fn n_slots(&self) -> usize {
        self.sched.n_slots()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_stride
    }

    /// Expert ids present in each layer (the pool in effect).
    pub fn pool(&self) -> Vec<Vec<u32>> {
        self.dir.manifest.layers.iter().map(|l| l.ids.clone()).collect()
    }

    pub fn stats(&self) -> EngineStats {
        let mut prefetch = self.io.stats.clone();
        prefetch.used += self.sched.reservations.used;
        prefetch.wasted += self.sched.reservations.unused;
        EngineStats { sched: self.sched.stats.clone(), prefetch, ..self.stats.clone() }
    }

    pub fn n_past(&self) -> usize {
        self.n_past
    }

    pub fn n_ctx(&self) -> usize {
        self.opts.n_ctx
    }

    /// Record every token's routing from now on (for `sage profile`), and with `router_logits`
    /// every router logit too. The one-graph mode keeps its router logits on the backend: an
    /// engine in that mode records them only if loaded with `EngineOptions::fused` off.
    pub fn start_trace(&mut self, router_logits: bool) -> Result<()> {
        if router_logits && self.fused.is_some() {
            return Err(Error::Usage(
                "router logits are recorded layer by layer: load the engine with `fused: false`".into(),
            ));
        }
        let c = &self.config;
        let mut t = RouteTrace::new(c.n_layer as usize, c.n_expert as usize, c.n_expert_used as usize);
        t.router_logits = router_logits.then(|| vec![Vec::new(); c.n_layer as usize]);
        self.trace = Some(t);
        Ok(())
    }

    /// Stop recording and return what was recorded.
    pub fn take_trace(&mut self) -> Option<RouteTrace> {
        self.trace.take()
    }

    /// Fill the arena with the most used experts of `usage` that are in the pool, most used
    /// first, until every slot is taken. Returns how many were loaded. The loads are not
    /// counted as hits or misses of the run that follows.
    pub fn warm(&mut self, usage: &Usage, usage_path: &Path) -> Result<usize> {
        usage.check_model(usage_path, self.config.n_layer, self.config.n_expert)?;
        let chosen: Vec<(u32, u32)> = usage
            .ranked()
            .into_iter()
            .filter(|&(il, e)| self.present[il as usize][e as usize])
            .take(self.sched.n_slots())
            .collect();
        self.settle_slot_reads()?;
        // Least used first, so that the most used are the most recently used when evicting starts.
        for &(il, e) in chosen.iter().rev() {
            let (dir, shards, staging) = (&self.dir, &self.shards, &mut self.staging);
            let arena = ArenaRef::new(&self.arena, &self.arena_buf, self.slot_stride, self.arena_head, &self.opts);
            let drop_cache = !self.opts.page_cache;
            self.sched.ensure(il, &[e], |slot, e| {
                load_expert(dir, shards, staging, &arena, drop_cache, il, slot, e, None).map(|r| r.0)
            })?;
        }
        let loaded = chosen.len();
        self.warm_stats = std::mem::take(&mut self.sched.stats);
        Ok(loaded)
    }

    /// What warming the arena cost (loads and bytes).
    pub fn warm_stats(&self) -> &SchedStats {
        &self.warm_stats
    }

    /// Forget the context (the arena keeps its experts).
    pub fn reset(&mut self) {
        self.n_past = 0;
        self.predicted = None;
    }

    /// Evaluate `tokens` after the current context. Returns logits for every token when
    /// `all_logits`, else for the last one only (row-major [n][n_vocab]).
    pub fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        if self.n_past + tokens.len() > self.opts.n_ctx {
            return Err(Error::Usage(format!(
                "{} tokens after {} do not fit the context of {} (--ctx)",
                tokens.len(),
                self.n_past,
                self.opts.n_ctx
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as u64 >= self.config.n_vocab) {
            return Err(Error::Usage(format!("token id {t} is outside the vocabulary of {}", self.config.n_vocab)));
        }
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.opts.n_batch).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let last = ci + 1 == chunks.len();
            let logits = self.eval_batch(chunk, all_logits || !last)?;
            if all_logits || last {
                out.extend(logits);
            }
        }
        Ok(out)
    }

    fn eval_batch(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let n = tokens.len();
        // Positions and the causal mask ([n_kv][n]) are the same for every layer of the batch.
        let (n_past, n_kv) = (self.n_past, self.n_past + n);
        let pos: Vec<i32> = (0..n).map(|i| (n_past + i) as i32).collect();
        let mut mask = vec![f32::NEG_INFINITY; n_kv * n];
        for i in 0..n {
            mask[i * n_kv..=i * n_kv + n_past + i].fill(0.0);
        }
        let out = if self.fused.is_some() {
            self.eval_fused(tokens, &pos, &mask, all_logits)?
        } else {
            for il in 0..self.config.n_layer {
                let (logits, next) = self.attention(il, tokens, &pos, &mask)?;
                self.experts(il, n, &logits, next.as_deref())?;
            }
            self.output_logits(n, all_logits)?
        };
        self.n_past += n;
        self.stats.tokens_evaluated += n as u64;
        Ok(out)
    }

    /// The whole batch as one graph, every expert resident: per layer attention, the router
    /// (softmax, top-k, renormalization on the backend, as llama.cpp's MoE graph does) and the
    /// experts through `mul_mat_id` on the layer's consecutive slots; then the output. The
    /// chosen experts are read back afterwards for the hit counts and the routing trace.
    fn eval_fused(&mut self, tokens: &[u32], positions: &[i32], causal_mask: &[f32], all: bool) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let fused = self.fused.as_ref().expect("fused mode");
        let n = tokens.len() as i64;
        let (n_embd, k) = (cfg.n_embd as i64, cfg.n_expert_used as i64);
        let n_kv = self.n_past as i64 + n;
        let n_layer = cfg.n_layer as usize;
        let size = FUSED_PER_LAYER * n_layer + GRAPH_NODES;
        let ctx = Context::new(size, size);
        let w = &self.weights;
        let ids = ctx.new_tensor(GgmlType::I32, &[n]);
        ids.set_input();
        let pos = ctx.new_tensor(GgmlType::I32, &[n]);
        pos.set_input();
        let mask = ctx.new_tensor(GgmlType::F32, &[n_kv, n]);
        mask.set_input();
        let mut g = ctx.graph(size);
        let mut x = ctx.get_rows(self.embd.get(0), ids);
        let mut chosen = Vec::with_capacity(n_layer);
        // Only the last token's logits wanted (and no routing trace): the last layer's FFN
        // runs for that token alone, as in llama.cpp.
        let n_out = if all { n } else { 1 };
        for (il, (lw, &first)) in self.layers.iter().zip(&fused.first_slot).enumerate() {
            let a = build_attention(&ctx, cfg, w, lw, &self.kv, il as u32, x, pos, mask, self.n_past);
            g.expand(a.k_store);
            g.expand(a.v_store);
            let (mut ffn_inp, mut normed, mut rows) = (a.ffn_inp, a.normed, n);
            if il + 1 == n_layer && n_out < n && self.trace.is_none() {
                let last = |t| ctx.view_2d(t, n_embd, n_out, t.nb()[1], (n - n_out) as usize * t.nb()[1]);
                (ffn_inp, normed, rows) = (last(ffn_inp), last(normed), n_out);
            }
            // Router: probabilities [n_expert (or the pool's size), rows], sorted. The full
            // argsort is the output read back: a view of it (the top k) would not keep its
            // memory from being reused later in the graph.
            let mut logits = ctx.mul_mat(w.get(lw.router), normed); // [n_expert, rows]
            let present = &self.dir.manifest.layers[il].ids;
            let n_here = present.len() as i64;
            // A pooled layer routes over its present experts only: its router logits are cut
            // down to them, in the order of their slots, so the chosen indices are slot
            // offsets (ranks in the pool), mapped back to ids after the graph. get_rows picks
            // rows (dimension 1): experts go there and back, to [n_here, rows].
            if let Some(i) = fused.pool_index[il] {
                let by_expert = ctx.cont(ctx.transpose(logits)); // [rows, n_expert]
                logits = ctx.cont(ctx.transpose(ctx.get_rows(by_expert, fused.pool_ids.get(i))));
            }
            let probs = ctx.soft_max(logits);
            let order = ctx.argsort_desc(probs);
            order.set_output();
            let sel = ctx.view_2d(order, k, rows, order.nb()[1], 0); // [k, rows]
            let mut wts = ctx.get_rows(ctx.reshape_3d(probs, 1, n_here, rows), sel); // [1, k, rows]
            if cfg.norm_topk_prob {
                let w2 = ctx.reshape_2d(wts, k, rows);
                wts = ctx.reshape_3d(ctx.div(w2, ctx.sum_rows(w2)), 1, k, rows);
            }
            let exps = Proj::ALL.map(|p| {
                let t = self.arena.get(3 * il + p.index());
                let [ne0, ne1, ..] = t.ne();
                ctx.view_3d(t, [ne0, ne1, n_here], t.nb()[1], self.slot_stride, first * self.slot_stride)
            });
            let moe = build_moe(&ctx, exps, ctx.reshape_3d(normed, n_embd, 1, rows), sel, wts);
            x = ctx.add(moe, ffn_inp);
            chosen.push((order, rows, present));
        }
        let rows = x.ne()[1];
        let last = ctx.view_2d(x, n_embd, n_out, x.nb()[1], (rows - n_out) as usize * x.nb()[1]);
        let logits = build_output(&ctx, cfg.rms_eps, w, self.output_norm, self.output, &self.embd, last);
        logits.set_output();
        g.expand(logits);
        let t0 = Instant::now();
        self.alloc.alloc(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        ids.write_i32(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
        pos.write_i32(positions);
        mask.write_f32(causal_mask);
        self.backend.compute(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        self.stats.compute += t0.elapsed();
        for (il, (order, rows, present)) in chosen.iter().enumerate() {
            let n_here = present.len();
            let order = order.read_i32(n_here * *rows as usize);
            // Ranks in the layer's pool (its experts in slot order) to expert ids.
            let mut used: Vec<u32> =
                order.chunks(n_here).flat_map(|row| row[..k as usize].iter().map(|&r| present[r as usize])).collect();
            if let Some(trace) = &mut self.trace {
                trace.choices[il].extend(used.iter().copied());
            }
            used.sort_unstable();
            used.dedup();
            self.sched.record_hits(il as u32, &used);
        }
        Ok(logits.read_f32(cfg.n_vocab as usize * n_out as usize))
    }

    /// Graph A of layer `il`: attention (storing this batch's K and V), residual, FFN norm and
    /// the router logits, which are returned ([n][n_expert]). When prefetching a decode step,
    /// also the next layer's router applied to this layer's residual stream (its prediction).
    fn attention(
        &mut self,
        il: u32,
        tokens: &[u32],
        positions: &[i32],
        causal_mask: &[f32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let cfg = &self.config;
        let n = tokens.len() as i64;
        let n_embd = cfg.n_embd as i64;
        let n_kv = self.n_past as i64 + n;
        let eps = cfg.rms_eps;
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let w = &self.weights;
        let (hidden_s, ffn_inp_s, normed_s) = (self.state.get(0), self.state.get(1), self.state.get(2));
        let row = hidden_s.nb()[1];

        let ids = ctx.new_tensor(GgmlType::I32, &[n]);
        let x = if il == 0 {
            ids.set_input();
            ctx.get_rows(self.embd.get(0), ids)
        } else {
            ctx.view_2d(hidden_s, n_embd, n, row, 0)
        };
        let pos = ctx.new_tensor(GgmlType::I32, &[n]);
        pos.set_input();
        let mask = ctx.new_tensor(GgmlType::F32, &[n_kv, n]);
        mask.set_input();
        let a = build_attention(&ctx, cfg, w, &self.layers[il as usize], &self.kv, il, x, pos, mask, self.n_past);
        let logits = ctx.mul_mat(w.get(self.layers[il as usize].router), a.normed); // [n_expert, n]
        logits.set_output();
        let keep_inp = ctx.cpy(a.ffn_inp, ctx.view_2d(ffn_inp_s, n_embd, n, row, 0));
        let keep_normed = ctx.cpy(a.normed, ctx.view_2d(normed_s, n_embd, n, row, 0));
        // Decode: the next layer's likely experts are read into buffers (`prefetch_next`); a
        // batch's straight into reserved arena slots where the arena allows
        // (`prefetch_batch`).
        let predict = self.opts.prefetch && (n == 1 || self.arena_writer.is_some()) && il + 1 < cfg.n_layer;
        let next = predict.then(|| {
            let nw = &self.layers[il as usize + 1];
            let x = ctx.mul(ctx.rms_norm(a.ffn_inp, eps), w.get(nw.ffn_norm));
            let t = ctx.mul_mat(w.get(nw.router), x);
            t.set_output();
            t
        });

        let mut g = ctx.graph(GRAPH_NODES);
        for t in [a.k_store, a.v_store, logits, keep_inp, keep_normed].into_iter().chain(next) {
            g.expand(t);
        }
        let t0 = Instant::now();
        self.alloc.alloc(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        if il == 0 {
            ids.write_i32(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
        }
        pos.write_i32(positions);
        mask.write_f32(causal_mask);
        self.backend.compute(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        self.stats.compute += t0.elapsed();
        let next = next.map(|t| t.read_f32((cfg.n_expert as i64 * n) as usize));
        Ok((logits.read_f32((cfg.n_expert as i64 * n) as usize), next))
    }

    /// Start reading the experts layer `il` is predicted to choose for a decode step (from
    /// `logits`, its router applied to the previous layer's residual stream) that are not
    /// resident, into buffers the loads take them from, if recent predictions were right often
    /// enough (`PrefetchGate`). (Reading them straight into reserved slots, as batches do,
    /// decoded no faster: 0.99× median of 5 alternating pairs; and a wrong guess would evict an
    /// expert.)
    fn prefetch_next(&mut self, il: u32, logits: &[f32]) {
        let p = &mut self.io;
        let c = &self.config;
        let choice = route(logits, &self.present[il as usize], c.n_expert_used as usize, c.norm_topk_prob);
        let layer = &self.dir.manifest.layers[il as usize];
        // In ascending ids, the order in which the layer will load its misses (one I/O
        // thread serves requests in order: a load must not wait behind reads it needs later).
        let mut experts = choice.experts;
        experts.sort_unstable();
        experts.retain(|&e| !self.sched.is_resident(il, e));
        if self.gate.open() {
            for &e in &experts {
                let at = layer.offsets[layer.slot_of(e).expect("routed experts are present")];
                p.request((il, e), at, layer.record_size() as usize, true);
            }
        } else {
            p.stats.skipped += experts.len() as u64;
        }
        self.predicted = Some((il, experts));
    }

    /// A batch: reserve arena slots for the experts layer `il` is predicted to choose for any
    /// of its tokens (`logits`: [n][n_expert], its router applied to the previous layer's
    /// residual stream) that are not resident, and have the I/O thread read each straight into
    /// its slot while the previous layer computes on the slots in `busy`. As many as there
    /// are slots besides `busy` and the predicted experts already resident; nothing reads
    /// those slots before `settle_slot_reads`.
    fn prefetch_batch(&mut self, il: u32, n: usize, logits: &[f32], busy: &[usize]) {
        let Some(writer) = &self.arena_writer else { return };
        let c = &self.config;
        let (n_exp, k) = (c.n_expert as usize, c.n_expert_used as usize);
        let mut wanted = vec![false; n_exp];
        for row in logits.chunks(n_exp).take(n) {
            for e in route(row, &self.present[il as usize], k, c.norm_topk_prob).experts {
                wanted[e as usize] = true;
            }
        }
        let mut keep = busy.to_vec();
        let mut missing = Vec::new();
        for e in (0..n_exp as u32).filter(|&e| wanted[e as usize]) {
            match self.sched.slot_of(il, e) {
                Some(s) => keep.push(s),
                None => missing.push(e),
            }
        }
        let layer = &self.dir.manifest.layers[il as usize];
        let record = layer.record_size();
        for e in missing {
            let Some(slot) = self.sched.reserve((il, e), record, &keep) else { return };
            keep.push(slot);
            let at = layer.offsets[layer.slot_of(e).expect("routed experts are present")];
            let slot_at = self.arena_head + slot * self.slot_stride;
            self.io.request_into((il, e), at, record as usize, writer.clone(), slot_at, self.slot_stride);
        }
    }

    /// Wait for the reads into reserved arena slots to finish: before any slot is used or
    /// evicted again. A failed read leaves its expert out of the arena, and fails the call.
    fn settle_slot_reads(&mut self) -> Result<()> {
        let mut first = None;
        let t = Instant::now();
        let failed = self.io.finish_slot_reads();
        // Waiting for reads is stalling on loads, wherever it happens.
        self.sched.stats.stall += t.elapsed();
        for (key, e) in failed {
            self.sched.forget(key);
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Graph B of layer `il`: route, make the chosen experts resident, run them, add to the
    /// residual (left in the `hidden` state for the next layer).
    fn experts(&mut self, il: u32, n: usize, router_logits: &[f32], predict_next: Option<&[f32]>) -> Result<()> {
        let (n_exp, k) = (self.config.n_expert as usize, self.config.n_expert_used as usize);
        self.settle_slot_reads()?;
        self.io.retire_all_but(il);
        let present = &self.present[il as usize];
        let norm = self.config.norm_topk_prob;
        let choices: Vec<_> =
            (0..n).map(|t| route(&router_logits[t * n_exp..(t + 1) * n_exp], present, k, norm)).collect();
        // Score the prediction made for this layer (decode: one token).
        if let Some((pl, predicted)) = self.predicted.take() {
            if pl == il && n == 1 {
                let chosen = predicted.iter().filter(|e| choices[0].experts.contains(e)).count();
                self.gate.record(predicted.len(), chosen);
            }
        }
        if let Some(trace) = &mut self.trace {
            trace.choices[il as usize].extend(choices.iter().flat_map(|c| c.experts.iter().copied()));
            if let Some(l) = &mut trace.router_logits {
                l[il as usize].extend_from_slice(&router_logits[..n * n_exp]);
            }
        }
        let mut needed: Vec<u32> = choices.iter().flat_map(|c| c.experts.iter().copied()).collect();
        needed.sort_unstable();
        needed.dedup();

        let n_slots = self.sched.n_slots();
        // Each group of experts is loaded once and runs once for the whole batch.
        let n_groups = needed.len().div_ceil(n_slots);
        for (gi, group) in needed.chunks(n_slots).enumerate() {
            let slots = self.ensure_group(il, group)?;
            // The next layer's predicted experts are read while this layer's experts and the
            // next layer's attention compute; asked for only now, so that they never queue
            // ahead of this layer's own loads.
            match (gi, predict_next) {
                (0, Some(next)) if n == 1 => self.prefetch_next(il + 1, next),
                // Reads into slots only while no other slot of the arena takes part in the
                // graph: one group uses no spare slots.
                (0, Some(next)) if n_groups == 1 => self.prefetch_batch(il + 1, n, next, &slots),
                _ => {}
            }
            let mut ids = Vec::with_capacity(n * k);
            let mut wts = Vec::with_capacity(n * k);
            for c in &choices {
                let mine: Vec<Option<usize>> =
                    c.experts.iter().map(|e| group.iter().position(|g| g == e).map(|i| slots[i])).collect();
                // A choice in another group gets weight 0 on a slot this token does not use
                // otherwise: no expert appears twice in a token's list (ggml's repacked
                // mul_mat_id kernels need distinct ids per token), and every slot holds finite
                // weights, so it adds exactly 0.
                let mut spare = (0..n_slots).filter(|s| !mine.contains(&Some(*s)));
                for (slot, w) in mine.iter().zip(&c.weights) {
                    match slot {
                        Some(s) => {
                            ids.push(*s as i32);
                            wts.push(*w);
                        }
                        None => {
                            ids.push(spare.next().expect("the arena has at least n_expert_used slots") as i32);
                            wts.push(0.0);
                        }
                    }
                }
            }
            let step = match (gi, n_groups) {
                (_, 1) => GroupStep::Only,
                (0, _) => GroupStep::First,
                (g, m) if g + 1 == m => GroupStep::Last,
                _ => GroupStep::Middle,
            };
            self.moe_graph(il, n, step, &ids, &wts)?;
        }
        Ok(())
    }

    /// Make `group` (distinct experts of layer `il`, at most one arena's worth) resident and
    /// return their slots. The misses load in the order `ensure` asks for them, while the I/O
    /// thread reads `read_ahead` of them ahead of the one being copied into its slot.
    fn ensure_group(&mut self, il: u32, group: &[u32]) -> Result<Vec<usize>> {
        let (dir, shards, staging) = (&self.dir, &self.shards, &mut self.staging);
        let arena = ArenaRef::new(&self.arena, &self.arena_buf, self.slot_stride, self.arena_head, &self.opts);
        let drop_cache = !self.opts.page_cache;
        let layer = &dir.manifest.layers[il as usize];
        let missing: Vec<u32> = group.iter().copied().filter(|&e| !self.sched.is_resident(il, e)).collect();
        let (io, ahead) = (&mut self.io, self.opts.read_ahead);
        let mut issued = 0;
        let mut read_ahead = |io: &mut Prefetcher, upto: usize| {
            while issued < upto.min(missing.len()) {
                let e = missing[issued];
                let at = layer.offsets[layer.slot_of(e).expect("routed experts are present")];
                io.request((il, e), at, layer.record_size() as usize, false);
                issued += 1;
            }
        };
        if ahead > 0 {
            read_ahead(io, ahead);
        }
        let mut started = 0;
        self.sched.ensure(il, group, |slot, e| {
            started += 1;
            if ahead > 0 {
                read_ahead(io, started + ahead);
            }
            let pre = io.take((il, e));
            let (bytes, spare) = load_expert(dir, shards, staging, &arena, drop_cache, il, slot, e, pre)?;
            io.recycle(spare);
            Ok(bytes)
        })
    }

    fn moe_graph(&mut self, il: u32, n: usize, step: GroupStep, ids: &[i32], wts: &[f32]) -> Result<()> {
        let cfg = &self.config;
        let (n_embd, k, n) = (cfg.n_embd as i64, cfg.n_expert_used as i64, n as i64);
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let (hidden_s, ffn_inp_s, normed_s) = (self.state.get(0), self.state.get(1), self.state.get(2));
        let row = hidden_s.nb()[1];
        let x = ctx.reshape_3d(ctx.view_2d(normed_s, n_embd, n, row, 0), n_embd, 1, n);
        let ids_t = ctx.new_tensor(GgmlType::I32, &[k, n]);
        ids_t.set_input();
        let wts_t = ctx.new_tensor(GgmlType::F32, &[1, k, n]);
        wts_t.set_input();
        let a = |p: Proj| self.arena.get(3 * il as usize + p.index());
        let moe = build_moe(&ctx, [a(Proj::Gate), a(Proj::Up), a(Proj::Down)], x, ids_t, wts_t);
        // Groups add up in `acc` first and join the residual last, in the same order of
        // additions as one group would: the result does not depend on the arena's size.
        let acc_s = self.state.get(3);
        let view = |t| ctx.view_2d(t, n_embd, n, row, 0);
        let store = match step {
            GroupStep::Only => ctx.cpy(ctx.add(moe, view(ffn_inp_s)), view(hidden_s)),
            GroupStep::First => ctx.cpy(moe, view(acc_s)),
            GroupStep::Middle => ctx.cpy(ctx.add(view(acc_s), moe), view(acc_s)),
            GroupStep::Last => ctx.cpy(ctx.add(ctx.add(view(acc_s), moe), view(ffn_inp_s)), view(hidden_s)),
        };
        let mut g = ctx.graph(GRAPH_NODES);
        g.expand(store);
        let t0 = Instant::now();
        self.alloc.alloc(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        ids_t.write_i32(ids);
        wts_t.write_f32(wts);
        self.backend.compute(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        self.stats.compute += t0.elapsed();
        Ok(())
    }

    /// Output norm and lm head over the last layer's hidden state.
    fn output_logits(&mut self, n: usize, all: bool) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n_out = if all { n } else { 1 };
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let hidden_s = self.state.get(0);
        let row = hidden_s.nb()[1];
        let x = ctx.view_2d(hidden_s, cfg.n_embd as i64, n_out as i64, row, (n - n_out) * row);
        let logits = build_output(&ctx, cfg.rms_eps, &self.weights, self.output_norm, self.output, &self.embd, x);
        logits.set_output();
        let mut g = ctx.graph(GRAPH_NODES);
        g.expand(logits);
        let t0 = Instant::now();
        self.alloc.alloc(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        self.backend.compute(&g).map_err(|e| ffi(&self.dir.path, "compute graph", e))?;
        self.stats.compute += t0.elapsed();
        Ok(logits.read_f32(cfg.n_vocab as usize * n_out))
    }
}
