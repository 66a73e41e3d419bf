//! The model's state between batches, per layer and per sequence: what llama.cpp's
//! `llama-memory-*` classes own. Every layer has a `StateKind`; today a full KV cache
//! (`Kv`: a cell per position of the context) or a sliding-window KV cache (`WindowKv`: a ring
//! of the window plus a batch, as llama.cpp's iSWA cache sizes it, so a sliding layer pays for
//! its window, not the context). A recurrent state (conv + delta-net) or a latent KV (MLA) is
//! one more kind here, with its own bytes and its own view for the layer graph, not a second
//! engine.
//!
//! The module answers three questions: how many bytes the state takes at a context length
//! (`plan`, used by `--memory`, `sage footprint` and `sage plan` without loading anything),
//! where a batch's K and V go and which cells each query sees (`Memory::batch`), and which
//! tokens each sequence holds (the prefix cache: `Memory::tokens`, `keep`). Sequences are a
//! dimension of every tensor from the start (`MemoryOptions::n_seq`, a stream per sequence as
//! llama.cpp's non-unified cache); the engine uses sequence 0.

use std::fmt;
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Buffer, Context, GgmlType, Tensor, TensorSet};

/// KV cells are attended in multiples of this: llama.cpp's KV cache pads its view to 256 cells
/// (`llama_kv_cache::get_n_kv`), and pads its sliding-window cache's size the same way.
pub const KV_PAD: usize = 256;

/// Element type of the K or V cache (llama.cpp's `-ctk` / `-ctv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 5] = [KvType::F32, KvType::F16, KvType::BF16, KvType::Q8_0, KvType::Q4_0];

    pub fn ggml(self) -> GgmlType {
        match self {
            KvType::F32 => GgmlType::F32,
            KvType::F16 => GgmlType::F16,
            KvType::BF16 => GgmlType::BF16,
            KvType::Q8_0 => GgmlType::Q8_0,
            KvType::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// The name llama.cpp's `-ctk` takes: f32, f16, bf16, q8_0, q4_0.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::BF16 => "bf16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    pub fn parse(s: &str) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, KvType::Q8_0 | KvType::Q4_0)
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a layer keeps between batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// K and V of every position of the context.
    Kv,
    /// K and V of the last `n_swa` positions (and room for a batch), in a ring of cells.
    WindowKv { n_swa: u64 },
    /// A linear-attention layer's recurrent state, the same size at any context length: the
    /// convolution's window (`conv` f32 values) and the delta rule's state (`delta` f32
    /// values), per sequence. It cannot be cut back to a shorter prefix.
    Recurrent { conv: u64, delta: u64 },
    /// A latent-attention layer's cache (DeepSeek's MLA, as llama.cpp caches it): per
    /// position one row of `row` values, the compressed latent then the key's RoPE part, K
    /// only; the values are the latent, read as a view of the same rows.
    Latent { row: u64 },
}

impl StateKind {
    pub fn label(self) -> &'static str {
        match self {
            StateKind::Kv => "KV",
            StateKind::WindowKv { .. } => "window KV",
            StateKind::Recurrent { .. } => "recurrent",
            StateKind::Latent { .. } => "latent KV",
        }
    }
}

/// How the state is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryOptions {
    /// Positions each sequence may hold (`--ctx`).
    pub n_ctx: usize,
    /// Sequences held at once, each in its own stream of cells.
    pub n_seq: usize,
    /// Most tokens of one batch (a sliding-window ring holds the window plus a batch).
    pub n_batch: usize,
    pub k_type: KvType,
    pub v_type: KvType,
    /// Attention by `ggml_flash_attn_ext`: V is cached as K is (a row per position); without
    /// it V is cached transposed (a row per channel), as llama.cpp caches it.
    pub flash_attn: bool,
    /// Sliding layers keep a full-length cache (llama.cpp's `--swa-full`).
    pub swa_full: bool,
    /// Checkpoints of the recurrent states kept per sequence (`Memory::checkpoint`), where the
    /// model has recurrent layers.
    pub checkpoints: usize,
}

