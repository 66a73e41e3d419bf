//! `sage plan`: will a model run in this much memory, and how fast, before anything is
//! downloaded. From a config.json (at a quant type) or a model directory:
//!
//! - what fits: the arena gets what `--memory` would give it: RAM − (base + every layer's
//!   state at `--ctx` + compute buffer + activations + staging + process), split into slots
//!   (`Engine::fit_memory` on a model directory: the same function, so `sage plan --ram X`
//!   and `sage run --memory X` agree to the byte; `budget::estimate` for a config.json);
//!   optionally the longest context that total holds;
//! - the expected hit rate of that arena: replays in a usage.json (`sage profile`),
//!   interpolated, or a trace drawn from the generator fitted to published Qwen3-30B-A3B
//!   routing statistics (`trace_gen`), replayed through the real LRU scheduler at exactly
//!   that many slots;
//! - the disk's bandwidth: read with O_DIRECT in record-sized reads (a model directory's
//!   shards, or a scratch file beside the config), or as given;
//! - decode speed: reading the misses takes bytes per token / disk bandwidth (the I/O bound
//!   alone); computing a token with every expert it uses resident is the compute bound alone,
//!   measured on a model directory (`compute_tok_s`), or for a config estimated as the base
//!   and the token's experts read once at the memory's bandwidth (an upper bound). A decode step does both, mostly one after the other (prefetch overlaps
//!   some), so the prediction is 1 / (I/O time + compute time); the slower of the two bounds
//!   is the most it could reach with perfect overlap.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::config::ModelConfig;
use crate::engine::budget::{self, Budget, MemoryFit};
use crate::engine::EngineOptions;
use crate::error::{Error, IoContext, Result};
use crate::footprint::{self, FootprintOptions};
use crate::ggml::GgmlType;
use crate::trace_gen::{Generator, TraceShape};
use crate::usage::Usage;

/// How the disk's speed is known.
#[derive(Clone, Debug, PartialEq)]
pub enum Disk {
    /// Measure it (O_DIRECT reads).
    Auto,
    /// Bytes per second, as given.
    Given(f64),
}

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub ram: u64,
    pub disk: Disk,
    pub usage: Option<PathBuf>,
    /// Expected hit rate from replaying this routing trace (`sage trace`) through LRU at the
    /// arena's slots (it must have the model's layers and experts).
    pub trace: Option<PathBuf>,
    /// For a config.json: the quant type of the converted model (default q4_k).
    pub quant: Option<GgmlType>,
    /// How the model will run: context length, batch, KV types, flash attention, window
    /// caches, read-ahead (what the budget counts), threads (the memory bandwidth and compute
    /// measurements). Its arena is ignored: the plan sizes it.
    pub engine: EngineOptions,
    /// Also find the longest context `ram` holds with these options.
    pub longest_ctx: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub model: String,
    pub quant: String,
    pub ram_bytes: u64,
    pub n_ctx: u64,
    pub base_bytes: u64,
    /// Every layer's state at `n_ctx` (the budget's `state`).
    pub kv_bytes: u64,
    /// Everything else the budget takes before the arena: compute, activations, staging,
    /// process.
    pub overhead_bytes: u64,
    /// The split of `ram_bytes`, as `--memory` makes it.
    pub budget: Budget,
    /// "measured" (a model directory: its graphs sized on the backend, as `sage run --memory`)
    /// or "estimated" (a config.json: the compute buffer's bounds).
    pub budget_source: String,
    /// The longest context (a multiple of 256 tokens, at most the model's trained length) that
    /// `ram_bytes` holds with these options, when asked for.
    pub longest_ctx: Option<u64>,
    /// The context the model was trained for (`max_position_embeddings`): where the search for
    /// the longest stops.
    pub n_ctx_train: u64,
    /// The smallest RAM that runs at `n_ctx`: every part but the arena, and one token's
    /// experts (what `--memory`'s error asks for).
    pub min_ram_bytes: u64,
    pub slot_bytes: u64,
    pub n_experts: u64,
    pub n_experts_active: u64,
    pub n_expert_used: u64,
    /// Arena slots that fit (all experts at most).
    pub slots: u64,
    /// Slots over all experts.
    pub share: f64,
    /// The arena holds at least one token's experts: sage runs.
    pub runs: bool,
    pub hit_rate: f64,
    pub hit_rate_source: String,
    pub disk_bytes_per_s: f64,
    pub disk_source: String,
    pub memory_bytes_per_s: f64,
    /// Expert bytes read per decoded token: misses × slot bytes.
    pub bytes_per_token: f64,
    /// Decode tok/s if reading the misses were all it did.
    pub io_bound_tok_s: f64,
    /// Decode tok/s if every expert a token uses were resident: measured on a model directory
    /// (decode steps of the streaming path whose experts all hit), else the base and one
    /// token's experts read once at memory bandwidth (an upper bound).
    pub compute_bound_tok_s: f64,
    pub compute_source: String,
    /// 1 / (I/O time + compute time).
    pub predicted_tok_s: f64,
}

