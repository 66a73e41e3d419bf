//! The command-line programs' work beyond parsing arguments (which stays in the binaries:
//! `src/main.rs`, `convert/main.rs`): the `sage` commands' bodies (`serve` and `chat` in their
//! own files), sizes as users write them,
//! progress bars over the library's progress callbacks, and the figures `sage run` prints. The
//! rest of the library draws and prints nothing.

mod chat;
mod serve;
pub mod trace;

pub use chat::{chat, ChatJob};
pub use serve::{serve, ServeJob};

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::chat::{ChatTemplate, Message};
use crate::engine::generate::{GenOptions, Generation};
use crate::engine::sampler::{Sampler, SamplerParams};
use crate::engine::{ArenaSize, ColdUse, Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::inspect::short_bytes;
use crate::tokenizer::Tokenizer;
use crate::usage::Usage;

/// `2GiB`, `512MiB`, `1.5GB`, `4096`: a size in bytes. Refuses what is not a size, an unknown
/// unit, and a size past 2^64 bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |why: &str| Error::Usage(format!("'{s}' {why}"));
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| bad("is not a size like 2GiB or 512MiB"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(Error::Usage(format!("unknown size unit '{u}' in '{s}' (use B, KiB, MiB, GiB, KB, MB, GB)"))),
    };
    let bytes = n * mul;
    if !(bytes.is_finite() && bytes >= 0.0) {
        return Err(bad("is not a size"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(bad("is larger than any memory (2^64 bytes)"));
    }
    Ok(bytes as u64)
}

/// The process's peak resident memory (VmHWM), where /proc tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A progress bar of `len` steps drawn with `template` on stderr, hidden when stderr is not
/// a terminal.
pub fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    pb
}

/// A bar over bytes, for the library's `Progress` callbacks: `(done, total, what)`.
pub fn bytes_bar() -> (indicatif::ProgressBar, impl FnMut(u64, u64, &str)) {
    let pb = bar(0, "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}");
    let p = pb.clone();
    let update = move |done: u64, total: u64, what: &str| {
        p.set_length(total);
        p.set_position(done);
        p.set_message(what.to_string());
    };
    (pb, update)
}

/// A bar over windows of a text (`sage eval`, `sage profile`), named `what`.
pub fn windows_bar(n: usize, what: &str) -> indicatif::ProgressBar {
    let pb = bar(n as u64, "{prefix} [{bar:30}] {pos}/{len} windows {msg} ({eta})");
    pb.set_prefix(what.to_string());
    pb
}

/// Everything `sage run` reports about a generation, as JSON (`--json`'s last line, and what
/// `--stats` prints).
pub fn run_stats(g: &Generation, engine: &Engine) -> serde_json::Value {
    let st = &g.stats.sched;
    let n_tok = g.stats.tokens_evaluated.max(1);
    let mem = engine.memory();
    let peak = peak_rss_bytes();
    // Everything else the process holds: code, the tokenizer, allocator slack.
    let overhead = peak.map(|p| p.saturating_sub(mem.total() as u64));
    serde_json::json!({
        "device": engine.device_name(),
        "prompt_tokens": g.prompt_tokens,
        "generated_tokens": g.tokens.len(),
        "stop": g.stop.as_str(),
        "cached_prompt_tokens": g.cached_tokens,
        "prompt_tok_per_s": g.prompt_tok_per_s(),
        "gen_tok_per_s": g.gen_tok_per_s(),
        "expert_hits": st.hits,
        "expert_misses": st.misses,
        "expert_hit_rate": st.hit_rate(),
        "bytes_read": st.bytes_read,
        "bytes_read_per_token": st.bytes_read / n_tok,
        "load_stall_s": st.stall.as_secs_f64(),
        "cold_loads": st.cold_loads,
        "upgrades": st.upgrades,
        "prefetch": g.stats.prefetch,
        "expert_reads": engine.read_paths(),
        "arena_bytes": engine.arena_bytes(),
        "arena_slots": engine.n_slots(),
        "all_resident": engine.all_resident(),
        "memory": mem,
        "state": state_json(engine),
        "budget": engine.budget(),
        "peak_rss_bytes": peak,
        "overhead_bytes": overhead,
    })
}

/// Every layer's state by kind: (label, layers, cells per sequence, bytes).
fn state_kinds(engine: &Engine) -> Vec<(&'static str, usize, usize, u64)> {
    let plan = engine.state().plan();
    plan.by_kind()
        .into_iter()
        .map(|(k, layers, bytes)| {
            let cells = plan.layers.iter().find(|l| l.kind == k).map_or(0, |l| l.cells);
            (k.label(), layers, cells, bytes)
        })
        .collect()
}

/// `state_kinds` with the cache types and attention, as JSON.
fn state_json(engine: &Engine) -> serde_json::Value {
    let kinds: Vec<_> = state_kinds(engine)
        .into_iter()
        .map(|(kind, layers, cells, bytes)| serde_json::json!({ "kind": kind, "layers": layers, "cells": cells, "bytes": bytes }))
        .collect();
    let o = engine.state().options();
    serde_json::json!({ "kinds": kinds, "k_type": o.k_type, "v_type": o.v_type, "flash_attn": o.flash_attn, "n_ctx": o.n_ctx })
}

/// "KV 12 layers × 4096 cells 96.0 MiB + window KV 12 layers × 256 cells 6.0 MiB (f16 K, f16 V,
/// flash attention)".
fn state_line(engine: &Engine) -> String {
    let parts: Vec<String> = state_kinds(engine)
        .into_iter()
        .map(|(kind, layers, cells, bytes)| {
            if kind == "recurrent" {
                format!("{kind} {layers} layers {} (any context)", short_bytes(bytes))
            } else {
                format!("{kind} {layers} layers × {cells} cells {}", short_bytes(bytes))
            }
        })
        .collect();
    let ckpt = engine.state().plan().checkpoint_bytes;
    let parts = if ckpt > 0 { [parts, vec![format!("checkpoints {}", short_bytes(ckpt))]].concat() } else { parts };
    let o = engine.state().options();
    // A latent cache has no V of its own: the values are a view of its rows.
    let types = if engine.config.mla.is_some() {
        format!("{} latent rows", o.k_type)
    } else {
        format!("{} K, {} V", o.k_type, o.v_type)
    };
    format!("{} ({types}, {})", parts.join(" + "), if o.flash_attn { "flash attention" } else { "no flash attention" })
}

/// `sage run --stats`: speed, expert traffic, prefetch and memory, a line each.
pub fn print_run_stats(g: &Generation, engine: &Engine) {
    let st = &g.stats.sched;
    let n_tok = g.stats.tokens_evaluated.max(1);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s (stop: {})",
        g.prompt_tokens,
        g.prompt_tok_per_s(),
        g.tokens.len(),
        g.gen_tok_per_s(),
        g.stop.as_str()
    );
    eprintln!(
        "experts: hit rate {:.1}% ({} hits, {} misses), {} read from shards ({} per token), {:.3} s stalled on loads",
        100.0 * st.hit_rate(),
        st.hits,
        st.misses,
        short_bytes(st.bytes_read),
        short_bytes(st.bytes_read / n_tok),
        st.stall.as_secs_f64()
    );
    if st.cold_loads + st.upgrades > 0 {
        eprintln!(
            "cold copies: {} misses loaded a cold record, {} hits upgraded to the full record",
            st.cold_loads, st.upgrades
        );
    }
    let pf = &g.stats.prefetch;
    if pf.issued + pf.skipped > 0 {
        eprintln!(
            "prefetch: {} reads started ({} straight into arena slots), {} used by loads, {} not needed; {} predictions not read (recent ones mostly wrong)",
            pf.issued, pf.into_arena, pf.used, pf.wasted, pf.skipped
        );
    }
    let mem = engine.memory();
    let peak = peak_rss_bytes();
    let overhead = peak.map(|p| p.saturating_sub(mem.total() as u64));
    eprintln!(
        "memory: base {} + arena {} ({} slots of {}) + KV {} + compute {} = {}; peak RSS {} (overhead {}) | device {}",
        short_bytes(mem.base as u64),
        short_bytes(mem.arena as u64),
        engine.n_slots(),
        short_bytes(engine.slot_bytes() as u64),
        short_bytes(mem.kv as u64),
        short_bytes((mem.compute + mem.staging) as u64),
        short_bytes(mem.total() as u64),
        peak.map(short_bytes).unwrap_or_else(|| "?".into()),
        overhead.map(short_bytes).unwrap_or_else(|| "?".into()),
        engine.device_name()
    );
    eprintln!("state: {}", state_line(engine));
    if let Some(b) = engine.budget() {
        eprintln!(
            "budget: {} total = {b} + arena {}; compute reserved {} (largest batch at --ctx), in use now {} (with activations)",
            short_bytes(b.total),
            short_bytes(mem.arena as u64),
            short_bytes(b.compute),
            short_bytes(mem.compute as u64)
        );
    }
}

