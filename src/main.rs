//! sage: run Mixture-of-Experts models with experts streamed through a fixed-size arena.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sage::cli::{bytes_bar, parse_size, print_run_stats, run_stats, windows_bar};
use sage::engine::sampler::{Sampler, SamplerParams};
use sage::engine::{ArenaSize, Engine, EngineOptions, KvType};
use sage::inspect::short_bytes;
use sage::tokenizer::Tokenizer;
use sage::usage::Usage;

#[derive(Parser)]
#[command(name = "sage", version, about = "Run Mixture-of-Experts models on devices smaller than the model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output (-v: info, e.g. the pool in effect; -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a model directory made by sage-convert.
    Run(RunArgs),
    /// Perplexity over a text file, in windows of --ctx tokens (as llama-perplexity cuts them).
    Eval(EvalArgs),
    /// Count which experts real routing uses over a text file; write usage.json.
    Profile(ProfileArgs),
    /// Exact memory footprint (base, experts, arena slots, resident totals) at each quant type,
    /// from a config.json alone or checked against a model directory or GGUF.
    Footprint(FootprintArgs),
    /// Show what a model directory (from sage-convert) or a GGUF holds.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How the engine runs: arena, threads, device, KV precision, warm start.
#[derive(Args)]
struct EngineArgs {
    /// Bytes for the expert arena, e.g. 2GiB, 512MiB, 100000000 (default: every expert).
    #[arg(long, conflicts_with = "arena_experts")]
    arena: Option<String>,
    /// The arena as a number of expert slots.
    #[arg(long)]
    arena_experts: Option<usize>,
    /// Fill the arena with the most used experts of this usage.json (from `sage profile`)
    /// before the first token.
    #[arg(long)]
    warm: Option<PathBuf>,
    /// Which experts the arena evicts: lru, or lfru (frequency and recency together).
    #[arg(long, default_value = "lru", value_parser = clap::builder::PossibleValuesParser::new(sage::engine::scheduler::POLICIES))]
    policy: String,
    /// Do not read the experts the next layer is predicted to choose while a layer computes
    /// (by default an I/O thread does: for a decode step into buffers, for a prompt batch
    /// straight into arena slots; prediction: the next layer's router on this layer's residual
    /// stream).
    #[arg(long)]
    no_prefetch: bool,
    /// Keep expert bytes in the page cache after loading them (by default they are dropped, so
    /// memory goes to the arena, not to a second copy of the experts).
    #[arg(long)]
    page_cache: bool,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// f32 KV cache (default f16), the setting that agrees tightly with llama.cpp's reference runs.
    #[arg(long)]
    exact: bool,
    /// Compute device: cpu, gpu, or a device name (CUDA/Metal need the `cuda`/`metal` features);
    /// one this build or machine lacks falls back to the CPU with a warning.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens; the second half of each window is scored.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ProfileArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// UTF-8 text file to route.
    #[arg(long)]
    text: PathBuf,
    /// Where to write the usage counts.
    #[arg(short, long)]
    out: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// The prompt.
    #[arg(short, long)]
    prompt: String,
    /// Wrap the prompt in the model family's chat template (one user turn).
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    engine: EngineArgs,
    /// Context length in tokens (KV cache size).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty over the last 64 tokens (1.0 is off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print speed, expert hit rate, bytes read, stalls, peak RSS and arena bytes to stderr.
    #[arg(long)]
    stats: bool,
    /// One JSON object per line: {"id", "text"} per token, then {"stats": {...}}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FootprintArgs {
    /// A Hugging Face config.json (no weights needed), a model directory (from sage-convert) or a
    /// llama.cpp GGUF (qwen3moe).
    path: PathBuf,
    /// Also report an arena of this size: bytes (2GiB, 512MiB) or a share of all experts (30%).
    /// Repeatable; 25%, 50%, 75% and 100% are always reported.
    #[arg(long)]
    arena: Vec<String>,
    /// Also report an arena of this many expert slots. Repeatable.
    #[arg(long)]
    arena_experts: Vec<u64>,
    /// Only these quant types (repeatable or comma-separated; default: f32 f16 bf16 q8_0 q6_k
    /// q5_k q4_k q4_0 q3_k q2_k).
    #[arg(long, value_delimiter = ',')]
    quant: Vec<String>,
    /// Write an SVG chart of resident bytes against arena size here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

fn footprint(a: FootprintArgs) -> anyhow::Result<()> {
    use sage::footprint::{ArenaSpec, FootprintOptions};
    let mut arenas = ArenaSpec::defaults();
    for s in &a.arena {
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
    arenas.extend(a.arena_experts.iter().map(|&n| ArenaSpec::Experts(n)));
    let quants = a.quant.iter().map(|q| sage::quant::parse_quant(q)).collect::<Result<Vec<_>, _>>()?;
    // Library errors name the path already.
    let fp = sage::footprint::footprint(&a.path, &FootprintOptions { quants, arenas })?;
    if let Some(out) = &a.plot {
        sage::footprint::plot_svg(&fp, out)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&fp)?);
    } else {
        print!("{fp}");
        if let Some(out) = &a.plot {
            println!("\nwrote {}", out.display());
        }
    }
    Ok(())
}