/// Hit rate of an LRU arena of `share` of the experts, interpolated linearly between the
/// points (share, hit rate) given, (0, 0) and (1, 1).
pub fn interpolate(points: &[(f64, f64)], share: f64) -> f64 {
    let mut pts = vec![(0.0, 0.0)];
    pts.extend_from_slice(points);
    pts.push((1.0, 1.0));
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let s = share.clamp(0.0, 1.0);
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if s <= x1 {
            return if x1 > x0 { y0 + (y1 - y0) * (s - x0) / (x1 - x0) } else { y1 };
        }
    }
    1.0
}

/// The arithmetic of a plan from its measured inputs (separate from the measuring, so tests
/// can check it).
pub fn predict(
    cfg: &ModelConfig,
    fit: &MemoryFit,
    hit_rate: impl FnOnce(u64, f64) -> (f64, String),
    disk: (f64, String),
    memory_bytes_per_s: f64,
    measured_compute_tok_s: Option<f64>,
) -> Plan {
    let b = &fit.budget;
    let (base_bytes, slot_bytes, n_experts, slots) = (b.base, fit.stride, fit.n_experts, fit.slots);
    let active = cfg.n_moe_layers() as u64 * cfg.n_expert_used as u64;
    let share = slots as f64 / n_experts.max(1) as f64;
    let runs = fit.runs();
    let (hit, source) = if runs { hit_rate(slots, share) } else { (0.0, "the arena is too small to run".into()) };
    let bytes_per_token = active as f64 * (1.0 - hit) * slot_bytes as f64;
    let io = if bytes_per_token > 0.0 { disk.0 / bytes_per_token } else { f64::INFINITY };
    let weights = base_bytes as f64 + active as f64 * slot_bytes as f64;
    let (compute, compute_source) = match measured_compute_tok_s {
        Some(c) => (c, "measured: decode steps of this model with every expert it uses resident".to_string()),
        None => (
            memory_bytes_per_s / weights,
            "estimated: base + one token's experts read once at memory bandwidth (an upper bound; a model directory is measured)".to_string(),
        ),
    };
    let predicted = if runs { 1.0 / (1.0 / io + 1.0 / compute) } else { 0.0 };
    Plan {
        model: String::new(),
        quant: String::new(),
        ram_bytes: b.total,
        n_ctx: fit.n_ctx as u64,
        base_bytes,
        kv_bytes: b.state,
        overhead_bytes: b.fixed() - b.base - b.state,
        budget: *b,
        budget_source: if fit.measured { "measured".into() } else { "estimated".into() },
        longest_ctx: None,
        n_ctx_train: cfg.n_ctx_train,
        min_ram_bytes: fit.need(),
        slot_bytes,
        n_experts,
        n_experts_active: active,
        n_expert_used: cfg.n_expert_used as u64,
        slots,
        share,
        runs,
        hit_rate: hit,
        hit_rate_source: source,
        disk_bytes_per_s: disk.0,
        disk_source: disk.1,
        memory_bytes_per_s,
        bytes_per_token,
        io_bound_tok_s: io,
        compute_bound_tok_s: compute,
        compute_source,
        predicted_tok_s: predicted,
    }
}

