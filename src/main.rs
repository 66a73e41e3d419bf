//! sage: run Mixture-of-Experts models with experts streamed through a fixed-size arena.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sage::cli::{parse_size, ChatJob, RunJob, ServeJob};
use sage::engine::router::CacheBias;
use sage::engine::sampler::SamplerParams;
use sage::engine::{ArenaSize, ColdUse, EngineOptions, FlashAttn, KvType};

const KV_TYPES: [&str; 5] = ["f32", "f16", "bf16", "q8_0", "q4_0"];

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
    /// Serve the model over HTTP with the OpenAI API (chat and text completions, streaming),
    /// one sequence at a time, the last conversation kept in the KV cache.
    Serve(ServeArgs),
    /// Chat with the model in the terminal: /reset, /stats; Ctrl-C stops an answer, Ctrl-D exits.
    Chat(ChatArgs),
    /// Perplexity over a text file, in windows of --ctx tokens (as llama-perplexity cuts them).
    Eval(EvalArgs),
    /// Count which experts real routing uses over a text file; write usage.json.
    Profile(ProfileArgs),
    /// Exact memory footprint (base, experts, arena slots, resident totals) at each quant type,
    /// from a config.json alone or checked against a model directory or GGUF.
    Footprint(FootprintArgs),
    /// Will a model run in this much memory, and how fast: arena slots after base, KV cache
    /// and overhead; the expected hit rate; the disk's bandwidth; predicted decode tok/s.
    Plan(PlanArgs),
    /// Routing traces: record a model's, draw one fitted to published Qwen3-30B-A3B
    /// statistics, map one onto another layer count, replay one through eviction policies.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Find the cache bias (and whether to use cold copies) that reads the fewest expert bytes
    /// per token within a quality budget (perplexity against exact routing on a text, same
    /// arena), and print its flags.
    Tune(TuneArgs),
    /// Show what a model directory (from sage-convert) or a GGUF holds.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TuneArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// UTF-8 text to measure on (held out of anything the model was tuned on).
    #[arg(long)]
    text: PathBuf,
    /// The memory the model may use, e.g. 8GiB: the arena `--memory` would get (what the base,
    /// every layer's state at --ctx, compute, staging and the process leave; as `sage plan`).
    #[arg(long, conflicts_with_all = ["arena", "arena_experts"])]
    ram: Option<String>,
    /// Most perplexity above exact routing's, e.g. 1% or 0.5%.
    #[arg(long, default_value = "1%")]
    max_ppl: String,
    /// Least top-1 agreement with exact routing's next token, e.g. 97% (default: no limit).
    #[arg(long)]
    min_top1: Option<String>,
    /// Cache biases to try (nats added to resident experts' log-probabilities).
    #[arg(long, value_delimiter = ',', default_values_t = sage::tune::DEFAULT_BIASES.to_vec())]
    biases: Vec<f32>,
    /// Window length in tokens (the second half of each scored).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    /// A Hugging Face config.json (nothing downloaded yet) or a model directory.
    path: PathBuf,
    /// The memory the model may use, e.g. 8GiB.
    #[arg(long)]
    ram: String,
    /// The disk's read speed: auto (measured with O_DIRECT reads: of the model directory's
    /// shards, or of a 256 MiB scratch file written beside a config.json and removed), or
    /// bytes per second (1.5GB = 1.5e9 B/s).
    #[arg(long, default_value = "auto")]
    disk: String,
    /// Expected hit rates from this usage.json (`sage profile`) instead of the published
    /// Qwen3-30B-A3B routing statistics.
    #[arg(long)]
    usage: Option<PathBuf>,
    /// Expected hit rates from replaying this routing trace (`sage trace`) through LRU.
    #[arg(long, conflicts_with = "usage")]
    trace: Option<PathBuf>,
    /// For a config.json: the quant type it will be converted to.
    #[arg(long, default_value = "q4_k")]
    quant: String,
    /// Context length the model will run with (every layer's state at it counts against --ram).
    #[arg(long, default_value_t = 4096)]
    ctx: u64,
    /// Also find the longest context --ram holds (with the options given), by the same
    /// budget.
    #[arg(long)]
    longest_ctx: bool,
    #[command(flatten)]
    state: StateArgs,
    /// Threads for the memory bandwidth measurement (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Route a text through a model and save its routing trace (decode order), with its
    /// statistics, next-layer prediction recall and replays.
    Record {
        dir: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Arena sizes to replay, in percent of the experts.
        #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
        arena: Vec<f64>,
        /// CPU threads (default: all cores).
        #[arg(short, long)]
        threads: Option<usize>,
        /// Route with an arena of this many slots (default: every expert), and record what
        /// the router chose with it: with --cache-bias, the biased routing.
        #[arg(long)]
        arena_experts: Option<usize>,
        /// Record cache-aware routing with this bias (see `sage run --cache-bias`); needs
        /// --arena-experts. The router logits recorded are the model's, the choices the biased ones.
        #[arg(long, default_value_t = 0.0, requires = "arena_experts", value_parser = float_in(0.0, 100.0, true))]
        cache_bias: f32,
        /// Tokens per graph (1: every token routed against the arena as decoding does).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
        batch: u32,
    },
    /// Draw a trace from the generator fitted to published Qwen3-30B-A3B routing statistics
    /// (LRU hit curve, next-token repeats).
    Synth {
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long, default_value_t = 48)]
        layers: usize,
        #[arg(long, default_value_t = 128)]
        experts: usize,
        #[arg(long, default_value_t = 8)]
        top_k: usize,
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Put a trace's routing on another number of layers (each layer a copy of one of the
    /// trace's, a different stretch of its tokens).
    Map {
        input: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long)]
        layers: usize,
    },
    /// Replay a trace through LRU, LFRU and Belady's optimal at arena sizes.
    Replay {
        trace: PathBuf,
        /// Arena sizes, in percent of the experts.
        #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
        arena: Vec<f64>,
    },
}