/// Load the engine as `e` says, with a KV cache of `n_ctx`, warmed if asked.
fn load_engine(dir: &Path, e: &EngineArgs, n_ctx: usize) -> anyhow::Result<Engine> {
    let arena = match (&e.arena, e.arena_experts) {
        (Some(s), _) => ArenaSize::Bytes(parse_size(s)?),
        (None, Some(n)) => ArenaSize::Experts(n),
        (None, None) => ArenaSize::All,
    };
    let opts = EngineOptions {
        device: e.device.clone(),
        threads: e.threads.unwrap_or(EngineOptions::default().threads),
        n_ctx,
        arena,
        kv_type: if e.exact { KvType::F32 } else { KvType::F16 },
        policy: e.policy.clone(),
        page_cache: e.page_cache,
        prefetch: !e.no_prefetch,
        ..Default::default()
    };
    // Read usage.json before loading the model: a damaged file fails fast.
    let usage = e.warm.as_ref().map(|p| Usage::load(p)).transpose()?;
    // An arena that holds every expert is filled while loading (one graph per batch after).
    let (bar, mut update) = bytes_bar();
    let engine = Engine::load_with_progress(dir, opts, &mut |done, total| update(done, total, "loading experts"));
    bar.finish_and_clear();
    let mut engine = engine.with_context(|| format!("loading {}", dir.display()))?;
    for (il, ids) in engine.pool().iter().enumerate() {
        log::info!("pool blk.{il}: {} experts ({})", ids.len(), sage::inspect::id_ranges(ids));
    }
    if let (Some(u), Some(p)) = (&usage, &e.warm) {
        u.check_model(p, engine.config.n_layer, engine.config.n_expert)?;
        let n = engine.warm(&u.ranked())?;
        log::info!("warmed the arena with {n} experts from {}", p.display());
    }
    Ok(engine)
}