/// The longest context (a multiple of `STEP`, at most `max`) for which `fits` says the model
/// runs, by bisection (`fits` is monotone: a longer context never needs less); 0 if not even
/// `STEP` does.
pub fn longest_ctx(max: u64, mut fits: impl FnMut(u64) -> Result<bool>) -> Result<u64> {
    const STEP: u64 = 256;
    let (mut lo, mut hi) = (0u64, max / STEP);
    if hi > 0 && fits(hi * STEP)? {
        return Ok(hi * STEP);
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * STEP)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo * STEP)
}

/// Plan `path` (a config.json or a model directory).
pub fn plan(path: &Path, opts: &PlanOptions) -> Result<Plan> {
    // A model directory: the bytes it holds (the footprint's measured figures); a config: the
    // computed ones at the quant asked for.
    let quant = opts.quant.unwrap_or(GgmlType::Q4_K);
    let fo = FootprintOptions { quants: vec![quant], arenas: Vec::new(), cold: None };
    let fp = footprint::footprint(path, &fo)?;
    let is_dir = fp.kind == "model directory";
    let q = &fp.quants[0];
    let (base_bytes, slot_bytes, quant) = match &fp.measured {
        Some(m) => (
            m.base_bytes,
            m.expert_bytes.next_multiple_of(fp.record_align),
            m.expert_quant.clone().unwrap_or_else(|| "as converted".into()),
        ),
        None => (q.base_bytes, q.expert_slot_bytes, q.quant.clone()),
    };
    let cfg = &fp.config;
    if opts.engine.n_ctx == 0 {
        return Err(Error::Usage("--ctx 0: a context holds at least one token".into()));
    }
    // What `--memory ram` gives the arena: the engine's own split for a model directory, the
    // estimate for a config.
    let with_ctx = |n_ctx: u64| EngineOptions {
        n_ctx: n_ctx as usize,
        n_batch: opts.engine.n_batch.min(n_ctx as usize).max(1),
        ..opts.engine.clone()
    };
    let fit_at = |n_ctx: u64| -> Result<MemoryFit> {
        if is_dir {
            crate::engine::Engine::fit_memory(path, &with_ctx(n_ctx), opts.ram, 0)
        } else {
            // Not converted yet: the estimate from the shapes, the process at its floor.
            Ok(budget::estimate_fit(cfg, &with_ctx(n_ctx), opts.ram, base_bytes, slot_bytes, fp.n_experts, 0))
        }
    };
    let fit = fit_at(opts.engine.n_ctx as u64)?;
    let longest =
        if opts.longest_ctx { Some(longest_ctx(cfg.n_ctx_train.max(256), |n| Ok(fit_at(n)?.runs()))?) } else { None };
    let usage = opts.usage.as_deref().map(Usage::load).transpose()?;
    if let Some(u) = &usage {
        u.check_model(opts.usage.as_deref().expect("loaded"), cfg.n_layer, cfg.n_expert)?;
    }
    let disk = match opts.disk {
        Disk::Given(b) => (b, "as given (--disk)".to_string()),
        Disk::Auto => {
            let (b, what) =
                if is_dir { disk_speed_dir(path, slot_bytes)? } else { disk_speed_scratch(path, slot_bytes)? };
            (b, format!("measured: O_DIRECT reads of {slot_bytes} bytes, {what}"))
        }
    };
    let mem = memory_bandwidth(opts.engine.threads);
    let trace = opts.trace.as_deref().map(crate::engine::trace::RouteTrace::open).transpose()?;
    if let Some(t) = &trace {
        let want = (cfg.n_layer as usize, cfg.n_expert as usize, cfg.n_expert_used as usize);
        if (t.n_layer, t.n_expert, t.n_expert_used) != want {
            return Err(Error::BadTrace {
                path: opts.trace.clone().expect("opened"),
                reason: format!(
                    "it has {} layers of {} experts, top-{}; the model {} of {}, top-{}",
                    t.n_layer, t.n_expert, t.n_expert_used, want.0, want.1, want.2
                ),
            });
        }
    }
    let hit = |slots: u64, share: f64| match (&trace, &usage) {
        (Some(t), _) => (
            t.hit_rate("lru", slots as usize),
            format!("{}: replayed through LRU at this arena", opts.trace.as_ref().expect("opened").display()),
        ),
        (None, Some(u)) => {
            let st = u.stats.as_ref();
            let pts: Vec<(f64, f64)> = st
                .map(|s| {
                    s.simulated_arena.iter().map(|a| (a.percent_of_experts as f64 / 100.0, a.lru_hit_rate)).collect()
                })
                .unwrap_or_default();
            (
                interpolate(&pts, share),
                format!("{}: its LRU replays, interpolated", opts.usage.as_ref().unwrap().display()),
            )
        }
        (None, None) => {
            let shape = TraceShape {
                n_layer: cfg.n_layer as usize,
                n_expert: cfg.n_expert as usize,
                n_expert_used: cfg.n_expert_used as usize,
            };
            let t = Generator::fit(shape).trace(256, 1);
            (
                t.hit_rate("lru", slots as usize),
                "published Qwen3-30B-A3B routing statistics (a trace from sage's fitted generator, replayed through LRU at this arena)".into(),
            )
        }
    };
    let measured = if is_dir { Some(compute_tok_s(path, opts.engine.threads)?) } else { None };
    let mut p = predict(cfg, &fit, hit, disk, mem, measured);
    p.model = path.display().to_string();
    p.quant = quant;
    p.longest_ctx = longest;
    Ok(p)
}

