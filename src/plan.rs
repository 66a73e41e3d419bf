//! `sage plan`: will a model run in this much memory, and how fast, before anything is
//! downloaded. From a config.json (at a quant type) or a model directory:
//!
//! - what fits: arena slots = (RAM − base − KV cache − overhead) / slot bytes;
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
use crate::error::{Error, IoContext, Result};
use crate::footprint::{self, FootprintOptions};
use crate::ggml::GgmlType;
use crate::trace_gen::{Generator, TraceShape};
use crate::usage::Usage;

/// Bytes a running engine holds beyond base, arena and KV cache: ggml's compute buffer, the
/// activations between graphs, one staging record, the program itself. Measured at the
/// Qwen3-30B-A3B shape: 88 MB compute + 3 MB staging + about 60 MB of process (docs/bench.md);
/// rounded up.
pub const OVERHEAD_BYTES: u64 = 256 << 20;

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
    /// KV cache length the model will run with (f16 KV).
    pub n_ctx: u64,
    /// Threads for the memory bandwidth measurement.
    pub threads: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub model: String,
    pub quant: String,
    pub ram_bytes: u64,
    pub base_bytes: u64,
    pub kv_bytes: u64,
    pub overhead_bytes: u64,
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
#[allow(clippy::too_many_arguments)]
pub fn predict(
    cfg: &ModelConfig,
    base_bytes: u64,
    slot_bytes: u64,
    n_experts: u64,
    opts: &PlanOptions,
    hit_rate: impl FnOnce(u64, f64) -> (f64, String),
    disk: (f64, String),
    memory_bytes_per_s: f64,
    measured_compute_tok_s: Option<f64>,
) -> Plan {
    let kv_bytes = kv_bytes(cfg, opts.n_ctx);
    let free = opts.ram.saturating_sub(base_bytes + kv_bytes + OVERHEAD_BYTES);
    let slots = (free / slot_bytes.max(1)).min(n_experts);
    let active = cfg.n_layer as u64 * cfg.n_expert_used as u64;
    let share = slots as f64 / n_experts.max(1) as f64;
    let runs = slots >= cfg.n_expert_used as u64;
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
        ram_bytes: opts.ram,
        base_bytes,
        kv_bytes,
        overhead_bytes: OVERHEAD_BYTES,
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

/// Every layer's state at `n_ctx` as the engine lays it out by default (`engine::memory::plan`):
/// f16 K and V for every position, sliding-window layers a ring of their window plus a batch
/// of 512.
pub fn kv_bytes(cfg: &ModelConfig, n_ctx: u64) -> u64 {
    use crate::engine::memory::{plan, KvType, MemoryOptions};
    if n_ctx == 0 {
        return 0;
    }
    let o = MemoryOptions {
        n_ctx: n_ctx as usize,
        n_seq: 1,
        n_batch: 512,
        k_type: KvType::F16,
        v_type: KvType::F16,
        flash_attn: false,
        swa_full: false,
    };
    plan(cfg, &o).layers.iter().map(|l| l.k_bytes + l.v_bytes).sum()
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
    let mem = memory_bandwidth(opts.threads);
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
    let measured = if is_dir { Some(compute_tok_s(path, opts.threads)?) } else { None };
    let mut p = predict(cfg, base_bytes, slot_bytes, fp.n_experts, opts, hit, disk, mem, measured);
    p.model = path.display().to_string();
    p.quant = quant;
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
        writeln!(f, "{} at {}, {} of RAM", self.model, self.quant, b(self.ram_bytes))?;
        writeln!(
            f,
            "  base {} + KV cache {} + overhead {} leave {} experts' slots of {} ({:.1}% of {} experts)",
            b(self.base_bytes),
            b(self.kv_bytes),
            b(self.overhead_bytes),
            self.slots,
            b(self.slot_bytes),
            100.0 * self.share,
            self.n_experts
        )?;
        if !self.runs {
            return writeln!(
                f,
                "  does not run: the arena must hold one token's {} experts, {} in all",
                self.n_expert_used,
                b(self.slot_bytes.saturating_mul(self.n_expert_used))
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