/// Recurrent-state checkpoints a sequence keeps by default: the end of a prompt and the end
/// of an answer (`Engine::generate` takes them).
pub const CHECKPOINTS: usize = 2;

/// One layer's state: its kind, cells per sequence and bytes (all sequences) of its two
/// tensors: K and V, or for a recurrent layer the convolution's window and the delta rule's
/// state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerPlan {
    pub il: u32,
    pub kind: StateKind,
    pub cells: usize,
    pub k_bytes: u64,
    pub v_bytes: u64,
}

/// The state of every layer at a context length, before anything is allocated.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub layers: Vec<LayerPlan>,
    /// The Walsh-Hadamard matrices that rotate Q, K and V around a quantized cache.
    pub rotation_bytes: u64,
    /// The recurrent states' checkpoints (`MemoryOptions::checkpoints` copies of every
    /// recurrent layer's state, per sequence).
    pub checkpoint_bytes: u64,
}

impl MemoryPlan {
    /// Bytes of the state's tensors (one buffer; what `Memory::bytes` allocates, less the
    /// backend's alignment padding, at most 2 × 4 KiB per tensor on the CPU).
    pub fn total(&self) -> u64 {
        self.layers.iter().map(|l| l.k_bytes + l.v_bytes).sum::<u64>() + self.rotation_bytes + self.checkpoint_bytes
    }

    /// (kind, layers, bytes) per kind present, in layer order of first appearance.
    pub fn by_kind(&self) -> Vec<(StateKind, usize, u64)> {
        let mut out: Vec<(StateKind, usize, u64)> = Vec::new();
        for l in &self.layers {
            match out.iter_mut().find(|(k, ..)| *k == l.kind) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += l.k_bytes + l.v_bytes;
                }
                None => out.push((l.kind, 1, l.k_bytes + l.v_bytes)),
            }
        }
        out
    }
}

/// The rotation sizes llama.cpp uses around a quantized cache (`llama_kv_cache`'s
/// `n_rot_k`, `n_rot_v`): for K the largest power of two from 64 that divides the head size,
/// for V 64; none for an unquantized type or a head size that is not a multiple of 64.
pub fn rotation(head_dim: u64, k: KvType, v: KvType) -> (Option<u64>, Option<u64>) {
    let rk = (k.is_quantized() && head_dim.is_multiple_of(64)).then(|| {
        let mut n = 64;
        while head_dim.is_multiple_of(2 * n) {
            n *= 2;
        }
        n
    });
    let rv = (v.is_quantized() && head_dim.is_multiple_of(64)).then_some(64);
    (rk, rv)
}

/// The kind of each layer.
pub fn layer_kinds(cfg: &ModelConfig) -> Vec<StateKind> {
    (0..cfg.n_layer)
        .map(|il| match cfg.ssm {
            Some(s) if cfg.is_recurrent(il) => StateKind::Recurrent { conv: s.conv_state(), delta: s.delta_state() },
            _ if cfg.mla.is_some() => StateKind::Latent { row: cfg.head_dim },
            _ if cfg.is_swa(il) => StateKind::WindowKv { n_swa: cfg.n_swa },
            _ => StateKind::Kv,
        })
        .collect()
}

/// Cells per sequence of a layer of `kind`: the context for a full cache; for a window, the
/// window plus a batch, padded to `KV_PAD`, at most the context (llama.cpp's iSWA size), or
/// the context with `swa_full` (a ring as long as the context never wraps).
pub fn cells(kind: StateKind, o: &MemoryOptions) -> usize {
    match kind {
        StateKind::Recurrent { .. } => 1,
        StateKind::Kv | StateKind::Latent { .. } => o.n_ctx,
        StateKind::WindowKv { .. } if o.swa_full => o.n_ctx,
        StateKind::WindowKv { n_swa } => {
            (n_swa as usize + o.n_batch).min(o.n_ctx).next_multiple_of(KV_PAD).min(o.n_ctx)
        }
    }
}

