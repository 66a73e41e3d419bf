//! The runtime: the base resident on a ggml backend, experts streamed from the shards into a
//! fixed-size arena, and the forward pass built from the model family's graph
//! (`arch::Arch::build_layer`) and the pieces every family shares (`graph`).
//!
//! Each job has its own file:
//!
//! | file | job |
//! |---|---|
//! | `options` | what the engine is told and what it reports |
//! | `base` | the base weights: loading and repacking |
//! | `memory` | every layer's state between batches (KV, window KV), per sequence |
//! | `budget` | a total (`--memory`) split into base, state, compute, staging and the arena |
//! | `arena` | the arena: geometry, slot addresses, loading a record into a slot |
//! | `fused` | all experts resident: a batch is one graph, router included |
//! | `streaming` | a smaller arena: two graphs per layer, routing on the CPU between them |
//! | `predict` | which experts the next layer will want, and whether to read them early |
//! | `io_thread` | the thread that reads records ahead of the loads that need them |
//! | `scheduler` | which expert is in which slot (`Policy`: LRU, LFRU), hits and misses |
//! | `router` | softmax → top-k → renormalize, over a pool |
//! | `trace` | the routing recorded for `sage profile` |
//! | `sampler`, `generate` | text in, tokens out |

pub mod arena;
mod base;
pub mod budget;
mod fused;
pub mod generate;
pub use generate::{Finish, GenOptions, Generation};
pub mod io_thread;
pub mod memory;
pub mod options;
pub mod predict;
pub mod router;
pub mod sampler;
pub mod scheduler;
mod streaming;
pub mod trace;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ggml::{Allocator, Backend, Buffer, Context, FfiError, GgmlType, Graph, Tensor, TensorSet};
use crate::graph::LayerInput;
use crate::io::Record;
use crate::model_dir::ModelDir;
use arena::Arena;
use base::BaseWeights;
pub use budget::MemoryFit;
use fused::Fused;
use io_thread::Prefetcher;
pub use memory::{KvType, Memory, MemoryOptions, KV_PAD};
pub use options::{ArenaSize, ColdUse, EngineOptions, EngineStats, FlashAttn, MemoryUse};
use predict::PrefetchGate;
use scheduler::{SchedStats, Scheduler};
use trace::RouteTrace;

const GRAPH_NODES: usize = 1024;
const GRAPH_TENSORS: usize = 1024;
fn ffi(path: &Path, what: &str, e: FfiError) -> Error {
    Error::Tensor { path: path.to_path_buf(), tensor: what.to_string(), source: e }
}

/// Runs graphs on the backend: allocates their intermediates (one buffer reused across
/// graphs), lets the caller write the inputs, computes, and counts the time spent.
struct Runner {
    backend: Backend,
    alloc: Allocator,
    /// On a GPU backend, an allocator that only measures what a graph needs, and the
    /// allocators a larger graph outgrew, kept (with their device buffers) until the engine
    /// drops. ggml's allocator frees its buffer when a graph needs a larger one; on Vulkan
    /// (Mesa's lavapipe) freeing a compute buffer that earlier graphs used made the driver's
    /// queue thread read freed memory in a later graph (found with valgrind: a segfault in
    /// half the runs of a streaming arena, where graphs of three sizes alternate). A larger
    /// graph gets a fresh allocator instead; sizes grow a few times per run at most.
    measure: Option<Allocator>,
    outgrown: Vec<Allocator>,
    path: PathBuf,
    compute: Duration,
    /// Measuring (`Engine::measure_compute`): graphs are sized, not allocated or computed, and
    /// the largest sizes are kept here: (compute buffer, the CPU backend's work buffer).
    dry: Option<(usize, usize)>,
    threads: usize,
}

impl Runner {
    fn new(backend: Backend, path: &Path, threads: usize) -> Runner {
        let measure = (!backend.is_cpu()).then(|| Allocator::new(&backend));
        Runner {
            alloc: Allocator::new(&backend),
            measure,
            outgrown: Vec::new(),
            backend,
            path: path.to_path_buf(),
            compute: Duration::ZERO,
            dry: None,
            threads,
        }
    }