/// Decode speed of a model directory when every expert a token uses is resident: the engine
/// with an arena of one token's experts and a routing trace that always picks the same ones
/// (all hits after the first token), the streaming path a limited arena takes; the median of
/// 5 steps.
fn compute_tok_s(dir: &Path, threads: usize) -> Result<f64> {
    use crate::engine::{trace::RouteTrace, ArenaSize, Engine, EngineOptions};
    let md = crate::model_dir::ModelDir::open(dir)?;
    let c = &md.config;
    let (l, k) = (c.n_layer as usize, c.n_expert_used as usize);
    let mut t = RouteTrace::new(l, c.n_expert as usize, k);
    for (il, layer) in md.manifest.layers.iter().enumerate() {
        if layer.ids.len() < k {
            return Err(Error::Usage(format!("{}: layer {il} has fewer than {k} experts", dir.display())));
        }
        t.choices[il] = layer.ids[..k].to_vec();
    }
    let opts = EngineOptions {
        threads,
        n_ctx: 16,
        arena: ArenaSize::Experts(l * k),
        prefetch: false,
        route_trace: Some(std::sync::Arc::new(t)),
        ..Default::default()
    };
    let mut e = Engine::load(dir, opts)?;
    e.eval(&[0], false)?;
    let mut steps: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            e.eval(&[0], false).map(|_| t0.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    steps.sort_by(f64::total_cmp);
    Ok(1.0 / steps[2])
}

/// Read 256 MiB of a model directory's expert records with O_DIRECT, `record` bytes at a time,
/// spread evenly over all its shards (as misses land), page cache dropped for them first.
fn disk_speed_dir(dir: &Path, record: u64) -> Result<(f64, String)> {
    let md = crate::model_dir::ModelDir::open(dir)?;
    let mut all: Vec<(usize, u64)> = Vec::new();
    for (i, shard) in md.shards.iter().enumerate() {
        let mut at = 4096u64;
        while at + record <= shard.size() {
            all.push((i, at));
            at += record;
        }
    }
    let n = (((256u64 << 20) / record.max(1)) as usize).clamp(1, all.len().max(1));
    if all.is_empty() {
        return Err(Error::Usage(format!("{}: no expert records to time the disk with", dir.display())));
    }
    let picks: Vec<(usize, u64)> = (0..n).map(|j| all[j * all.len() / n]).collect();
    for &(i, at) in &picks {
        md.shards[i].drop_cached(at, record as usize);
    }
    let mut rec = crate::io::Record::default();
    let t0 = Instant::now();
    for &(i, at) in &picks {
        md.shards[i].read_record(at, record as usize, "a disk speed read", true, &mut rec)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = n as u64 * record;
    let direct = md.shards.iter().map(|s| s.read_paths().direct).sum::<u64>();
    let how = if direct > 0 {
        "of its shards"
    } else {
        "of its shards (this file system refused O_DIRECT: through the page cache)"
    };
    Ok((bytes as f64 / secs, format!("{} MiB {how}", bytes >> 20)))
}

/// Write a 256 MiB scratch file beside `config` (removed after), then read it as
/// `disk_speed_dir` reads shards.
fn disk_speed_scratch(config: &Path, record: u64) -> Result<(f64, String)> {
    let dir = if config.is_dir() {
        config
    } else {
        config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    };
    let path = dir.join(".sage-plan-disk-test");
    let record = record.next_multiple_of(4096).max(4096);
    let n = (256u64 << 20) / record;
    {
        let mut f = crate::io::AtomicFile::create(&path)?;
        let block = vec![0x5Au8; record as usize];
        for _ in 0..n + 1 {
            f.write(&block)?;
        }
        f.finish()?;
    }
    let result = (|| {
        let wf = crate::io::WatchedFile::open(&path)?;
        let mut rec = crate::io::Record::default();
        wf.drop_cached(0, ((n + 1) * record) as usize);
        let t0 = Instant::now();
        for i in 0..n {
            wf.read_record(i * record, record as usize, "a disk speed read", true, &mut rec)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let how = if wf.read_paths().direct > 0 { "" } else { " (O_DIRECT refused: through the page cache)" };
        Ok((
            (n * record) as f64 / secs,
            format!("{} MiB of a scratch file in {}{how}", (n * record) >> 20, dir.display()),
        ))
    })();
    std::fs::remove_file(&path).at(&path)?;
    result
}

/// Bytes per second `threads` threads read from memory (sums over a 512 MiB buffer each
/// reads a part of; best of 3).
pub fn memory_bandwidth(threads: usize) -> f64 {
    let words = (512usize << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(words.div_ceil(threads))
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter().map(|h| h.join().expect("a summing thread")).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::inspect::short_bytes as b;
        writeln!(f, "{} at {}, {} of RAM, --ctx {}", self.model, self.quant, b(self.ram_bytes), self.n_ctx)?;
        writeln!(
            f,
            "  {} ({}) leave {} experts' slots of {} ({:.1}% of {} experts): what --memory {} gives the arena",
            self.budget,
            self.budget_source,
            self.slots,
            b(self.slot_bytes),
            100.0 * self.share,
            self.n_experts,
            self.ram_bytes
        )?;
        if let Some(n) = self.longest_ctx {
            let edge = if n >= self.n_ctx_train { ": the model's trained length, searched no further" } else { "" };
            writeln!(f, "  longest context in {}: {n} tokens ({}{edge})", b(self.ram_bytes), self.budget_source)?;
        }
        if !self.runs {
            return writeln!(
                f,
                "  does not run: the arena must hold one token's {} experts, {} in all; it needs --ram {} ({}) or more at --ctx {}",
                self.n_expert_used,
                b(self.slot_bytes.saturating_mul(self.n_expert_used)),
                self.min_ram_bytes,
                b(self.min_ram_bytes),
                self.n_ctx
            );
        }
        writeln!(f, "  expected hit rate {:.1}% ({})", 100.0 * self.hit_rate, self.hit_rate_source)?;
        writeln!(f, "  disk {:.2} GB/s ({})", self.disk_bytes_per_s / 1e9, self.disk_source)?;
        writeln!(
            f,
            "  reads {} per decoded token: I/O bound {:.2} tok/s; compute bound {:.2} tok/s ({})",
            b(self.bytes_per_token as u64),
            self.io_bound_tok_s,
            self.compute_bound_tok_s,
            self.compute_source
        )?;
        writeln!(
            f,
            "  predicted decode {:.2} tok/s (range {:.2} to {:.2})",
            self.predicted_tok_s,
            self.predicted_tok_s,
            self.io_bound_tok_s.min(self.compute_bound_tok_s)
        )
    }
}