/// Whether the model and these options can be cached as asked: a quantized V only with flash
/// attention (as llama.cpp), and every head a whole number of the types' blocks.
pub fn check(cfg: &ModelConfig, o: &MemoryOptions) -> std::result::Result<(), String> {
    if o.v_type.is_quantized() && !o.flash_attn {
        return Err(format!(
            "a quantized V cache (--cache-type-v {}) needs flash attention (--flash-attn on), as in llama.cpp",
            o.v_type
        ));
    }
    if cfg.mla.is_some() && (o.k_type.is_quantized() || o.v_type.is_quantized()) {
        return Err(format!(
            "a latent-attention cache (this model's) is kept in f16, bf16 or f32, not {}",
            if o.k_type.is_quantized() { o.k_type } else { o.v_type }
        ));
    }
    for (what, t) in [("K", o.k_type), ("V", o.v_type)] {
        let b = t.ggml().block_size();
        if !cfg.head_dim.is_multiple_of(b) {
            return Err(format!(
                "a {t} {what} cache stores each head in blocks of {b} values, but this model's heads have {} (use f16, bf16 or f32)",
                cfg.head_dim
            ));
        }
    }
    if o.n_ctx == 0 || o.n_seq == 0 || o.n_batch == 0 {
        return Err("context, sequences and batch must be positive".into());
    }
    Ok(())
}

/// The state's tensors at `o.n_ctx`, with their bytes, before anything is allocated.
pub fn plan(cfg: &ModelConfig, o: &MemoryOptions) -> MemoryPlan {
    let n_embd_kv = cfg.head_dim * cfg.n_head_kv as u64;
    let row = |t: KvType| t.ggml().row_size(n_embd_kv).expect("heads checked against the block size");
    let layers: Vec<LayerPlan> = layer_kinds(cfg)
        .into_iter()
        .enumerate()
        .map(|(il, kind)| {
            let c = (cells(kind, o) * o.n_seq) as u64;
            let (k_bytes, v_bytes) = match kind {
                StateKind::Recurrent { conv, delta } => (4 * conv * c, 4 * delta * c),
                StateKind::Latent { row } => (o.k_type.ggml().row_size(row).expect("checked unquantized") * c, 0),
                _ => (row(o.k_type) * c, row(o.v_type) * c),
            };
            LayerPlan { il: il as u32, kind, cells: cells(kind, o), k_bytes, v_bytes }
        })
        .collect();
    let (rk, rv) = rotation(cfg.head_dim, o.k_type, o.v_type);
    let rotation_bytes = [rk, rv].into_iter().flatten().map(|n| n * n * 4).sum();
    let recurrent: u64 = layers
        .iter()
        .filter(|l: &&LayerPlan| matches!(l.kind, StateKind::Recurrent { .. }))
        .map(|l| l.k_bytes + l.v_bytes)
        .sum();
    MemoryPlan { layers, rotation_bytes, checkpoint_bytes: recurrent * o.checkpoints as u64 }
}

/// Where one batch of a sequence goes, per kind of layer: the cells it attends over, the
/// cells its K and V are stored in, and which cells each of its queries sees.
pub struct BatchPlan {
    /// Positions already in the sequence (the batch's first position).
    pub n_past: usize,
    pub n: usize,
    /// Per kind of layer (`Memory::kind_of`): its geometry.
    pub kinds: Vec<KindBatch>,
}

pub struct KindBatch {
    pub kind: StateKind,
    /// Cells attended over, from cell 0 (padded to `KV_PAD`; the mask hides the padding).
    pub n_kv: usize,
    /// (first cell, first token of the batch, tokens): where the batch's K and V are stored;
    /// two pieces where a ring wraps.
    pub stores: Vec<(usize, usize, usize)>,
    /// [n][n_kv]: 0 where query i sees the cell, -inf elsewhere.
    pub mask: Vec<f32>,
}