    fn run(&mut self, g: &Graph<'_>, write_inputs: impl FnOnce()) -> Result<()> {
        if let Some((buf, work)) = self.dry {
            // An allocator of its own: sizing nothing changes the one that computes.
            let b = Allocator::new(&self.backend).measure(g);
            let w = if self.backend.is_cpu() { Context::cpu_work_size(g, self.threads) } else { 0 };
            self.dry = Some((buf.max(b), work.max(w)));
            return Ok(());
        }
        let t0 = Instant::now();
        if let Some(m) = &mut self.measure {
            let have = self.alloc.buffer_size();
            if have > 0 && m.measure(g) > have {
                let old = std::mem::replace(&mut self.alloc, Allocator::new(&self.backend));
                self.outgrown.push(old);
            }
        }
        self.alloc.alloc(g).map_err(|e| ffi(&self.path, "compute graph", e))?;
        write_inputs();
        self.backend.compute(g).map_err(|e| ffi(&self.path, "compute graph", e))?;
        self.compute += t0.elapsed();
        Ok(())
    }
}

/// A batch's inputs: token ids, positions and per kind of layer state a mask ([n_kv, n],
/// `memory::BatchPlan`; f16 with flash attention, as llama.cpp makes it) and the cells its
/// K and V go to (i64 [n]), the same for every layer of that kind.
struct Inputs<'a> {
    ctx: &'a Context,
    ids: Tensor<'a>,
    pos: Tensor<'a>,
    /// M-RoPE's positions (i32 [4 n]), where the model has M-RoPE.
    pos_multi: Option<Tensor<'a>>,
    masks: Vec<Tensor<'a>>,
    cells: Vec<Tensor<'a>>,
    plan: &'a memory::BatchPlan,
}

impl<'a> Inputs<'a> {
    fn new(ctx: &'a Context, cfg: &ModelConfig, mem: &Memory, plan: &'a memory::BatchPlan) -> Inputs<'a> {
        let n = plan.n as i64;
        let ids = ctx.new_tensor(GgmlType::I32, &[n]);
        let pos = ctx.new_tensor(GgmlType::I32, &[n]);
        pos.set_input();
        let pos_multi = cfg.rope_sections.map(|_| {
            let p = ctx.new_tensor(GgmlType::I32, &[4 * n]);
            p.set_input();
            p
        });
        let ty = if mem.options().flash_attn { GgmlType::F16 } else { GgmlType::F32 };
        let masks = plan
            .kinds
            .iter()
            .map(|k| {
                // A recurrent kind has no mask: a placeholder no graph reads.
                let m = ctx.new_tensor(ty, &[k.n_kv.max(1) as i64, n]);
                m.set_input();
                m
            })
            .collect();
        let cells = plan
            .kinds
            .iter()
            .map(|_| {
                let c = ctx.new_tensor(GgmlType::I64, &[n]);
                c.set_input();
                c
            })
            .collect();
        Inputs { ctx, ids, pos, pos_multi, masks, cells, plan }
    }

    /// What the family's graph of layer `il` starts from, with the residual stream `x`.
    fn layer(
        &self,
        cfg: &'a ModelConfig,
        base: &'a BaseWeights,
        mem: &'a Memory,
        il: u32,
        x: Tensor<'a>,
    ) -> LayerInput<'a> {
        let kind = mem.kind_of(il);
        let state = mem.layer(self.ctx, il, 0, self.plan, self.masks[kind], self.cells[kind]);
        LayerInput { ctx: self.ctx, cfg, w: base.layer(il), x, pos: self.pos, pos_multi: self.pos_multi, state }
    }

    /// Write them once the graph is allocated (the ids only where the graph reads them).
    fn write(&self, tokens: Option<&[u32]>) {
        if let Some(tokens) = tokens {
            self.ids.write_i32(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
        }
        let n_past = self.plan.n_past as i32;
        let pos: Vec<i32> = (0..self.plan.n as i32).map(|i| n_past + i).collect();
        if self.pos.is_allocated() {
            self.pos.write_i32(&pos);
        }
        if let Some(p) = self.pos_multi.filter(|p| p.is_allocated()) {
            // [p, p, p, 0] per token, component after component (llama.cpp's text positions).
            let zeros = vec![0; pos.len()];
            p.write_i32(&[&pos[..], &pos[..], &pos[..], &zeros[..]].concat());
        }
        // A graph of one layer uses one kind's mask; the others are not allocated.
        for (t, k) in self.masks.iter().zip(&self.plan.kinds) {
            if !t.is_allocated() {
                continue;
            }
            if t.ty() == GgmlType::F16 {
                // 0 and -inf are exact in f16: 0x0000 and 0xFC00.
                let bytes: Vec<u8> =
                    k.mask.iter().flat_map(|&m| if m == 0.0 { [0u8, 0] } else { 0xFC00u16.to_le_bytes() }).collect();
                t.write(0, &bytes);
            } else {
                t.write_f32(&k.mask);
            }
        }
        for (t, k) in self.cells.iter().zip(&self.plan.kinds) {
            if t.is_allocated() {
                t.write_i64(&k.cells());
            }
        }
    }
}