/// What every layer's state and a batch's compute take: KV types, flash attention, window
/// caches, batch size (`sage run` and the commands that count memory, `sage plan`).
#[derive(Args)]
struct StateArgs {
    /// f32 K and V caches (overrides --cache-type-k/-v) and, unless --flash-attn says
    /// otherwise, flash attention off: the setting of llama.cpp's reference runs, which sage
    /// equals bit for bit.
    #[arg(long)]
    exact: bool,
    /// Flash attention: on, off, or auto (on where the device runs it for this model, as
    /// llama.cpp's -fa auto; the default, off with --exact). Needed for a quantized V cache.
    #[arg(long, visible_alias = "fa", value_parser = ["on", "off", "auto"])]
    flash_attn: Option<String>,
    /// Element type of the K cache: f32, f16, bf16, q8_0, q4_0 (llama.cpp's -ctk).
    #[arg(long = "cache-type-k", visible_alias = "ctk", default_value = "f16", value_parser = KV_TYPES)]
    cache_type_k: String,
    /// Element type of the V cache (llama.cpp's -ctv); quantized needs flash attention.
    #[arg(long = "cache-type-v", visible_alias = "ctv", default_value = "f16", value_parser = KV_TYPES)]
    cache_type_v: String,
    /// Sliding-window layers keep a cache of the whole context, not a ring of their window
    /// (llama.cpp's --swa-full; gpt-oss).
    #[arg(long)]
    swa_full: bool,
    /// Most tokens evaluated in one graph (a prompt, an eval window; at most --ctx). 1
    /// evaluates a token at a time as decoding does, so the arena's hits, loads, upgrades and
    /// cache-aware routing are a decode's.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    batch: u32,
}

