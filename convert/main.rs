//! sage-convert: a Hugging Face checkpoint or a llama.cpp GGUF in, a sage model directory out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sage::cli::bytes_bar;
use sage::convert::{convert_with_progress, parse_expert_spec, ConvertOptions};
use sage::inspect::{human_bytes, inspect};
use sage::quant::parse_quant;
use sage::synth::{strategy, synth, synth_config, SynthOptions, ROUTING_NOTICE};
use sage::usage::Usage;

/// Convert a Mixture-of-Experts checkpoint (Hugging Face directory or llama.cpp GGUF; Qwen3-MoE,
/// Qwen3-Omni's thinker, Mixtral, OLMoE, Qwen2-MoE, gpt-oss, Qwen3.5-MoE, Qwen3-Next, GLM-4.5, DeepSeek-V3 and V2)
/// into a sage model directory: base.gguf
/// (everything but the experts) plus one expert shard per layer.
#[derive(Parser)]
#[command(name = "sage-convert", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    convert: ConvertArgs,
    /// More log output (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Args)]
struct ConvertArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a
    /// llama.cpp .gguf file (qwen3moe, llama with experts, olmoe, qwen2moe, gpt-oss, qwen35moe, qwen3next, glm4moe, deepseek2).
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Output model directory.
    #[arg(short, long, required = true)]
    out: Option<PathBuf>,
    /// Type for base and experts: f32, f16, bf16, q8_0, q6_k, q5_k, q4_k, q4_0, q3_k, q2_k,
    /// mxfp4.
    /// Without it, tensors keep the source's type (GGUF tensor bytes are copied as they are).
    #[arg(long)]
    quant: Option<String>,
    /// Type for the base's matrices (embeddings, attention, output); norms and the router stay f32.
    #[arg(long)]
    quant_base: Option<String>,
    /// Type for the experts.
    #[arg(long)]
    quant_experts: Option<String>,
    /// Also store a smaller copy of every expert at this type (e.g. q2_k), in
    /// experts/blk.NNN.cold.bin, for `sage run --cold-quant` (extra disk: `sage footprint`).
    #[arg(long)]
    cold_quant: Option<String>,
    /// Keep only these experts in every layer, e.g. `0-7` or `0,3,5-9` (a pool).
    #[arg(long, conflicts_with = "pool")]
    experts: Option<String>,
    /// A calibrated pool: keep each layer's --keep most used experts of this usage.json
    /// (from `sage profile`).
    #[arg(long, requires = "keep")]
    pool: Option<PathBuf>,
    /// How many experts per layer --pool keeps.
    #[arg(long, requires = "pool")]
    keep: Option<usize>,
    /// Replace a model already in the output directory.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Write a model directory as one standard GGUF that llama.cpp loads.
    Merge {
        /// sage model directory.
        dir: PathBuf,
        /// Output .gguf file.
        #[arg(short, long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Write a model directory with the real shapes of a published model and random weights,
    /// for benchmarks. The base is quantized by ggml tensor by tensor; each expert row is
    /// picked from a pool of random rows ggml quantized once (--exact quantizes every expert).
    /// Random routing is near uniform, so expert hit rates measured on it are a worst case.
    Synth {
        /// The model whose shapes to copy: qwen3-30b-a3b, qwen3-omni-30b-a3b, mixtral-8x7b,
        /// olmoe-1b-7b, qwen1.5-moe-a2.7b, gpt-oss-20b, gpt-oss-120b, qwen3.5-35b-a3b,
        /// qwen3.5-122b-a10b, qwen3.5-397b-a17b, qwen3-next-80b-a3b, glm-4.5, glm-4.5-air,
        /// deepseek-v3, deepseek-v2-lite, tiny, or the path of a Hugging Face config.json.
        #[arg(long)]
        like: String,
        /// Type of the matrices (base and experts): f32, f16, bf16, q8_0, q6_k, q5_k, q4_k,
        /// q4_0, q3_k, q2_k, mxfp4; norms, routers and biases stay f32.
        #[arg(long)]
        quant: String,
        /// Output model directory.
        #[arg(short, long)]
        out: PathBuf,
        /// Also write the model as one standard GGUF that llama.cpp loads.
        #[arg(long)]
        merged: Option<PathBuf>,
        /// Also store cold copies of the experts at this type (as the conversion's --cold-quant).
        #[arg(long)]
        cold_quant: Option<String>,
        /// Keep only the first N layers (same per-layer shapes): a shallower model for quicker runs.
        #[arg(long)]
        layers: Option<u32>,
        /// Seed of the random weights: the same seed gives byte-identical files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Quantize every expert from its own random floats (slow: about 25 min for
        /// qwen3-30b-a3b at q4_k on 2 cores) instead of picking rows from a quantized pool.
        #[arg(long)]
        exact: bool,
        /// Replace an existing model directory and merged file.
        #[arg(long)]
        force: bool,
    },
    /// Show architecture, hyperparameters, tensor counts, bytes and types of a model
    /// directory or GGUF.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp(None).init();
    sage::ggml::route_logs();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sage-convert: error: {}", sage::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Merge { dir, out, force }) => {
            let r = sage::merge::merge(&dir, &out, force).with_context(|| format!("merging {}", dir.display()))?;
            println!(
                "wrote {} ({} tensors, {} experts per layer, {})",
                out.display(),
                r.n_tensors,
                r.n_expert,
                human_bytes(r.bytes)
            );
        }
        Some(Command::Synth { like, quant, out, merged, layers, seed, exact, force, cold_quant }) => {
            let cold_quant = cold_quant.as_deref().map(parse_quant).transpose()?;
            let opts =
                SynthOptions { quant: parse_quant(&quant)?, like, layers, seed, exact, merged, force, cold_quant };
            // Checks the name and layer count before the notice.
            let cfg = synth_config(&opts.like, opts.layers)?;
            eprintln!("sage-convert synth: note: {ROUTING_NOTICE}.");
            eprintln!("sage-convert synth: weights: {}.", strategy(opts.exact));
            eprintln!(
                "sage-convert synth: {}: {} layers, n_embd {}, {} experts of FFN {} ({} used), vocab {}, {}",
                cfg.name,
                cfg.n_layer,
                cfg.n_embd,
                cfg.n_expert,
                cfg.n_ff_exp,
                cfg.n_expert_used,
                cfg.n_vocab,
                opts.quant
            );
            let (bar, mut update) = bytes_bar();
            let r = synth(&out, &opts, &mut update);
            bar.finish_and_clear();
            let r = r.with_context(|| format!("writing a synthetic model to {}", out.display()))?;
            let c = &r.convert;
            println!(
                "wrote {} in {:.1} s: base {} tensors, {}; experts {} per layer, {} (conversion {})",
                c.out.display(),
                r.dir_seconds,
                c.n_base_tensors,
                human_bytes(c.base_bytes),
                c.n_experts_per_layer,
                human_bytes(c.expert_bytes),
                c.conversion_id
            );
            if let (Some(m), Some(path)) = (&r.merged, &opts.merged) {
                println!(
                    "wrote {} in {:.1} s ({} tensors, {} experts per layer, {})",
                    path.display(),
                    r.merge_seconds,
                    m.n_tensors,
                    m.n_expert,
                    human_bytes(m.bytes)
                );
            }
            println!("note: random routing is near uniform: expert hit rates measured on this model are a worst case");
        }
        Some(Command::Inspect { path, json }) => {
            let i = inspect(&path).with_context(|| format!("inspecting {}", path.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{i}");
            }
        }
        None => {
            let a = cli.convert;
            let (input, out) = (a.input.expect("required by clap"), a.out.expect("required by clap"));
            let q = a.quant.as_deref().map(parse_quant).transpose()?;
            let qb = a.quant_base.as_deref().map(parse_quant).transpose()?.or(q);
            let qe = a.quant_experts.as_deref().map(parse_quant).transpose()?.or(q);
            let cold_quant = a.cold_quant.as_deref().map(parse_quant).transpose()?;
            let experts = match &a.experts {
                Some(spec) => {
                    let src = sage::source::open(&input).with_context(|| format!("reading {}", input.display()))?;
                    Some(parse_expert_spec(spec, src.config().n_expert)?)
                }
                None => None,
            };
            let experts_per_layer = match (&a.pool, a.keep) {
                (Some(path), Some(keep)) => {
                    let usage = Usage::load(path)?;
                    let src = sage::source::open(&input).with_context(|| format!("reading {}", input.display()))?;
                    let c = src.config();
                    usage.check_model(path, c.n_layer, c.n_expert)?;
                    if keep == 0 || keep > c.n_expert as usize {
                        anyhow::bail!("--keep {keep}: the model has {} experts per layer", c.n_expert);
                    }
                    Some(usage.most_used(keep))
                }
                _ => None,
            };
            let opts = ConvertOptions {
                quant_base: qb,
                quant_experts: qe,
                experts,
                experts_per_layer,
                cold_quant,
                force: a.force,
            };
            let (bar, mut update) = bytes_bar();
            let r = convert_with_progress(&input, &out, &opts, &mut update);
            bar.finish_and_clear();
            let r = r.with_context(|| format!("converting {} to {}", input.display(), out.display()))?;
            for s in &r.skipped {
                println!("skipped: {s}");
            }
            for f in &r.fallbacks {
                println!("fallback: {f}");
            }
            println!(
                "wrote {}: base {} tensors, {}; experts {} per layer, {} (conversion {})",
                r.out.display(),
                r.n_base_tensors,
                human_bytes(r.base_bytes),
                r.n_experts_per_layer,
                human_bytes(r.expert_bytes),
                r.conversion_id
            );
            if r.cold_bytes > 0 {
                println!("cold copies: {} more on disk", human_bytes(r.cold_bytes));
            }
            // Conversion streams a tensor at a time: this follows the largest tensor.
            if let Some(peak) = sage::cli::peak_rss_bytes() {
                println!("peak RSS {:.1} MiB", peak as f64 / (1u64 << 20) as f64);
            }
        }
    }
    Ok(())
}