/// `sage footprint PATH`: the tables (or JSON) for `arenas` (sizes, or shares like `30%`),
/// `arena_experts` and `quants`, and the chart when `plot` names a file.
pub fn footprint(
    path: &Path,
    arenas_asked: &[String],
    arena_experts: &[u64],
    quants: &[String],
    cold: Option<&str>,
    plot: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    use crate::footprint::{ArenaSpec, FootprintOptions};
    let mut arenas = ArenaSpec::defaults();
    for s in arenas_asked {
        arenas.push(match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.trim().parse().with_context(|| format!("--arena '{s}' is not a percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    bail!("--arena '{s}': a share of the experts is between 0% and 100%");
                }
                ArenaSpec::Share(p / 100.0)
            }
            None => ArenaSpec::Bytes(parse_size(s).with_context(|| format!("--arena '{s}'"))?),
        });
    }
    arenas.extend(arena_experts.iter().map(|&n| ArenaSpec::Experts(n)));
    let quants = quants.iter().map(|q| crate::quant::parse_quant(q)).collect::<Result<Vec<_>>>()?;
    // Library errors name the path already.
    let cold = cold.map(crate::quant::parse_quant).transpose()?;
    let fp = crate::footprint::footprint(path, &FootprintOptions { quants, arenas, cold })?;
    if let Some(out) = plot {
        crate::footprint::plot_svg(&fp, out)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&fp)?);
    } else {
        print!("{fp}");
        if let Some(out) = plot {
            println!("\nwrote {}", out.display());
        }
    }
    Ok(())
}