/// The tokens of text file `text` as the model in `dir` reads them, and its BOS token if it
/// wants one first.
fn read_text_tokens(dir: &Path, text: &Path) -> anyhow::Result<(Vec<u32>, Option<u32>)> {
    let tokenizer = Tokenizer::load(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    let s = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    Ok((tokenizer.encode(&s).with_context(|| format!("tokenizing {}", text.display()))?, tokenizer.bos))
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let (tokens, bos) = read_text_tokens(&a.dir, &a.text)?;
    let mut engine = load_engine(&a.dir, &a.engine, a.ctx)?;
    let n_windows = tokens.len() / a.ctx.max(1);
    let pb = windows_bar(n_windows, "perplexity");
    let t0 = std::time::Instant::now();
    let p = sage::eval::perplexity(&mut engine, &tokens, a.ctx, bos, |done, _, ppl| {
        pb.set_position(done as u64);
        pb.set_message(format!("ppl {ppl:.3}"));
    })
    .with_context(|| format!("evaluating {}", a.text.display()))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let st = engine.stats().sched;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": p, "text_tokens": tokens.len(), "seconds": secs,
                "expert_hit_rate": st.hit_rate(), "bytes_read": st.bytes_read,
                "arena_slots": engine.n_slots(),
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
            a.text.display()
        );
        eprintln!(
            "{:.1} s ({:.0} tok/s); experts: hit rate {:.1}%, {} read, arena {} slots",
            secs,
            (p.windows * p.window) as f64 / secs,
            100.0 * st.hit_rate(),
            short_bytes(st.bytes_read),
            engine.n_slots()
        );
    }
    Ok(())
}

fn profile(a: ProfileArgs) -> anyhow::Result<()> {
    let (tokens, _) = read_text_tokens(&a.dir, &a.text)?;
    let mut engine = load_engine(&a.dir, &a.engine, a.ctx)?;
    let pb = windows_bar(tokens.len() / a.ctx.max(1), "profile");
    let trace = sage::eval::profile(&mut engine, &tokens, a.ctx, false, |done, _| pb.set_position(done as u64))
        .with_context(|| format!("profiling {}", a.text.display()))?;
    pb.finish_and_clear();
    let usage = trace.usage(&a.text.display().to_string());
    usage.save(&a.out)?;
    let st = usage.stats.as_ref().expect("usage from a trace has stats");
    println!(
        "routed {} tokens x {} layers x {} experts; wrote {}",
        usage.tokens,
        usage.n_layer,
        usage.n_expert_used,
        a.out.display()
    );
    println!("layer  entropy (of {:.2} bits)  next-token reuse  most used", st.max_entropy_bits);
    let top = usage.most_used(usage.n_expert_used as usize);
    for (il, ((entropy, reuse), top)) in st.entropy_bits.iter().zip(&st.next_token_reuse).zip(&top).enumerate() {
        println!("{il:>5}  {entropy:>22.3}  {:>15.1}%  {}", 100.0 * reuse, sage::inspect::id_ranges(top));
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

fn run(a: RunArgs) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::load(&a.dir).with_context(|| format!("loading the tokenizer of {}", a.dir.display()))?;
    let mut engine = load_engine(&a.dir, &a.engine, a.ctx)?;
    let text = if a.chat { engine.config.arch().chat_prompt(&a.prompt) } else { a.prompt.clone() };
    let ids = tokenizer.encode(&text).context("tokenizing the prompt")?;
    let mut sampler = Sampler::new(SamplerParams {
        temp: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
        ..Default::default()
    });
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let g = engine.generate(&tokenizer, &ids, a.max_tokens, &mut sampler, |id, piece| {
        if json {
            let _ = writeln!(stdout, "{}", serde_json::json!({"id": id, "text": piece}));
        } else {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    if json {
        writeln!(stdout, "{}", serde_json::json!({ "stats": run_stats(&g, &engine) }))?;
    } else {
        writeln!(stdout)?;
        if a.stats {
            print_run_stats(&g, &engine);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = ["warn", "info", "debug"][cli.verbose.min(2) as usize];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp(None).init();
    sage::ggml::route_logs();
    let result: anyhow::Result<()> = match cli.command {
        Command::Run(a) => run(a),
        Command::Eval(a) => eval(a),
        Command::Profile(a) => profile(a),
        Command::Footprint(a) => footprint(a),
        Command::Inspect { path, json } => {
            sage::inspect::inspect(&path).with_context(|| format!("inspecting {}", path.display())).and_then(|i| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&i)?);
                } else {
                    print!("{i}");
                }
                Ok(())
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sage: error: {}", sage::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