/// Activations the streaming mode carries between its graphs, [n_embd, n_batch] f32 each.
struct State {
    set: TensorSet,
    buf: Buffer,
}

/// Views of `State` over a batch of n tokens.
struct StateViews<'a> {
    /// The residual stream between layers.
    hidden: Tensor<'a>,
    /// The residual stream after attention.
    ffn_inp: Tensor<'a>,
    /// What the router and the experts see.
    normed: Tensor<'a>,
    /// The sum of a batch's expert groups so far.
    acc: Tensor<'a>,
    /// A shared expert's output, for families that have one.
    shared: Option<Tensor<'a>>,
}

const STATE: [&str; 5] = ["hidden", "ffn_inp", "normed", "moe_acc", "shared"];

impl State {
    fn new(backend: &Backend, cfg: &ModelConfig, n_batch: usize, path: &Path) -> Result<State> {
        let n = if cfg.n_ff_shexp > 0 { 5 } else { 4 };
        let mut set = TensorSet::new(n);
        for name in &STATE[..n] {
            set.add(GgmlType::F32, &[cfg.n_embd as i64, n_batch as i64], name);
        }
        let buf = backend.alloc_ctx_tensors(set.context()).map_err(|e| ffi(path, "activations", e))?;
        Ok(State { set, buf })
    }

    fn views<'a>(&'a self, ctx: &'a Context, n: i64) -> StateViews<'a> {
        let t = |i: usize| {
            let s = self.set.get(i);
            ctx.view_2d(s, s.ne()[0], n, s.nb()[1], 0)
        };
        StateViews { hidden: t(0), ffn_inp: t(1), normed: t(2), acc: t(3), shared: (self.set.len() > 4).then(|| t(4)) }
    }
}

pub struct Engine {
    pub config: ModelConfig,
    dir: ModelDir,
    runner: Runner,
    base: BaseWeights,
    /// Every layer's state between batches (KV caches) and the tokens it holds.
    memory: Memory,
    arena: Arena,
    state: State,
    sched: Scheduler,
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
    /// Whether misses load cold records (`EngineOptions::cold` on a streaming arena), and
    /// per slot whether it holds a cold record (then the graph reads it through the cold views).
    cold: bool,
    slot_cold: Vec<bool>,
    opts: EngineOptions,
    stats: EngineStats,
    /// Routing choices, recorded while `Some` (see `start_trace`).
    trace: Option<RouteTrace>,
    warm_stats: SchedStats,
    /// In the all-resident mode (`EngineOptions::fused`), what the one graph needs.
    fused: Option<Fused>,
    /// The parts of `ArenaSize::Memory`'s total, where one was given.
    budget: Option<budget::Budget>,
}

/// A routing trace must have the model's shape and choose only experts the directory has.
fn check_route_trace(t: &RouteTrace, cfg: &ModelConfig, layers: &[crate::model_dir::ExpertLayer]) -> Result<()> {
    let want = (cfg.n_layer as usize, cfg.n_expert as usize, cfg.n_expert_used as usize);
    let got = (t.n_layer, t.n_expert, t.n_expert_used);
    if want != got {
        return Err(Error::Usage(format!(
            "the routing trace has {} layers of {} experts, top-{}; the model {} layers of {} experts, top-{} (sage trace map changes the layer count)",
            got.0, got.1, got.2, want.0, want.1, want.2
        )));
    }
    for (il, l) in layers.iter().enumerate() {
        if let Some(e) = t.choices[il].iter().find(|&&e| l.record_index(e).is_none()) {
            return Err(Error::Usage(format!(
                "the routing trace chooses expert {e} in layer {il}, which this model directory does not have (a pool)"
            )));
        }
    }
    Ok(())
}

impl Engine {
    /// Open a model directory and load its base onto the device.
    pub fn load(dir: &Path, opts: EngineOptions) -> Result<Engine> {
        Engine::load_with_progress(dir, opts, &mut |_, _| {})
    }

