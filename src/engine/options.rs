//! What the engine is told (`EngineOptions`, `ArenaSize`, `FlashAttn`) and what it reports
//! (`EngineStats`, `MemoryUse`).

use std::time::Duration;

use super::io_thread::PrefetchStats;
use super::memory::KvType;
use super::scheduler::SchedStats;

/// How big the expert arena is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArenaSize {
    /// At most this many bytes.
    Bytes(u64),
    /// This many expert slots.
    Experts(usize),
    /// One slot per expert present in the model directory.
    All,
    /// A total for the process (`--memory`): the arena gets what remains after the base,
    /// every layer's state at the context length, the compute buffer of the largest batch at
    /// that context (measured on its graph), staging buffers and the process's own memory
    /// (`Engine::budget`), at most every expert.
    Memory(u64),
}

/// Whether and how the engine uses the experts' cold copies (`sage-convert --cold-quant`).
/// Only a streaming arena (smaller than the experts present) uses them; with every expert
/// resident they change nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColdUse {
    /// Full records only (the default: exact).
    #[default]
    Off,
    /// A miss loads the expert's cold record; a hit on a cold-resident expert loads its full
    /// record into its slot (an upgrade): experts chosen again run at full precision.
    Upgrade,
    /// Every load is a cold record, never upgraded: the model runs as if converted at the
    /// cold type (what the tests compare against such a conversion).
    NeverUpgrade,
}

/// Whether attention runs as one fused `ggml_flash_attn_ext` (llama.cpp's `-fa`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttn {
    /// Scores, softmax and KQ·V as separate ops over a transposed V cache: what sage computed
    /// before flash attention, bit for bit.
    #[default]
    Off,
    On,
    /// On where the backend runs it for the model's heads and cache types (the CLI's default,
    /// as llama.cpp's).
    Auto,
}

impl FlashAttn {
    pub fn parse(s: &str) -> Option<FlashAttn> {
        match s.to_ascii_lowercase().as_str() {
            "on" | "1" | "true" => Some(FlashAttn::On),
            "off" | "0" | "false" => Some(FlashAttn::Off),
            "auto" => Some(FlashAttn::Auto),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Device name: "cpu", "gpu", or one listed by `ggml::devices()`.
    pub device: String,
    pub threads: usize,
    /// KV cache length in tokens.
    pub n_ctx: usize,
    pub arena: ArenaSize,
    /// Element types of the K and V caches (llama.cpp's `-ctk`, `-ctv`); a quantized V needs
    /// flash attention.
    pub k_type: KvType,
    pub v_type: KvType,
    /// Flash attention (library default off; the CLI's is auto).
    pub flash_attn: FlashAttn,
    /// Sliding-window layers keep a full-length cache instead of a ring of the window
    /// (llama.cpp's `--swa-full`).
    pub swa_full: bool,
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
    /// Benchmarks only: take each token's experts from this routing trace instead of the
    /// router (token at position p uses the trace's token p mod its length, every chosen
    /// expert weighted 1/k). The logits are then not the model's; what it measures is the
    /// arena under realistic reuse on a model whose own routing is random. Implies the
    /// streaming path (two graphs per layer) and no prefetch (its prediction is the router's).
    pub route_trace: Option<std::sync::Arc<super::trace::RouteTrace>>,
    /// Cache-aware routing (`router::CacheBias`): prefer experts already in the arena among
    /// those close to the top-k. Exact routing (bias 0) by default. It changes the model's
    /// output; `sage eval` measures by how much. Only the streaming path routes with it (with
    /// every expert resident there is nothing to prefer).
    pub cache_bias: super::router::CacheBias,
    /// Load the experts' cold copies on misses (`ColdUse`); a model directory without them is
    /// refused. A streaming arena in use keeps the files' layout (no repacking) and a stride
    /// that holds either record.
    pub cold: ColdUse,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: "cpu".into(),
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n_ctx: 4096,
            arena: ArenaSize::All,
            k_type: KvType::F16,
            v_type: KvType::F16,
            flash_attn: FlashAttn::Off,
            swa_full: false,
            n_batch: 512,
            repack: true,
            policy: scheduler_default().into(),
            page_cache: false,
            prefetch: true,
            load_slice: 16 << 20,
            read_ahead: 2,
            load_threads: 0,
            arena_repack: None,
            fused: true,
            route_trace: None,
            cache_bias: super::router::CacheBias::EXACT,
            cold: ColdUse::Off,
        }
    }
}

fn scheduler_default() -> &'static str {
    super::scheduler::POLICIES[0]
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
    /// Every layer's state: the KV caches (fixed by --ctx).
    pub kv: usize,
    /// ggml's compute buffer (grows to the largest graph, then stays) and the activations
    /// carried between graphs.
    pub compute: usize,
    /// What the budget set aside for the compute buffer: the largest graph a batch can need
    /// at the context length, measured when loading (0 when no budget was given).
    pub compute_reserved: usize,
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