impl KindBatch {
    /// The cell each token of the batch is stored in, in batch order (`stores` unrolled):
    /// the row indices of the K and V stores.
    pub fn cells(&self) -> Vec<i64> {
        let mut cells = vec![0i64; self.stores.iter().map(|&(_, first, len)| first + len).max().unwrap_or(0)];
        for &(cell, first, len) in &self.stores {
            for (i, c) in cells[first..first + len].iter_mut().enumerate() {
                *c = (cell + i) as i64;
            }
        }
        cells
    }
}

/// One layer's cache as the layer graph sees it for a batch.
pub struct LayerKv<'a> {
    /// K [n_embd_kv, cells] (this sequence's stream); V the same with flash attention, else
    /// transposed [cells, n_embd_kv]; a latent layer's V is its K (`StateKind::Latent`).
    pub k: Tensor<'a>,
    pub v: Tensor<'a>,
    pub k_type: GgmlType,
    pub v_type: GgmlType,
    pub v_trans: bool,
    pub n_kv: usize,
    pub stores: &'a [(usize, usize, usize)],
    /// The cell of each token of the batch (`KindBatch::cells`, i64 [n]): K, and V with flash
    /// attention, are stored by row index there (`ggml_set_rows`, as llama.cpp stores them; a
    /// copy into a view at a cell's offset is not one a quantized cache's rows allow on every
    /// backend: Vulkan addresses such a view in whole blocks from an aligned base).
    pub cells: Tensor<'a>,
    /// The batch's mask for this layer's kind ([n_kv, n] f32; f16 with flash attention).
    pub mask: Tensor<'a>,
    pub flash_attn: bool,
    /// Hadamard rotations around a quantized K / V cache (`rotation`).
    pub rot_k: Option<Tensor<'a>>,
    pub rot_v: Option<Tensor<'a>>,
}

/// One recurrent layer's state as the layer graph sees it: this sequence's convolution window
/// (f32 [(d_conv - 1) · channels]) and delta-rule state (f32 [d_state² · value heads]), read
/// by the batch and written over with what follows it.
pub struct LayerRs<'a> {
    pub conv: Tensor<'a>,
    pub delta: Tensor<'a>,
}