/// Load the engine of model directory `dir` with `opts`, and fill its arena with the most used
/// experts of usage.json `warm` when given, showing progress.
pub fn load_engine(dir: &Path, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<Engine> {
    // Read usage.json before loading the model: a damaged file fails fast.
    let usage = warm.map(Usage::load).transpose()?;
    // An arena that holds every expert is filled while loading (one graph per batch after).
    let (bar, mut update) = bytes_bar();
    let engine = Engine::load_with_progress(dir, opts, &mut |done, total| update(done, total, "loading experts"));
    bar.finish_and_clear();
    let mut engine = engine.with_context(|| format!("loading {}", dir.display()))?;
    for (il, ids) in engine.pool().iter().enumerate() {
        log::info!("pool blk.{il}: {} experts ({})", ids.len(), crate::inspect::id_ranges(ids));
    }
    if let (Some(u), Some(p)) = (&usage, warm) {
        u.check_model(p, engine.config.n_layer, engine.config.n_expert)?;
        let n = engine.warm(&u.ranked())?;
        log::info!("warmed the arena with {n} experts from {}", p.display());
    }
    Ok(engine)
}

/// The tokens of text file `text` as the model in `dir` reads them, and its BOS token if it
/// wants one first.
pub fn read_text_tokens(dir: &Path, text: &Path) -> anyhow::Result<(Vec<u32>, Option<u32>)> {
    let tokenizer = load_tokenizer(dir)?;
    let s = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    Ok((tokenizer.encode(&s).with_context(|| format!("tokenizing {}", text.display()))?, tokenizer.bos))
}

/// `sage eval`: perplexity of text file `text` in windows of the engine's context (`opts.n_ctx`).
/// With a lever that changes the output (`--cache-bias`, `--cold-quant`), exact routing is evaluated first over
/// the same windows (same arena, its engine dropped before the lever's is loaded) and the
/// quality gates are printed beside the figures: top-1 agreement, mean KL divergence.
pub fn eval(dir: &Path, text: &Path, json: bool, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<()> {
    let (tokens, bos) = read_text_tokens(dir, text)?;
    let window = opts.n_ctx;
    let n_windows = tokens.len() / window.max(1);
    let reference = if is_lever(&opts) {
        let mut exact = load_engine(dir, exact_options(&opts), warm)?;
        let pb = windows_bar(n_windows, "exact routing");
        let r = crate::eval::Reference::compute(&mut exact, &tokens, window, bos, |done, _, ppl| {
            pb.set_position(done as u64);
            pb.set_message(format!("ppl {ppl:.3}"));
        })
        .with_context(|| format!("evaluating {} with exact routing", text.display()))?;
        pb.finish_and_clear();
        Some(r)
    } else {
        None
    };
    let mut engine = load_engine(dir, opts, warm)?;
    let pb = windows_bar(n_windows, "perplexity");
    let t0 = std::time::Instant::now();
    let progress = |done: usize, _: usize, ppl: f64| {
        pb.set_position(done as u64);
        pb.set_message(format!("ppl {ppl:.3}"));
    };
    let (p, agreement) = match &reference {
        Some(r) => crate::eval::perplexity_against(&mut engine, r, &tokens, bos, progress).map(|(p, a)| (p, Some(a))),
        None => crate::eval::perplexity(&mut engine, &tokens, window, bos, progress).map(|p| (p, None)),
    }
    .with_context(|| format!("evaluating {}", text.display()))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let stats = engine.stats();
    let st = &stats.sched;
    let bytes_per_token = st.bytes_read as f64 / stats.tokens_evaluated.max(1) as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": p, "text_tokens": tokens.len(), "seconds": secs,
                "expert_hit_rate": st.hit_rate(), "bytes_read": st.bytes_read,
                "bytes_per_token": bytes_per_token,
                "arena_slots": engine.n_slots(), "cold_loads": st.cold_loads, "upgrades": st.upgrades,
                "against_exact_routing": agreement,
            })
        );
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.4} nats) over {} scored tokens: {} windows of {} from {} tokens of {}",
            p.ppl,
            p.nll,
            p.tokens_scored,
            p.windows,
            p.window,
            tokens.len(),
            text.display()
        );
        if let Some(a) = &agreement {
            println!(
                "against exact routing: perplexity {:.4} ({:+.2}%), top-1 agreement {:.2}%, mean KL {:.5} nats",
                a.reference_ppl,
                100.0 * (p.ppl / a.reference_ppl - 1.0),
                100.0 * a.top1,
                a.mean_kl
            );
        }
        eprintln!(
            "{:.1} s ({:.0} tok/s); experts: hit rate {:.1}%, {} read ({} per token), arena {} slots",
            secs,
            (p.windows * p.window) as f64 / secs,
            100.0 * st.hit_rate(),
            short_bytes(st.bytes_read),
            short_bytes(bytes_per_token as u64),
            engine.n_slots()
        );
        if st.cold_loads + st.upgrades > 0 {
            eprintln!("cold copies: {} cold loads, {} upgrades", st.cold_loads, st.upgrades);
        }
    }
    Ok(())
}