impl StateArgs {
    /// Set `o`'s state options as these arguments ask.
    fn apply(&self, o: &mut EngineOptions, n_ctx: usize) {
        o.k_type = if self.exact { KvType::F32 } else { KvType::parse(&self.cache_type_k).expect("clap checked it") };
        o.v_type = if self.exact { KvType::F32 } else { KvType::parse(&self.cache_type_v).expect("clap checked it") };
        o.flash_attn = match &self.flash_attn {
            Some(f) => FlashAttn::parse(f).expect("clap checked it"),
            None if self.exact => FlashAttn::Off,
            None => FlashAttn::Auto,
        };
        o.swa_full = self.swa_full;
        o.n_batch = (self.batch as usize).min(n_ctx.max(1));
    }
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
    /// A total for the process, e.g. 6GiB: the arena gets what remains after the base, every
    /// layer's KV cache at --ctx, the compute buffer of the largest batch at that context
    /// (measured on its graph), staging buffers and the process itself; too little is an error
    /// that lists each part. Without --arena, --arena-experts or --memory, sage takes what the
    /// machine has (the memory cgroup's limit, else MemAvailable), less 5% (at least 256 MiB),
    /// and says so.
    #[arg(long, conflicts_with_all = ["arena", "arena_experts"])]
    memory: Option<String>,
    /// Fill the arena with the most used experts of this usage.json (from `sage profile`)
    /// before the first token.
    #[arg(long)]
    warm: Option<PathBuf>,
    /// Which experts the arena evicts: lfru-ghost (recency-weighted use counts kept across
    /// evictions, the current token's experts guarded), lru, lfru (counts without memory), or
    /// lru-ranked (LRU that counts the router's runners-up as uses).
    #[arg(long, default_value = sage::engine::scheduler::POLICIES[0], value_parser = clap::builder::PossibleValuesParser::new(sage::engine::scheduler::POLICIES))]
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
    #[command(flatten)]
    state: StateArgs,
    /// Compute device: cpu, gpu, or a device name (CUDA/Metal need the `cuda`/`metal` features);
    /// one this build or machine lacks falls back to the CPU with a warning.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Cache-aware routing, CHANGES THE OUTPUT: among experts close to the router's top-k,
    /// prefer those already in the arena. A resident expert replaces a missing one of the
    /// top-k when ln p + BIAS beats the missing one's ln p (p: the router's probability) and p
    /// is at least --cache-floor; the router's top --cache-keep always stay; weights are the
    /// chosen experts' p, renormalized as the model does. 0 (default): exact routing. Only with
    /// an arena smaller than the experts. `sage eval` measures the cost, `sage tune` picks it.
    #[arg(long, default_value_t = 0.0, value_parser = float_in(0.0, 100.0, true))]
    cache_bias: f32,
    /// With --cache-bias: the router's top experts that are always kept.
    #[arg(long, default_value_t = 1)]
    cache_keep: usize,
    /// With --cache-bias: least router probability of an expert that replaces one of the
    /// top-k (default: the uniform share, 1 / experts in the pool).
    #[arg(long, value_parser = float_in(0.0, 1.0, true))]
    cache_floor: Option<f32>,
    /// With an arena smaller than the experts: load an expert's low-bit cold copy (written by
    /// sage-convert --cold-quant TYPE) on a miss, and its full record when it is chosen again
    /// while resident. Fewer bytes read per token, at a cost in quality. No effect when every
    /// expert is resident. `--cold-quant=never-upgrade`: cold copies only, never upgraded.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "upgrade", value_parser = ["upgrade", "never-upgrade"])]
    cold_quant: Option<String>,
}

impl EngineArgs {
    /// The engine options these arguments ask for, with a KV cache of `n_ctx` tokens.
    fn options(&self, n_ctx: usize) -> anyhow::Result<EngineOptions> {
        let arena = match (&self.arena, self.arena_experts, &self.memory) {
            (Some(s), ..) => ArenaSize::Bytes(parse_size(s).with_context(|| format!("--arena '{s}'"))?),
            (None, Some(n), _) => ArenaSize::Experts(n),
            (None, None, Some(s)) => ArenaSize::Memory(parse_size(s).with_context(|| format!("--memory '{s}'"))?),
            (None, None, None) => match sage::engine::budget::available() {
                Some((b, from)) => {
                    eprintln!(
                        "sage: --memory {:.2} GiB: {from}, less 5% (give --memory or --arena to choose)",
                        b as f64 / (1u64 << 30) as f64
                    );
                    ArenaSize::Memory(b)
                }
                None => ArenaSize::All,
            },
        };
        let mut o = EngineOptions {
            device: self.device.clone(),
            threads: self.threads.unwrap_or(EngineOptions::default().threads),
            n_ctx,
            arena,
            policy: self.policy.clone(),
            page_cache: self.page_cache,
            prefetch: !self.no_prefetch,
            cache_bias: CacheBias { bias: self.cache_bias, keep: self.cache_keep, floor: self.cache_floor },
            cold: match self.cold_quant.as_deref() {
                None => ColdUse::Off,
                Some("never-upgrade") => ColdUse::NeverUpgrade,
                Some(_) => ColdUse::Upgrade,
            },
            ..Default::default()
        };
        self.state.apply(&mut o, n_ctx);
        Ok(o)
    }
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
    /// Wrap the prompt in the model's chat template (its own; its family's when it has none),
    /// as the user's turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: a Jinja chat template file to use instead of the model's.
    #[arg(long, requires = "chat")]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Context length in tokens (KV cache size).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print speed, expert hit rate, bytes read, stalls, peak RSS and arena bytes to stderr.
    #[arg(long)]
    stats: bool,
    /// One JSON object per line: {"id", "text"} per token, then {"stats": {...}}.
    #[arg(long)]
    json: bool,
    /// BENCHMARKS ONLY: take each token's experts from this routing trace (`sage trace`)
    /// instead of the router, so a random-weight model streams experts with realistic reuse.
    /// The output is then NOT the model's.
    #[arg(long)]
    route_trace: Option<PathBuf>,
}