/// What a layer's graph reads and writes between batches.
pub enum LayerState<'a> {
    Kv(LayerKv<'a>),
    Recurrent(LayerRs<'a>),
}

/// Every layer's state, allocated once on the backend.
pub struct Memory {
    opts: MemoryOptions,
    plan: MemoryPlan,
    /// Per layer: index of its kind in `kinds`.
    kind_of: Vec<usize>,
    kinds: Vec<StateKind>,
    /// Per layer: the indices in `set` of its two tensors (K and V, or a recurrent layer's
    /// window and state; a latent layer's V is its K); then the rotation matrices.
    set: TensorSet,
    slots: Vec<(usize, usize)>,
    rot: (Option<usize>, Option<usize>),
    /// Per checkpoint slot, per layer: the indices in `set` of its copies of the layer's two
    /// recurrent tensors (None for other layers).
    ckpt_tensors: Vec<Vec<Option<(usize, usize)>>>,
    /// Per sequence, per checkpoint slot: the position it was taken at and when (a counter:
    /// the oldest is written over first).
    ckpts: Vec<Vec<Option<(usize, u64)>>>,
    ckpt_clock: u64,
    buf: Buffer,
    /// The tokens each sequence holds, in position order.
    seqs: Vec<Vec<u32>>,
}

fn hadamard(n: usize) -> Vec<f32> {
    // Sylvester's construction, scaled to be orthonormal (llama.cpp's ggml_gen_hadamard).
    let mut m = vec![0f32; n * n];
    // 1.0 / sqrtf(n) in C: a double quotient of the float root, stored as a float.
    m[0] = (1.0 / (n as f32).sqrt() as f64) as f32;
    let mut s = 1;
    while s < n {
        for i in 0..s {
            for j in 0..s {
                let v = m[i * n + j];
                m[(i + s) * n + j] = v;
                m[i * n + j + s] = v;
                m[(i + s) * n + j + s] = -v;
            }
        }
        s *= 2;
    }
    m
}

impl Memory {
    pub fn new(backend: &Backend, cfg: &ModelConfig, o: MemoryOptions, path: &Path) -> Result<Memory> {
        check(cfg, &o).map_err(Error::Usage)?;
        let plan = plan(cfg, &o);
        let mut kinds: Vec<StateKind> = Vec::new();
        let kind_of = plan
            .layers
            .iter()
            .map(|l| match kinds.iter().position(|k| *k == l.kind) {
                Some(i) => i,
                None => {
                    kinds.push(l.kind);
                    kinds.len() - 1
                }
            })
            .collect();
        let n_embd_kv = (cfg.head_dim * cfg.n_head_kv as u64) as i64;
        let mut set = TensorSet::new((2 + 2 * o.checkpoints) * cfg.n_layer as usize + 2);
        let mut slots = Vec::with_capacity(plan.layers.len());
        for l in &plan.layers {
            let (c, s) = (l.cells as i64, o.n_seq as i64);
            let slot = match l.kind {
                // llama.cpp's names of the two (`cache_r_l`, `cache_s_l`); f32 as there.
                StateKind::Recurrent { conv, delta } => (
                    set.add(GgmlType::F32, &[conv as i64, s], &format!("cache_r_l{}", l.il)),
                    set.add(GgmlType::F32, &[delta as i64, s], &format!("cache_s_l{}", l.il)),
                ),
                StateKind::Latent { row } => {
                    let k = set.add(o.k_type.ggml(), &[row as i64, c, s], &format!("cache_k_l{}", l.il));
                    (k, k)
                }
                _ => (
                    set.add(o.k_type.ggml(), &[n_embd_kv, c, s], &format!("cache_k_l{}", l.il)),
                    if o.flash_attn {
                        set.add(o.v_type.ggml(), &[n_embd_kv, c, s], &format!("cache_v_l{}", l.il))
                    } else {
                        set.add(o.v_type.ggml(), &[c, n_embd_kv, s], &format!("cache_v_l{}", l.il))
                    },
                ),
            };
            slots.push(slot);
        }
        let (rk, rv) = rotation(cfg.head_dim, o.k_type, o.v_type);
        let rot = (
            rk.map(|n| set.add(GgmlType::F32, &[n as i64, n as i64], "attn_rot_k")),
            rv.map(|n| set.add(GgmlType::F32, &[n as i64, n as i64], "attn_rot_v")),
        );
        let has_recurrent = plan.layers.iter().any(|l| matches!(l.kind, StateKind::Recurrent { .. }));
        let n_ckpt = if has_recurrent { o.checkpoints } else { 0 };
        let ckpt_tensors = (0..n_ckpt)
            .map(|j| {
                plan.layers
                    .iter()
                    .map(|l| match l.kind {
                        StateKind::Recurrent { conv, delta } => Some((
                            set.add(GgmlType::F32, &[conv as i64, o.n_seq as i64], &format!("ckpt{j}_r_l{}", l.il)),
                            set.add(GgmlType::F32, &[delta as i64, o.n_seq as i64], &format!("ckpt{j}_s_l{}", l.il)),
                        )),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let buf = backend.alloc_ctx_tensors(set.context()).map_err(|e| super::ffi(path, "KV cache", e))?;
        buf.clear(0);
        for (i, n) in [(rot.0, rk), (rot.1, rv)] {
            if let (Some(i), Some(n)) = (i, n) {
                set.get(i).write_f32(&hadamard(n as usize));
            }
        }
        Ok(Memory {
            opts: o,
            plan,
            kind_of,
            kinds,
            set,
            slots,
            rot,
            ckpt_tensors,
            ckpts: vec![vec![None; n_ckpt]; o.n_seq],
            ckpt_clock: 0,
            buf,
            seqs: vec![Vec::new(); o.n_seq],
        })
    }

    pub fn options(&self) -> &MemoryOptions {
        &self.opts
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes of the state's buffer on the backend.
    pub fn bytes(&self) -> usize {
        self.buf.size()
    }

    /// The tokens sequence `seq` holds, in order.
    pub fn tokens(&self, seq: usize) -> &[u32] {
        &self.seqs[seq]
    }

    /// Keep the first `n` tokens of sequence `seq` and forget the rest; returns how many are
    /// kept. A sliding-window ring keeps only the last cells written: when the window before
    /// position `n` has been written over since, nothing can be kept (0), and the sequence
    /// starts again (llama.cpp's server re-processes the prompt in that case too). A recurrent
    /// state holds the whole sequence and cannot be cut back: a shorter prefix is kept only
    /// where a checkpoint was taken at or before `n` (the latest such: its states are restored
    /// and its position kept), else nothing is.
    pub fn keep(&mut self, seq: usize, n: usize) -> usize {
        let len = self.seqs[seq].len();
        let mut n = n.min(len);
        let recurrent = self.kinds.iter().any(|k| matches!(k, StateKind::Recurrent { .. }));
        if recurrent && n < len {
            let best = self.ckpts[seq]
                .iter()
                .enumerate()
                .filter_map(|(j, c)| c.filter(|&(p, _)| p <= n && p > 0).map(|(p, _)| (p, j)))
                .max();
            n = match best {
                Some((p, j)) => {
                    self.restore(seq, j);
                    p
                }
                None => 0,
            };
        }
        // Checkpoints past what is kept held other tokens after it.
        for c in self.ckpts[seq].iter_mut() {
            if c.is_some_and(|(p, _)| p > n) {
                *c = None;
            }
        }
        let lost = self.kinds.iter().any(|&k| match k {
            StateKind::Kv | StateKind::Latent { .. } => false,
            StateKind::Recurrent { .. } => false,
            StateKind::WindowKv { n_swa } => {
                let c = cells(k, &self.opts);
                n > 0 && n.saturating_sub(n_swa as usize) < len.saturating_sub(c)
            }
        });
        let n = if lost { 0 } else { n };
        if n == 0 {
            self.clear_recurrent(seq);
        }
        self.seqs[seq].truncate(n);
        n
    }

    /// Checkpoint sequence `seq`'s recurrent states at its current length (into a free slot,
    /// else over the oldest), so that `keep` can go back to it. Nothing to do for a model
    /// without recurrent layers, an empty sequence or a position already checkpointed.
    pub fn checkpoint(&mut self, seq: usize) {
        let pos = self.seqs[seq].len();
        let slots = &self.ckpts[seq];
        if slots.is_empty() || pos == 0 || slots.iter().any(|c| c.is_some_and(|(p, _)| p == pos)) {
            return;
        }
        let j = match slots.iter().position(|c| c.is_none()) {
            Some(j) => j,
            None => (0..slots.len()).min_by_key(|&j| slots[j].map_or(0, |(_, t)| t)).expect("a slot"),
        };
        self.copy_states(seq, j, true);
        self.ckpt_clock += 1;
        self.ckpts[seq][j] = Some((pos, self.ckpt_clock));
    }

    /// The positions sequence `seq` holds checkpoints at, ascending.
    pub fn checkpoints(&self, seq: usize) -> Vec<usize> {
        let mut p: Vec<usize> = self.ckpts[seq].iter().flatten().map(|&(p, _)| p).collect();
        p.sort_unstable();
        p
    }

    fn restore(&mut self, seq: usize, j: usize) {
        self.copy_states(seq, j, false);
    }

    /// Sequence `seq`'s row of every recurrent tensor to checkpoint slot `j` (`save`) or back.
    fn copy_states(&self, seq: usize, j: usize, save: bool) {
        for (il, pair) in self.ckpt_tensors[j].iter().enumerate() {
            let Some((r, s)) = *pair else { continue };
            let (live_r, live_s) = self.slots[il];
            for (live, copy) in [(live_r, r), (live_s, s)] {
                let (a, b) = if save {
                    (self.set.get(live), self.set.get(copy))
                } else {
                    (self.set.get(copy), self.set.get(live))
                };
                let row = a.nb()[1];
                b.write(seq * row, &a.read_bytes(seq * row, row));
            }
        }
    }

    /// Sequence `seq`'s recurrent states back to zero: what a sequence starts from.
    fn clear_recurrent(&mut self, seq: usize) {
        for (il, l) in self.plan.layers.iter().enumerate() {
            if let StateKind::Recurrent { .. } = l.kind {
                let (r, s) = self.slots[il];
                for t in [self.set.get(r), self.set.get(s)] {
                    let row = t.nb()[1];
                    t.write(seq * row, &vec![0u8; row]);
                }
            }
        }
    }

    /// Where a batch of `n` tokens after sequence `seq`'s goes, for every kind of layer, and
    /// what each of its queries sees: in a full cache, every earlier position and itself; in a
    /// window, those less than `n_swa` positions back (llama.cpp's `is_masked_swa`,
    /// transformers' sliding window). Cell c of a ring of C cells holds the latest position
    /// p ≡ c (mod C) written; since C ≥ n_swa + n, no position a query needs is written over
    /// by the batch itself.
    pub fn batch(&self, seq: usize, n: usize) -> Result<BatchPlan> {
        let n_past = self.seqs[seq].len();
        if n_past + n > self.opts.n_ctx {
            return Err(Error::Usage(format!(
                "{n} tokens after {n_past} do not fit the context of {} (--ctx)",
                self.opts.n_ctx
            )));
        }
        if n > self.opts.n_batch {
            return Err(Error::Usage(format!("a batch of {n} tokens is more than {} (--batch)", self.opts.n_batch)));
        }
        Ok(self.batch_at(n_past, n))
    }

    /// The largest batch at the end of the context: what the compute buffer must hold at most
    /// (every kind's cells attended over in full).
    pub fn worst_batch(&self) -> BatchPlan {
        let n = self.opts.n_batch.min(self.opts.n_ctx);
        self.batch_at(self.opts.n_ctx - n, n)
    }

    fn batch_at(&self, n_past: usize, n: usize) -> BatchPlan {
        let end = n_past + n;
        let kinds = self
            .kinds
            .iter()
            .map(|&kind| {
                let c = cells(kind, &self.opts);
                match kind {
                    StateKind::Recurrent { .. } => KindBatch { kind, n_kv: 0, stores: Vec::new(), mask: Vec::new() },
                    StateKind::Kv | StateKind::Latent { .. } => {
                        let n_kv = end.next_multiple_of(KV_PAD).min(c);
                        let mut mask = vec![f32::NEG_INFINITY; n_kv * n];
                        for i in 0..n {
                            mask[i * n_kv..=i * n_kv + n_past + i].fill(0.0);
                        }
                        KindBatch { kind, n_kv, stores: vec![(n_past, 0, n)], mask }
                    }
                    StateKind::WindowKv { n_swa } => {
                        let n_swa = n_swa as usize;
                        let n_kv = end.min(c).next_multiple_of(KV_PAD).min(c);
                        let mut mask = vec![f32::NEG_INFINITY; n_kv * n];
                        for cell in 0..n_kv.min(end) {
                            // The latest position below `end` that lives in this cell.
                            let p = cell + (end - 1 - cell) / c * c;
                            for i in 0..n {
                                let q = n_past + i;
                                if p <= q && q - p < n_swa {
                                    mask[i * n_kv + cell] = 0.0;
                                }
                            }
                        }
                        let first = n_past % c;
                        let stores = if first + n <= c {
                            vec![(first, 0, n)]
                        } else {
                            vec![(first, 0, c - first), (0, c - first, n - (c - first))]
                        };
                        KindBatch { kind, n_kv, stores, mask }
                    }
                }
            })
            .collect();
        BatchPlan { n_past, n, kinds }
    }

    /// The batch's tokens are in the cache: sequence `seq` holds them now.
    pub fn commit(&mut self, seq: usize, tokens: &[u32]) {
        self.seqs[seq].extend_from_slice(tokens);
    }

    /// Index of layer `il`'s kind among `BatchPlan::kinds`.
    pub fn kind_of(&self, il: u32) -> usize {
        self.kind_of[il as usize]
    }

    pub fn kinds(&self) -> &[StateKind] {
        &self.kinds
    }

    /// Layer `il`'s cache for a batch of sequence `seq`, in graph context `ctx`, with the
    /// batch's mask and store cells for its kind.
    pub fn layer<'a>(
        &'a self,
        ctx: &'a Context,
        il: u32,
        seq: usize,
        b: &'a BatchPlan,
        mask: Tensor<'a>,
        cells: Tensor<'a>,
    ) -> LayerState<'a> {
        let kb = &b.kinds[self.kind_of(il)];
        let (ik, iv) = self.slots[il as usize];
        if let StateKind::Recurrent { .. } = kb.kind {
            let seq_row = |t: Tensor<'a>| {
                let [ne0, ..] = t.ne();
                ctx.view_2d(t, ne0, 1, t.nb()[1], seq * t.nb()[1])
            };
            return LayerState::Recurrent(LayerRs {
                conv: seq_row(self.set.get(ik)),
                delta: seq_row(self.set.get(iv)),
            });
        }
        let stream = |t: Tensor<'a>| {
            let [ne0, ne1, ..] = t.ne();
            let nb = t.nb();
            if self.opts.n_seq == 1 {
                t
            } else {
                ctx.view_2d(t, ne0, ne1, nb[1], seq * nb[2])
            }
        };
        let (k, v) = (stream(self.set.get(ik)), stream(self.set.get(iv)));
        let latent = matches!(kb.kind, StateKind::Latent { .. });
        LayerState::Kv(LayerKv {
            k,
            v,
            k_type: self.opts.k_type.ggml(),
            v_type: self.opts.v_type.ggml(),
            v_trans: !self.opts.flash_attn && !latent,
            n_kv: kb.n_kv,
            stores: &kb.stores,
            cells,
            mask,
            flash_attn: self.opts.flash_attn,
            rot_k: self.rot.0.map(|i| self.set.get(i)),
            rot_v: self.rot.1.map(|i| self.set.get(i)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(n_ctx: usize, n_batch: usize) -> MemoryOptions {
        MemoryOptions {
            n_ctx,
            n_seq: 1,
            n_batch,
            k_type: KvType::F16,
            v_type: KvType::F16,
            flash_attn: false,
            swa_full: false,
            checkpoints: CHECKPOINTS,
        }
    }

    #[test]
    fn window_cells_are_window_plus_batch_padded() {
        let w = StateKind::WindowKv { n_swa: 128 };
        assert_eq!(cells(w, &opts(8192, 512)), 768);
        assert_eq!(cells(w, &opts(256, 512)), 256);
        assert_eq!(cells(StateKind::Kv, &opts(8192, 512)), 8192);
    }

    #[test]
    fn hadamard_is_orthonormal() {
        let n = 64;
        let h = hadamard(n);
        for i in 0..n {
            for j in 0..n {
                let dot: f32 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5, "({i},{j}) = {dot}");
            }
        }
    }

    #[test]
    fn rotation_sizes_follow_llama_cpp() {
        assert_eq!(rotation(128, KvType::Q8_0, KvType::Q8_0), (Some(128), Some(64)));
        assert_eq!(rotation(64, KvType::Q4_0, KvType::F16), (Some(64), None));
        assert_eq!(rotation(192, KvType::Q8_0, KvType::Q8_0), (Some(64), Some(64)));
        assert_eq!(rotation(32, KvType::Q8_0, KvType::Q8_0), (None, None));
        assert_eq!(rotation(128, KvType::F16, KvType::BF16), (None, None));
    }
}