    /// `load`, calling `progress(bytes done, bytes total)` as experts are loaded up front (the
    /// all-resident mode, see `EngineOptions::fused`).
    pub fn load_with_progress(dir: &Path, opts: EngineOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Engine> {
        match opts.arena {
            ArenaSize::Memory(total) => Engine::load_within(dir, opts, total, progress),
            _ => Engine::load_sized(dir, opts, progress),
        }
    }

    /// How a total of `total` bytes splits for the model in `dir` with `opts` (its context,
    /// batch, KV types, flash attention, threads): the budget `--memory` gives the engine, and
    /// `sage plan --ram` and `sage tune --ram` print. First the estimate from the shapes
    /// (`budget::estimate`); where that leaves room for one token's experts, a probe engine
    /// with that many slots is loaded, the compute buffer of the largest batch at the end of
    /// the context measured on its graphs (`gallocr` reserve and the CPU work buffer, not
    /// run), the probe dropped. `resident`: the process's memory before loading
    /// (`budget::process_bytes`; 0 counts `PROCESS_BYTES`).
    pub fn fit_memory(dir: &Path, opts: &EngineOptions, total: u64, resident: u64) -> Result<MemoryFit> {
        let md = ModelDir::open(dir)?;
        let cfg = &md.config;
        let mopts = memory_options(opts, opts.flash_attn != FlashAttn::Off);
        memory::check(cfg, &mopts).map_err(Error::Usage)?;
        let stride = arena::slot_stride(&md.manifest.layers);
        let k = cfg.n_expert_used as u64;
        let n_experts = md.manifest.layers.iter().map(|l| l.ids.len() as u64).sum();
        let estimated = budget::estimate_fit(cfg, opts, total, md.base_bytes(), stride, n_experts, resident);
        if !estimated.runs() {
            return Ok(estimated);
        }
        let estimate = estimated.budget;
        let probe_opts = EngineOptions { arena: ArenaSize::Experts(k as usize), fused: false, ..opts.clone() };
        let mut probe = Engine::load_sized(dir, probe_opts, &mut |_, _| {})?;
        let compute = probe.measure_compute()?;
        let n = opts.n_batch.min(opts.n_ctx).max(1) as u64;
        let (stride, tail) = (
            probe.arena.stride() as u64,
            probe.arena.size() as u64 - arena::arena_bytes(k, probe.arena.stride() as u64, 0),
        );
        let b = budget::Budget {
            base: probe.base.bytes() as u64,
            state: probe.memory.bytes() as u64,
            compute: (compute as u64).max(budget::experts_graph_bytes(cfg, n)).max(budget::output_graph_bytes(cfg, n)),
            activations: probe.state.buf.size() as u64,
            staging: budget::staging_bytes(cfg, stride, opts.read_ahead as u64),
            ..estimate
        };
        Ok(MemoryFit::new(b, stride, tail, n_experts, k, opts.n_ctx, true))
    }

    /// `load` within a total of `total` bytes (`ArenaSize::Memory`): the split `fit_memory`
    /// makes (too little is an error before anything large is allocated: the estimate refuses
    /// without loading, the probe holds only one token's slots), then the engine loaded with
    /// the arena what the measured parts leave. With every expert resident the one graph per
    /// batch is sized too, and where it would not fit, batches run layer by layer instead.
    fn load_within(dir: &Path, opts: EngineOptions, total: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<Engine> {
        let fit = Engine::fit_memory(dir, &opts, total, budget::resident_bytes())?;
        if !fit.runs() {
            return Err(fit.too_small());
        }
        let mut b = fit.budget;
        let mut e = Engine::load_sized(dir, EngineOptions { arena: ArenaSize::Bytes(b.arena()), ..opts }, progress)?;
        if e.fused.is_some() {
            let one_graph = e.measure_fused()? as u64;
            if one_graph > b.compute {
                let over = b.fixed() - b.compute + one_graph + e.arena.size() as u64;
                if over > total {
                    log::info!(
                        "--memory: one graph per batch would need {one_graph} bytes of compute buffer, {} more than the budget holds; evaluating layer by layer",
                        over - total
                    );
                    e.fused = None;
                } else {
                    b.compute = one_graph;
                }
            }
        }
        log::info!("--memory {total}: {b}; arena {} bytes ({} slots)", e.arena.size(), e.n_slots());
        e.budget = Some(b);
        Ok(e)
    }

    /// The largest compute buffer the graphs of a batch need at the end of the context: every
    /// layer's attention graph (graph A of the streaming path, where a long context weighs),
    /// sized on the backend, not run.
    fn measure_compute(&mut self) -> Result<usize> {
        let plan = self.memory.worst_batch();
        let tokens = vec![0u32; plan.n];
        self.runner.dry = Some((0, 0));
        for il in 0..self.config.n_layer {
            if let Err(e) = self.attention(il, &tokens, &plan) {
                self.runner.dry = None;
                return Err(e);
            }
        }
        Ok(self.runner.dry.take().map_or(0, |(b, w)| b + w))
    }

    /// The compute buffer of the one graph of the all-resident mode at the end of the context.
    fn measure_fused(&mut self) -> Result<usize> {
        let plan = self.memory.worst_batch();
        let tokens = vec![0u32; plan.n];
        self.runner.dry = Some((0, 0));
        let r = self.eval_fused(&tokens, &plan, true);
        let size = self.runner.dry.take().map_or(0, |(b, w)| b + w);
        r.map(|_| size)
    }

    /// The parts of the `--memory` total, where one was given.
    pub fn budget(&self) -> Option<&budget::Budget> {
        self.budget.as_ref()
    }

    fn load_sized(dir: &Path, opts: EngineOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Engine> {
        let md = ModelDir::open(dir)?;
        let cfg = md.config.clone();
        if opts.n_ctx == 0 || opts.n_batch == 0 {
            return Err(Error::Usage("context and batch sizes must be positive".into()));
        }
        let backend = match Backend::open(&opts.device, opts.threads) {
            Ok(b) => b,
            // A device this build or machine lacks (no CUDA toolkit, no Metal): say so, use the CPU.
            Err(e) if !opts.device.eq_ignore_ascii_case("cpu") => {
                log::warn!("{e}; running on the CPU instead");
                Backend::open("cpu", opts.threads).map_err(|e| Error::Usage(e.to_string()))?
            }
            Err(e) => return Err(Error::Usage(e.to_string())),
        };
        if !backend.is_cpu() && !backend.name().starts_with("Vulkan") {
            // Proven on Vulkan (tests/it/device.rs, on Mesa's lavapipe). CUDA, measured once on
            // an H100 before the device fixes (examples/device_check.rs): ran, the same at every
            // arena size, but its logits differed from llama.cpp's by up to 0.2; not proven
            // since.
            log::warn!(
                "{}: sage's GPU path on this backend is not yet proven against llama.cpp; prefer --device cpu or Vulkan",
                backend.name()
            );
        }

        if opts.cold != ColdUse::Off && !md.has_cold() {
            return Err(Error::BadModelDir {
                path: md.path.clone(),
                reason:
                    "--cold-quant: it has no cold copies of its experts (convert with sage-convert --cold-quant TYPE)"
                        .into(),
            });
        }
        // Arena geometry first: a too-small arena is an error before anything is loaded.
        let layers = &md.manifest.layers;
        let geometry = |layers: &[crate::model_dir::ExpertLayer]| {
            let stride = if backend.is_cpu() {
                arena::slot_stride(layers)
            } else {
                arena::device_slot_stride(layers, backend.alignment() as u64)
            };
            (stride, arena::tail_padding(&backend, layers))
        };
        let total_experts: usize = layers.iter().map(|l| l.ids.len()).sum();
        let slots_of = |stride: u64, tail: u64| match opts.arena {
            ArenaSize::All => total_experts,
            ArenaSize::Experts(n) => n.min(total_experts),
            ArenaSize::Bytes(b) | ArenaSize::Memory(b) => {
                (arena::slots_in(b, stride, tail) as usize).min(total_experts)
            }
        };
        let (mut stride, mut tail) = geometry(layers);
        let mut n_slots = slots_of(stride, tail);
        // Cold copies only matter where experts stream; their slots hold either record.
        let cold = opts.cold != ColdUse::Off && n_slots < total_experts;
        if cold {
            let both: Vec<_> = layers.iter().chain(&md.manifest.cold).cloned().collect();
            (stride, tail) = geometry(&both);
            n_slots = slots_of(stride, tail);
        }
        let k = cfg.n_expert_used as usize;
        if n_slots < k {
            return Err(Error::Usage(format!(
                "the arena holds {n_slots} experts of {stride} bytes, but each token uses {k}: give it at least {} bytes (--arena) or {k} experts (--arena-experts)",
                arena::arena_bytes(k as u64, stride, tail),
            )));
        }
        if let Some(t) = &opts.route_trace {
            check_route_trace(t, &cfg, layers)?;
        }
        if !opts.cache_bias.is_exact() && cfg.gating != crate::config::Gating::default() {
            return Err(Error::Usage(format!(
                "--cache-bias: {}'s router ({:?} scores{}) is not the softmax top-k cache-aware routing is defined over",
                cfg.arch().family(),
                cfg.gating.func,
                if cfg.gating.grouped() { ", grouped" } else { "" }
            )));
        }
        let policy =
            scheduler::policy(&opts.policy, n_slots, (cfg.n_layer * cfg.n_expert_used) as usize).ok_or_else(|| {
                Error::Usage(format!("unknown policy '{}'; sage has {}", opts.policy, scheduler::POLICIES.join(", ")))
            })?;
        log::info!("device {}; arena {n_slots} slots of {stride} bytes, {} eviction", backend.name(), opts.policy);

        // The layers' state is checked before anything is loaded: what no backend could cache
        // (heads that are not whole blocks of the type) is said as such, before asking the
        // backend whether it runs flash attention.
        memory::check(&cfg, &memory_options(&opts, opts.flash_attn != FlashAttn::Off)).map_err(Error::Usage)?;
        let flash_attn = resolve_flash_attn(&backend, &cfg, &opts)?;
        let base = BaseWeights::load(&md, &backend, &opts)?;
        if !opts.page_cache {
            // The base now lives in backend memory; its file's pages would be a second copy.
            let _ = rustix::fs::fadvise(&md.base_file, 0, None, rustix::fs::Advice::DontNeed);
        }

        // Every layer's state at --ctx (KV caches; a ring of the window for sliding layers).
        let memory = Memory::new(&backend, &cfg, memory_options(&opts, flash_attn), dir)?;

        // The arena: one buffer, fixed size, allocated once. Repacked (on the CPU) only when
        // every expert is loaded once, up front.
        let all_resident = n_slots == total_experts;
        // A grouped router over a pool chooses its groups on the CPU (`router::route_scores`):
        // such a model runs layer by layer.
        let grouped_pool = cfg.gating.grouped() && layers.iter().any(|l| l.is_pool(&cfg));
        let repack = if opts.repack { backend.repack_buffer_type() } else { None };
        // Cold copies: slots hold records of two layouts, written as they are (no repacking).
        let repack_arena = opts.arena_repack.unwrap_or(opts.fused && all_resident) && !cold;
        let layout = if repack_arena { repack } else { None };
        let arena = Arena::new(&backend, &md, n_slots, stride, tail, layout, &opts, cold)?;
        let state = State::new(&backend, &cfg, opts.n_batch, dir)?;

        // The I/O thread reads what misses load: cold records when cold copies are in use
        // (upgrades are read by the load that needs them).
        let shards = match (&md.cold_shards, cold) {
            (Some(c), true) => c.clone(),
            _ => md.shards.clone(),
        };
        let io = Prefetcher::new(shards, !opts.page_cache);
        let present = layers.iter().map(|l| (0..cfg.n_expert).map(|e| l.record_index(e).is_some()).collect()).collect();
        let runner = Runner::new(backend, dir, opts.threads);
        let mut engine = Engine {
            config: cfg,
            dir: md,
            runner,
            base,
            memory,
            arena,
            state,
            sched: Scheduler::new(n_slots, policy),
            io,
            gate: PrefetchGate::default(),
            predicted: None,
            staging: Record::default(),
            present,
            cold,
            slot_cold: vec![false; n_slots],
            stats: EngineStats::default(),
            trace: None,
            warm_stats: SchedStats::default(),
            fused: None,
            budget: None,
            opts,
        };
        if engine.opts.fused && all_resident && engine.opts.route_trace.is_none() && !grouped_pool {
            engine.load_all_experts(progress)?;
        }
        Ok(engine)
    }

    pub fn device_name(&self) -> String {
        self.runner.backend.name()
    }

    /// What the engine holds in backend memory, by part.
    pub fn memory(&self) -> MemoryUse {
        MemoryUse {
            base: self.base.bytes(),
            arena: self.arena.size(),
            kv: self.memory.bytes(),
            compute: self.runner.alloc.buffer_size() + self.state.buf.size(),
            compute_reserved: self.budget.map_or(0, |b| b.compute as usize),
            staging: self.staging.capacity() + self.io.held_bytes(),
            load_buffer: self.base.load_buffer,
        }
    }

    /// Bytes of the expert arena (fixed for the engine's life).
    pub fn arena_bytes(&self) -> usize {
        self.arena.size()
    }

    /// Whether every expert is resident and batches run as one graph (`EngineOptions::fused`).
    pub fn all_resident(&self) -> bool {
        self.fused.is_some()
    }

    pub fn n_slots(&self) -> usize {
        self.sched.n_slots()
    }

    pub fn slot_bytes(&self) -> usize {
        self.arena.stride()
    }

    /// Expert ids present in each layer (the pool in effect).
    pub fn pool(&self) -> Vec<Vec<u32>> {
        self.dir.manifest.layers.iter().map(|l| l.ids.clone()).collect()
    }

    /// The model directory's base.gguf (tokenizer metadata and the rest of its keys).
    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    pub fn stats(&self) -> EngineStats {
        let mut prefetch = self.io.stats.clone();
        prefetch.used += self.sched.reservations.used;
        prefetch.wasted += self.sched.reservations.unused;
        EngineStats { sched: self.sched.stats.clone(), prefetch, compute: self.runner.compute, ..self.stats.clone() }
    }

    /// How the expert records were read from the shards so far (O_DIRECT, positioned reads,
    /// pages dropped from the cache after them), all shards together.
    pub fn read_paths(&self) -> crate::io::ReadPaths {
        let cold = self.dir.cold_shards.iter().flat_map(|c| c.iter());
        self.dir.shards.iter().chain(cold).map(|f| f.read_paths()).fold(Default::default(), |a, b| a + b)
    }

    /// Tokens in the context (the KV cache).
    pub fn n_past(&self) -> usize {
        self.memory.tokens(0).len()
    }

    /// The tokens in the context, in order.
    pub fn context(&self) -> &[u32] {
        self.memory.tokens(0)
    }

    /// Every layer's state (its kinds, options and bytes).
    pub fn state(&self) -> &Memory {
        &self.memory
    }

    /// Whether attention runs as one `flash_attn_ext` (`EngineOptions::flash_attn` resolved).
    pub fn flash_attn(&self) -> bool {
        self.memory.options().flash_attn
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
        t.predicted_logits = router_logits.then(|| vec![Vec::new(); c.n_layer as usize]);
        self.trace = Some(t);
        Ok(())
    }

    /// Stop recording and return what was recorded.
    pub fn take_trace(&mut self) -> Option<RouteTrace> {
        self.trace.take()
    }

    /// Fill the arena with the experts `ranked` lists ((layer, expert), most wanted first,
    /// e.g. `Usage::ranked`) that are in the pool, until every slot is taken. Returns how
    /// many were loaded. The loads are not counted as hits or misses of the run that follows.
    pub fn warm(&mut self, ranked: &[(u32, u32)]) -> Result<usize> {
        let chosen: Vec<(u32, u32)> = ranked
            .iter()
            .copied()
            .filter(|&(il, e)| self.present.get(il as usize).is_some_and(|p| p.get(e as usize) == Some(&true)))
            .take(self.sched.n_slots())
            .collect();
        self.settle_slot_reads()?;
        // Least used first, so that the most used are the most recently used when evicting starts.
        for &(il, e) in chosen.iter().rev() {
            let (md, arena, staging, slot_cold) = (&self.dir, &self.arena, &mut self.staging, &mut self.slot_cold);
            let (drop_cache, cold) = (!self.opts.page_cache, self.cold);
            self.sched.ensure(il, &[e], |slot, e| {
                slot_cold[slot] = cold;
                arena.load_expert(md, staging, drop_cache, il, slot, e, None, cold).map(|r| r.0)
            })?;
        }
        self.warm_stats = std::mem::take(&mut self.sched.stats);
        Ok(chosen.len())
    }

    /// What warming the arena cost (loads and bytes).
    pub fn warm_stats(&self) -> &SchedStats {
        &self.warm_stats
    }

    /// Forget the context (the arena keeps its experts).
    pub fn reset(&mut self) {
        self.keep(0);
    }

    /// Keep the first `n` tokens of the context and forget the rest (their cache entries are
    /// written over by what is evaluated next); returns how many are kept: fewer (none) where
    /// a sliding-window layer has written over the window those `n` need
    /// (`memory::Memory::keep`).
    pub fn keep(&mut self, n: usize) -> usize {
        self.predicted = None;
        self.memory.keep(0, n)
    }

    /// Checkpoint the recurrent states at the context's current length (`memory::Memory::checkpoint`;
    /// nothing for a model without recurrent layers), so that a later prompt sharing this
    /// prefix continues from here.
    pub fn checkpoint(&mut self) {
        self.memory.checkpoint(0);
    }

    /// The context lengths the recurrent states are checkpointed at.
    pub fn checkpoints(&self) -> Vec<usize> {
        self.memory.checkpoints(0)
    }

    /// Whether the model has recurrent layers (whose state cannot be cut back to any prefix).
    pub fn is_recurrent(&self) -> bool {
        self.config.recurrent_layers.contains(&true)
    }

    /// Keep the longest prefix of the context that `prompt` starts with, leaving at least the
    /// prompt's last token to evaluate (its logits are the next token's); returns its length.
    pub fn keep_prefix_of(&mut self, prompt: &[u32]) -> usize {
        let common = self.context().iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let n = common.min(prompt.len().saturating_sub(1));
        self.keep(n)
    }

    /// For benchmarks only: sequence 0 holds `n` more positions (of token 0) without their
    /// evaluation, the cache keeping what its cells hold (zeros after loading), so that the
    /// next batches cost what they cost at that depth (`examples/bench_one.rs --depth`). Their
    /// output means nothing.
    #[doc(hidden)]
    pub fn assume_evaluated(&mut self, n: usize) -> Result<()> {
        if self.n_past() + n > self.opts.n_ctx {
            return Err(Error::Usage(format!("a depth of {n} does not fit the context of {}", self.opts.n_ctx)));
        }
        self.memory.commit(0, &vec![0; n]);
        Ok(())
    }

    /// Evaluate `tokens` after the current context. Returns logits for every token when
    /// `all_logits`, else for the last one only (row-major [n][n_vocab]).
    pub fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        if self.n_past() + tokens.len() > self.opts.n_ctx {
            return Err(Error::Usage(format!(
                "{} tokens after {} do not fit the context of {} (--ctx)",
                tokens.len(),
                self.n_past(),
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
            // A batch before the last needs no logits (its last row is computed and dropped).
            let logits = self.eval_batch(chunk, all_logits)?;
            if all_logits || last {
                out.extend(logits);
            }
        }
        // A broken kernel or weights show as NaN here; sampling would quietly pick token 0.
        let bad = out.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            let device = self.device_name();
            return Err(Error::NotFinite { path: self.dir.path.clone(), device, bad, of: out.len() });
        }
        Ok(out)
    }

    fn eval_batch(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let n = tokens.len();
        // Where the batch's K and V go and what each query sees, per kind of layer state: the
        // same for every layer of that kind.
        let plan = self.memory.batch(0, n)?;
        let out = if self.fused.is_some() {
            self.eval_fused(tokens, &plan, all_logits)?
        } else {
            for il in 0..self.config.n_layer {
                let routed = self.attention(il, tokens, &plan)?;
                self.experts(il, n, &routed)?;
            }
            self.output_logits(n, all_logits)?
        };
        self.memory.commit(0, tokens);
        self.stats.tokens_evaluated += n as u64;
        Ok(out)
    }
}

/// The memory layout the options ask for, attention resolved (`resolve_flash_attn`).
pub fn memory_options(opts: &EngineOptions, flash_attn: bool) -> MemoryOptions {
    MemoryOptions {
        n_ctx: opts.n_ctx,
        n_seq: 1,
        n_batch: opts.n_batch,
        k_type: opts.k_type,
        v_type: opts.v_type,
        flash_attn,
        swa_full: opts.swa_full,
        checkpoints: memory::CHECKPOINTS,
    }
}

/// Whether attention runs as flash attention: `On` and `Off` as asked (`On` refused where the
/// backend cannot run it for this model's heads and cache types); `Auto` on where it can, as
/// llama.cpp's `-fa auto` decides. A quantized V cache needs it.
pub fn resolve_flash_attn(backend: &Backend, cfg: &ModelConfig, opts: &EngineOptions) -> Result<bool> {
    let supported = || flash_attn_supported(backend, cfg, opts.k_type, opts.v_type);
    match opts.flash_attn {
        FlashAttn::Off => Ok(false),
        FlashAttn::On if supported() => Ok(true),
        FlashAttn::On => Err(Error::Usage(format!(
            "{} cannot run flash attention over heads of {} with a {} K and a {} V cache (--flash-attn off or auto)",
            backend.name(),
            cfg.head_dim,
            opts.k_type,
            opts.v_type
        ))),
        FlashAttn::Auto => {
            let on = supported();
            if !on {
                log::info!("flash attention: {} cannot run it for this model; off", backend.name());
            }
            Ok(on)
        }
    }
}

/// Whether `backend` runs `flash_attn_ext` over this model's heads from caches of these types
/// (a node built with the shapes of a decode step, asked of the backend, not computed).
fn flash_attn_supported(backend: &Backend, cfg: &ModelConfig, k: KvType, v: KvType) -> bool {
    let f16 = |t: KvType| if t == KvType::F32 { GgmlType::F16 } else { t.ggml() };
    let (kt, vt) = (f16(k), f16(v));
    if [kt, vt].iter().any(|t| !cfg.head_dim.is_multiple_of(t.block_size())) {
        return false;
    }
    let ctx = Context::new(8, 8);
    let (hd, nh, nkv, n_kv) = (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64, KV_PAD as i64);
    let q = ctx.new_tensor(GgmlType::F32, &[hd, 1, nh]);
    let kc = ctx.new_tensor(kt, &[hd, n_kv, nkv]);
    // Latent attention's values are the cached rows' latent part.
    let vd = cfg.mla.map_or(hd, |m| m.kv_lora_rank as i64);
    let vc = ctx.new_tensor(vt, &[vd, n_kv, nkv]);
    let mask = ctx.new_tensor(GgmlType::F16, &[n_kv, 1]);
    let fa = ctx.flash_attn_ext(q, kc, vc, mask, 1.0, None);
    backend.supports_op(fa)
}