/// How tokens are picked.
#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature, 0 to 2; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_parser = float_in(0.0, 2.0, true), allow_negative_numbers = true)]
    temp: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    top_k: usize,
    /// Keep the most likely tokens up to this probability mass, above 0 up to 1 (1: all).
    #[arg(long, default_value_t = 0.95, value_parser = float_in(0.0, 1.0, false), allow_negative_numbers = true)]
    top_p: f32,
    /// Repetition penalty over the last 64 tokens, above 0 up to 10 (1.0 is off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in(0.0, 10.0, false), allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Random seed (run and chat: 0 when not given; serve: a request without a seed gets a
    /// fresh one unless this is given).
    #[arg(long)]
    seed: Option<u64>,
}

/// A parser of a float option within `lo` (included or not) to `hi` (included), as the
/// server checks the same values in requests.
fn float_in(lo: f32, hi: f32, lo_included: bool) -> impl Fn(&str) -> Result<f32, String> + Clone {
    move |s: &str| {
        let v: f32 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
        let above = if lo_included { v >= lo } else { v > lo };
        if v.is_finite() && above && v <= hi {
            Ok(v)
        } else {
            let from = if lo_included { format!("from {lo}") } else { format!("above {lo}") };
            Err(format!("{s} is out of range: {from} up to {hi}"))
        }
    }
}