/// `sage tune`: measure exact routing and each cache bias (and cold copies, where the directory
/// has them) on `text` with the arena of `opts`,
/// print the table and the flags of the setting that reads the fewest bytes per token within
/// `budget`.
pub fn tune(
    dir: &Path,
    text: &Path,
    opts: EngineOptions,
    biases: &[f32],
    budget: crate::tune::Budget,
    warm: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let (tokens, bos) = read_text_tokens(dir, text)?;
    let n_windows = tokens.len() / opts.n_ctx.max(1);
    let pb = windows_bar(n_windows, "");
    let keep = opts.cache_bias.keep;
    let usage = warm.map(Usage::load).transpose()?;
    // Every candidate starts from the same arena: empty, or warmed from usage.json.
    let load = |o: EngineOptions| {
        let mut e = Engine::load(dir, o)?;
        if let (Some(u), Some(p)) = (&usage, warm) {
            u.check_model(p, e.config.n_layer, e.config.n_expert)?;
            e.warm(&u.ranked())?;
        }
        Ok(e)
    };
    // Cold copies: the mode asked for, else both modes where the directory has cold records.
    let colds = match opts.cold {
        ColdUse::Off if crate::model_dir::ModelDir::open(dir)?.has_cold() => {
            vec![ColdUse::Upgrade, ColdUse::NeverUpgrade]
        }
        ColdUse::Off => vec![],
        c => vec![c],
    };
    let candidates = crate::tune::Candidates { biases: biases.to_vec(), keep, colds };
    let t = crate::tune::tune(&tokens, bos, &opts, &candidates, budget, load, |what, done, _| {
        pb.set_message(what.to_string());
        pb.set_position(done as u64);
    })
    .with_context(|| format!("tuning on {}", text.display()))?;
    pb.finish_and_clear();
    let best = t.best();
    let arena_flag = match opts.arena {
        ArenaSize::Bytes(b) => format!("--arena {b}"),
        ArenaSize::Experts(n) => format!("--arena-experts {n}"),
        ArenaSize::Memory(b) => format!("--memory {b}"),
        ArenaSize::All => String::new(),
    };
    let cold_flag = |c: ColdUse| match c {
        ColdUse::Off => "",
        ColdUse::Upgrade => " --cold-quant",
        ColdUse::NeverUpgrade => " --cold-quant=never-upgrade",
    };
    let flags = if best.cache_bias == 0.0 && best.cold == ColdUse::Off {
        format!("{arena_flag} (exact: no lever reads fewer bytes within the budget)")
    } else {
        let bias = if best.cache_bias == 0.0 { String::new() } else { format!(" --cache-bias {}", best.cache_bias) };
        let keep = if keep == 1 || best.cache_bias == 0.0 { String::new() } else { format!(" --cache-keep {keep}") };
        format!("{arena_flag}{bias}{keep}{}", cold_flag(best.cold))
    };
    if json {
        println!("{}", serde_json::json!({ "tune": t, "budget": budget, "flags": flags.trim() }));
        return Ok(());
    }
    println!(
        "arena {} slots; budget: perplexity within +{:.2}% of exact routing's{}",
        t.arena_slots,
        100.0 * budget.max_ppl,
        budget.min_top1.map_or(String::new(), |m| format!(", top-1 agreement at least {:.1}%", 100.0 * m))
    );
    println!(
        "| cache bias | hit rate | bytes/token | perplexity | vs exact | top-1 agreement | mean KL (nats) | within |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let exact = &t.trials[0];
    for tr in &t.trials {
        println!(
            "| {} | {} | {:.1}% | {} ({:+.0}%) | {:.4} | {:+.2}% | {:.2}% | {:.5} | {} |",
            tr.cache_bias,
            match tr.cold {
                ColdUse::Off => "-",
                ColdUse::Upgrade => "upgrade",
                ColdUse::NeverUpgrade => "never upgraded",
            },
            100.0 * tr.hit_rate,
            short_bytes(tr.bytes_per_token as u64),
            100.0 * (tr.bytes_per_token / exact.bytes_per_token.max(1e-9) - 1.0),
            tr.ppl,
            100.0 * (tr.ppl / exact.ppl - 1.0),
            100.0 * tr.agreement.top1,
            tr.agreement.mean_kl,
            if tr.within { "yes" } else { "no" }
        );
    }
    println!("best: sage run {} {}", dir.display(), flags.trim());
    Ok(())
}

/// Whether `opts` asks for a lever that trades output quality for fewer reads.
pub fn is_lever(opts: &EngineOptions) -> bool {
    !opts.cache_bias.is_exact() || opts.cold != crate::engine::ColdUse::Off
}

/// `opts` with every lever off: the reference the quality gates compare with.
pub fn exact_options(opts: &EngineOptions) -> EngineOptions {
    EngineOptions {
        cache_bias: crate::engine::router::CacheBias::EXACT,
        cold: crate::engine::ColdUse::Off,
        ..opts.clone()
    }
}

/// `sage profile`: the routing of text file `text` in windows of the engine's context, written
/// to `out` as usage.json, with its statistics printed.
pub fn profile(dir: &Path, text: &Path, out: &Path, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<()> {
    let (tokens, _) = read_text_tokens(dir, text)?;
    let window = opts.n_ctx;
    let mut engine = load_engine(dir, opts, warm)?;
    let pb = windows_bar(tokens.len() / window.max(1), "profile");
    let trace = crate::eval::profile(&mut engine, &tokens, window, false, |done, _| pb.set_position(done as u64))
        .with_context(|| format!("profiling {}", text.display()))?;
    pb.finish_and_clear();
    let usage = trace.usage(&text.display().to_string());
    usage.save(out)?;
    let st = usage.stats.as_ref().expect("usage from a trace has stats");
    println!(
        "routed {} tokens x {} layers x {} experts; wrote {}",
        usage.tokens,
        usage.n_layer,
        usage.n_expert_used,
        out.display()
    );
    println!("layer  entropy (of {:.2} bits)  next-token reuse  most used", st.max_entropy_bits);
    let top = usage.most_used(usage.n_expert_used as usize);
    for (il, ((entropy, reuse), top)) in st.entropy_bits.iter().zip(&st.next_token_reuse).zip(&top).enumerate() {
        println!("{il:>5}  {entropy:>22.3}  {:>15.1}%  {}", 100.0 * reuse, crate::inspect::id_ranges(top));
    }
    println!("simulated arena (decode order), hit rate:   lru    lfru  optimal");
    for s in &st.simulated_arena {
        println!(
            "  {:>3}% of experts ({:>6} slots)          {:>5.1}%  {:>5.1}%   {:>5.1}%",
            s.percent_of_experts,
            s.slots,
            100.0 * s.lru_hit_rate,
            100.0 * s.lfru_hit_rate,
            100.0 * s.optimal_hit_rate
        );
    }
    Ok(())
}

/// What `sage run` is asked to generate.
pub struct RunJob {
    pub prompt: String,
    /// Wrap the prompt in the model's chat template, as the user's turn.
    pub chat: bool,
    /// With `chat`: a system message first.
    pub system: Option<String>,
    /// With `chat`: this template instead of the model's.
    pub chat_template: Option<PathBuf>,
    pub max_tokens: usize,
    pub sampler: SamplerParams,
    /// Print the figures on stderr after the text.
    pub stats: bool,
    /// One JSON object per token, then the figures.
    pub json: bool,
}

/// The prompt's ids: as text (the model's BOS first where it wants one), or with `chat` the
/// conversation rendered by the chat template (which writes its own special tokens).
fn prompt_ids(engine: &Engine, tokenizer: &Tokenizer, job: &RunJob) -> anyhow::Result<Vec<u32>> {
    if !job.chat {
        return tokenizer.encode(&job.prompt).context("tokenizing the prompt");
    }
    let md = engine.model_dir();
    let template = ChatTemplate::for_model(&md.base, md.config.arch(), tokenizer, job.chat_template.as_deref())?;
    let mut messages: Vec<Message> = job.system.iter().map(|s| Message::new("system", s)).collect();
    messages.push(Message::new("user", &job.prompt));
    let text = template.render(&messages, true)?;
    log::info!("prompt from {}: {text:?}", template.origin);
    tokenizer.encode_with(&text, false).context("tokenizing the prompt")
}

/// The tokenizer of model directory `dir`. A directory that is not a model directory says so
/// (and how to make one) rather than blaming its tokenizer.
pub fn load_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    crate::model_dir::check_model_dir(dir)?;
    Tokenizer::load(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// `sage run`: generate from model directory `dir`, streaming text (or JSON) to stdout.
pub fn run(dir: &Path, job: RunJob, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(dir)?;
    let mut engine = load_engine(dir, opts, warm)?;
    let ids = prompt_ids(&engine, &tokenizer, &job)?;
    let mut sampler = Sampler::new(job.sampler.clone());
    let gen = GenOptions { max_tokens: job.max_tokens, stop_ids: tokenizer.eog.clone(), ..Default::default() };
    let mut stdout = std::io::stdout().lock();
    let json = job.json;
    // JSON: one line per token. After the last token the engine hands over what it held back
    // (an incomplete character, text that could have begun a stop string) with no id: that
    // text belongs to the last token's line, so each line waits for the next call (or the
    // end) before it is written.
    let mut pending: Option<(u32, String)> = None;
    let g = engine.generate(&tokenizer, &ids, &gen, &mut sampler, |id, piece| {
        if json {
            match (id, pending.as_mut()) {
                (None, Some((_, text))) => text.push_str(piece),
                (id, _) => {
                    if let Some((id, text)) = pending.take() {
                        let _ = writeln!(stdout, "{}", serde_json::json!({"id": id, "text": text}));
                    }
                    pending = id.map(|id| (id, piece.to_string()));
                }
            }
        } else {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
        true
    })?;
    if json {
        if let Some((id, text)) = pending {
            writeln!(stdout, "{}", serde_json::json!({"id": id, "text": text}))?;
        }
        writeln!(stdout, "{}", serde_json::json!({ "stats": run_stats(&g, &engine) }))?;
    } else {
        writeln!(stdout)?;
        if job.stats {
            print_run_stats(&g, &engine);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("2 parsecs").unwrap_err().to_string().contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").unwrap_err().to_string().contains("2^64"));
        assert!(parse_size("-3MiB").is_err());
    }
}