impl SamplingArgs {
    fn params(&self) -> SamplerParams {
        SamplerParams {
            temp: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed.unwrap_or(0),
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// Address to listen on: loopback unless told otherwise (0.0.0.0 serves the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the address is printed when the server is ready).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long, env = "SAGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in /v1/models and responses (default: the directory's name).
    #[arg(long)]
    alias: Option<String>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Context length in tokens (KV cache size): prompt and answer together.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Largest request body accepted, e.g. 4MiB.
    #[arg(long, default_value = "4MiB")]
    max_body: String,
    /// Requests that may wait for the engine; more get 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sampling for requests that do not say (OpenAI's temperature, top_p, and llama.cpp's
    /// top_k, repeat_penalty, seed).
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    /// Model directory (from sage-convert).
    dir: PathBuf,
    /// A system message first.
    #[arg(long)]
    system: Option<String>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Context length in tokens (KV cache size): the whole conversation.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Most tokens per answer (default: what the context has left).
    #[arg(short = 'n', long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct FootprintArgs {
    /// A Hugging Face config.json (no weights needed), a model directory (from sage-convert) or a
    /// llama.cpp GGUF of a supported family.
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
    /// Also report the extra disk of cold copies at this type (`sage-convert --cold-quant`); a
    /// model directory with cold copies reports its own.
    #[arg(long)]
    cold_quant: Option<String>,
    /// Write an SVG chart of resident bytes against arena size here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// "1%", "0.5 %" or a fraction ("0.01").
fn parse_percent(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| anyhow::anyhow!("not a percentage (e.g. 1% or 0.01)"))?;
    anyhow::ensure!(v.is_finite() && (0.0..=1.0).contains(&v), "must be between 0% and 100%");
    Ok(v)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = ["warn", "info", "debug"][cli.verbose.min(2) as usize];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp(None).init();
    sage::ggml::route_logs();
    let result: anyhow::Result<()> = match cli.command {
        Command::Run(a) => a.engine.options(a.ctx).and_then(|mut opts| {
            if let Some(p) = &a.route_trace {
                opts.route_trace = Some(sage::cli::trace::load_route_trace(p)?);
            }
            let sampler = a.sampling.params();
            let job = RunJob {
                prompt: a.prompt,
                chat: a.chat,
                system: a.system,
                chat_template: a.chat_template,
                max_tokens: a.max_tokens,
                sampler,
                stats: a.stats,
                json: a.json,
            };
            sage::cli::run(&a.dir, job, opts, a.engine.warm.as_deref())
        }),
        Command::Serve(a) => a.engine.options(a.ctx).and_then(|opts| {
            let max_body = parse_size(&a.max_body).with_context(|| format!("--max-body '{}'", a.max_body))?;
            let serve = ServeJob {
                host: a.host,
                port: a.port,
                api_key: a.api_key,
                alias: a.alias,
                chat_template: a.chat_template,
                max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
                max_queue: a.max_queue,
                sampler: a.sampling.params(),
                seed: a.sampling.seed,
            };
            sage::cli::serve(&a.dir, serve, opts, a.engine.warm.as_deref())
        }),
        Command::Chat(a) => a.engine.options(a.ctx).and_then(|opts| {
            let job = ChatJob {
                system: a.system,
                chat_template: a.chat_template,
                max_tokens: a.max_tokens,
                sampler: a.sampling.params(),
            };
            sage::cli::chat(&a.dir, job, opts, a.engine.warm.as_deref())
        }),
        Command::Eval(a) => a
            .engine
            .options(a.ctx)
            .and_then(|opts| sage::cli::eval(&a.dir, &a.text, a.json, opts, a.engine.warm.as_deref())),
        Command::Profile(a) => a
            .engine
            .options(a.ctx)
            .and_then(|opts| sage::cli::profile(&a.dir, &a.text, &a.out, opts, a.engine.warm.as_deref())),
        Command::Footprint(a) => sage::cli::footprint(
            &a.path,
            &a.arena,
            &a.arena_experts,
            &a.quant,
            a.cold_quant.as_deref(),
            a.plot.as_deref(),
            a.json,
        ),
        Command::Tune(a) => a.engine.options(a.ctx).and_then(|mut opts| {
            if let Some(r) = &a.ram {
                let ram = parse_size(r).with_context(|| format!("--ram '{r}'"))?;
                // The arena `--memory RAM` would give (the same split, measured once).
                let fit = sage::engine::Engine::fit_memory(&a.dir, &opts, ram, sage::engine::budget::resident_bytes())?;
                if !fit.runs() {
                    return Err(anyhow::Error::new(fit.too_small()).context(format!("--ram {ram}")));
                }
                opts.arena = ArenaSize::Bytes(fit.budget.arena());
            }
            anyhow::ensure!(
                a.ram.is_some()
                    || a.engine.arena.is_some()
                    || a.engine.arena_experts.is_some()
                    || a.engine.memory.is_some(),
                "give --ram, --arena or --arena-experts: with every expert resident there is nothing to tune"
            );
            let budget = sage::tune::Budget {
                max_ppl: parse_percent(&a.max_ppl).with_context(|| format!("--max-ppl '{}'", a.max_ppl))?,
                min_top1: a
                    .min_top1
                    .as_deref()
                    .map(|s| parse_percent(s).with_context(|| format!("--min-top1 '{s}'")))
                    .transpose()?,
            };
            sage::cli::tune(&a.dir, &a.text, opts, &a.biases, budget, a.engine.warm.as_deref(), a.json)
        }),
        Command::Plan(a) => (|| {
            let ram = parse_size(&a.ram).with_context(|| format!("--ram '{}'", a.ram))?;
            let disk = match a.disk.as_str() {
                "auto" => sage::plan::Disk::Auto,
                s => sage::plan::Disk::Given(parse_size(s).with_context(|| format!("--disk '{s}'"))? as f64),
            };
            let quant = sage::quant::parse_quant(&a.quant)?;
            let mut engine = EngineOptions {
                n_ctx: a.ctx as usize,
                threads: a.threads.unwrap_or(EngineOptions::default().threads),
                ..Default::default()
            };
            a.state.apply(&mut engine, a.ctx as usize);
            let opts = sage::plan::PlanOptions {
                ram,
                disk,
                usage: a.usage,
                trace: a.trace,
                quant: Some(quant),
                engine,
                longest_ctx: a.longest_ctx,
            };
            sage::cli::trace::plan(&a.path, &opts, a.json).map(|_| ())
        })(),
        Command::Trace(t) => match t {
            TraceCommand::Record { dir, text, out, ctx, arena, threads, arena_experts, cache_bias, batch } => {
                let opts = EngineOptions {
                    n_ctx: ctx,
                    threads: threads.unwrap_or(EngineOptions::default().threads),
                    arena: arena_experts.map_or(ArenaSize::All, ArenaSize::Experts),
                    cache_bias: CacheBias { bias: cache_bias, ..CacheBias::EXACT },
                    n_batch: batch as usize,
                    ..Default::default()
                };
                sage::cli::trace::record(&dir, &text, &out, opts, &arena)
            }
            TraceCommand::Synth { out, layers, experts, top_k, tokens, seed } => {
                let shape = sage::trace_gen::TraceShape { n_layer: layers, n_expert: experts, n_expert_used: top_k };
                sage::cli::trace::synth(&out, shape, tokens, seed)
            }
            TraceCommand::Map { input, out, layers } => sage::cli::trace::map(&input, &out, layers),
            TraceCommand::Replay { trace, arena } => sage::cli::trace::replay(&trace, &arena),
        },
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
