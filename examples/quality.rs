//! The quality table (docs/quality.md): held-out perplexity and a greedy sample of the bundled
//! trained model for expert pools (fixed ids vs calibrated most-used) and quant types, and
//! routing statistics.
//!
//! cargo run --release --example quality -- [HF_MODEL_DIR] [WORK_DIR] [OUT.md]
//! (defaults: models/sage-moe-16m, a temp dir, docs/quality.md)
//!
//! The model's heldout.txt (never trained on) is cut in two halves by characters: the first
//! calibrates (`sage profile` → usage.json → most-used pools), the second is scored.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sage::convert::{convert, ConvertOptions};
use sage::engine::sampler::{Sampler, SamplerParams};
use sage::engine::{ArenaSize, Engine, EngineOptions, GenOptions};
use sage::ggml::GgmlType;
use sage::tokenizer::Tokenizer;
use sage::usage::Usage;

const WINDOW: usize = 512;
const PROMPT: &str = "And the LORD said unto Moses,";
const PROMPT2: &str = "The Python interpreter";
const SAMPLE_TOKENS: usize = 32;

struct Measured {
    ppl: f64,
    sample: String,
    sample2: String,
}

fn measure(dir: &Path, eval_ids: &[u32]) -> anyhow::Result<Measured> {
    let tok = Tokenizer::load(dir)?;
    let mut engine = Engine::load(dir, EngineOptions { n_ctx: WINDOW, arena: ArenaSize::All, ..Default::default() })?;
    let ppl = sage::eval::perplexity(&mut engine, eval_ids, WINDOW, tok.bos, |_, _, _| {})?.ppl;
    let mut gen = |p: &str| -> anyhow::Result<String> {
        let ids = tok.encode(p)?;
        let mut s = Sampler::new(SamplerParams { temp: 0.0, ..Default::default() });
        let opts = GenOptions { max_tokens: SAMPLE_TOKENS, stop_ids: tok.eog.clone(), ..Default::default() };
        let g = engine.generate(&tok, &ids, &opts, &mut s, |_, _| true)?;
        Ok(format!("{p}{}", g.text))
    };
    let (sample, sample2) = (gen(PROMPT)?, gen(PROMPT2)?);
    Ok(Measured { ppl, sample, sample2 })
}

fn one_line(s: &str) -> String {
    s.replace('\n', "⏎").replace('|', "\\|")
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hf = a.get(1).map(PathBuf::from).unwrap_or_else(|| root.join("models/sage-moe-16m"));
    let tmp = tempfile::tempdir()?;
    let work = a.get(2).map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let out_md = a.get(3).map(PathBuf::from).unwrap_or_else(|| root.join("docs/quality.md"));
    std::fs::create_dir_all(&work)?;
    sage::ggml::route_logs();

    let held = std::fs::read_to_string(hf.join("heldout.txt")).context("reading heldout.txt")?;
    let half = held.char_indices().nth(held.chars().count() / 2).map(|(i, _)| i).unwrap_or(0);
    let (calib_text, eval_text) = held.split_at(half);
    // The checkpoint's own tokenizer.json (a Qwen2 BPE: no BOS token).
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids = |t: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tok.encode(t, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec())
    };
    let (calib_ids, eval_ids) = (ids(calib_text)?, ids(eval_text)?);

    let conv = |name: &str, o: ConvertOptions| -> anyhow::Result<PathBuf> {
        let d = work.join(name);
        eprintln!("converting {name}");
        convert(&hf, &d, &ConvertOptions { force: true, ..o })?;
        Ok(d)
    };
    let q = |t: GgmlType| ConvertOptions { quant_base: Some(t), quant_experts: Some(t), ..Default::default() };

    // Calibration: the full q8_0 model routes the calibration half.
    let full = conv("q8_0-all", q(GgmlType::Q8_0))?;
    let (n_layer, n_expert, k) = {
        let e = Engine::load(&full, EngineOptions { n_ctx: WINDOW, ..Default::default() })?;
        (e.config.n_layer, e.config.n_expert as usize, e.config.n_expert_used as usize)
    };
    let usage = {
        let mut e = Engine::load(&full, EngineOptions { n_ctx: WINDOW, ..Default::default() })?;
        sage::eval::profile(&mut e, &calib_ids, WINDOW, false, |_, _| {})?.usage("heldout.txt, first half")
    };
    usage.save(&work.join("usage.json"))?;
    let eval_usage: Usage = {
        let mut e = Engine::load(&full, EngineOptions { n_ctx: WINDOW, ..Default::default() })?;
        sage::eval::profile(&mut e, &eval_ids, WINDOW, false, |_, _| {})?.usage("heldout.txt, second half")
    };

    // Pools at q8_0.
    let mut sizes: Vec<(String, usize)> = vec![
        ("all".into(), n_expert),
        ("75%".into(), n_expert * 3 / 4),
        ("50%".into(), n_expert / 2),
        ("25%".into(), n_expert / 4),
        ("n_expert_used".into(), k),
    ];
    // Pool sizes that coincide (16 experts: 25% is n_expert_used) are measured once.
    sizes.dedup_by(|b, a| {
        if a.1 == b.1 {
            a.0 = format!("{} = {}", a.0, b.0);
            true
        } else {
            false
        }
    });
    let mut pool_rows = Vec::new();
    for (label, n) in &sizes {
        eprintln!("pool {label} ({n} experts per layer)");
        let fixed = if *n == n_expert {
            measure(&full, &eval_ids)?
        } else {
            let ids: Vec<u32> = (0..*n as u32).collect();
            measure(
                &conv(&format!("fixed-{n}"), ConvertOptions { experts: Some(ids), ..q(GgmlType::Q8_0) })?,
                &eval_ids,
            )?
        };
        let calibrated = if *n == n_expert {
            None
        } else {
            let per_layer = usage.most_used(*n);
            let d = conv(
                &format!("calib-{n}"),
                ConvertOptions { experts_per_layer: Some(per_layer), ..q(GgmlType::Q8_0) },
            )?;
            Some(measure(&d, &eval_ids)?)
        };
        pool_rows.push((label.clone(), *n, fixed, calibrated));
    }

    // Quant types, all experts.
    let mut quant_rows = Vec::new();
    for t in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::Q3_K, GgmlType::Q2_K] {
        eprintln!("quant {t}");
        let d = if t == GgmlType::Q8_0 { full.clone() } else { conv(&format!("{t}-all"), q(t))? };
        let bytes = sage::model_dir::ModelDir::open(&d)?;
        let size = bytes.base_bytes() + bytes.expert_bytes();
        quant_rows.push((t, size, measure(&d, &eval_ids)?));
    }

    // The document.
    let mut md = String::new();
    let date = std::process::Command::new("date").arg("+%Y-%m-%d").output().ok();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    writeln!(md, "# Quality of the bundled model under pruning and quantization\n")?;
    writeln!(
        md,
        "Made by `cargo run --release --example quality` on {date} (model `{}`; {} layers, {} experts, top-{}).\n",
        hf.file_name().unwrap_or_default().to_string_lossy(),
        n_layer,
        n_expert,
        k
    )?;
    writeln!(
        md,
        "Text: the model's `heldout.txt` (held out of training), split in half by characters. The first half \
         ({} tokens) calibrates: `sage profile` counts each layer's expert choices and the calibrated pool keeps \
         each layer's most used. The second half ({} tokens) is scored: perplexity in windows of {WINDOW} tokens, \
         the second half of each window scored (as `llama-perplexity` does), {} tokens scored. Greedy samples: \
         {SAMPLE_TOKENS} tokens after each prompt, ⏎ marks a newline.\n",
        calib_ids.len(),
        eval_ids.len(),
        eval_ids.len() / WINDOW * (WINDOW / 2 - 1)
    )?;
    writeln!(md, "## What was expected\n")?;
    writeln!(
        md,
        "Pruning experts removes capacity the router was trained to use, so perplexity should rise as the pool \
         shrinks. A pool of the most used experts should lose less than the prototype's fixed ids `0..N-1`, \
         because usage is uneven after training with a load-balancing loss of 0.01 (which evens it out only \
         partly). Quantization should cost little down to q4_k and visibly at q3_k and q2_k.\n"
    )?;
    writeln!(md, "## Expert pools (q8_0 weights)\n")?;
    writeln!(
        md,
        "| pool per layer | experts | fixed `0..N-1` ppl | calibrated ppl | fixed sample | calibrated sample |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut wins = Vec::new();
    for (label, n, fixed, cal) in &pool_rows {
        let (cppl, csample) = match cal {
            Some(c) => (format!("{:.3}", c.ppl), one_line(&c.sample)),
            None => ("(same: all experts)".into(), String::new()),
        };
        writeln!(md, "| {label} | {n} | {:.3} | {cppl} | {} | {csample} |", fixed.ppl, one_line(&fixed.sample))?;
        if let Some(c) = cal {
            wins.push((n, c.ppl < fixed.ppl, fixed.ppl, c.ppl));
        }
    }
    writeln!(md, "\nSecond prompt, same pools:\n")?;
    writeln!(md, "| pool | fixed sample | calibrated sample |")?;
    writeln!(md, "|---|---|---|")?;
    for (label, _, fixed, cal) in &pool_rows {
        writeln!(
            md,
            "| {label} | {} | {} |",
            one_line(&fixed.sample2),
            cal.as_ref().map(|c| one_line(&c.sample2)).unwrap_or_default()
        )?;
    }
    writeln!(md, "\n## Quant types (all experts)\n")?;
    writeln!(md, "| type | model bytes | ppl | vs f16 | sample |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    let f16_ppl = quant_rows[0].2.ppl;
    for (t, size, m) in &quant_rows {
        writeln!(
            md,
            "| {t} | {} | {:.3} | {:+.2}% | {} |",
            sage::inspect::short_bytes(*size),
            m.ppl,
            100.0 * (m.ppl / f16_ppl - 1.0),
            one_line(&m.sample)
        )?;
    }
    writeln!(md, "\n## Routing statistics\n")?;
    writeln!(
        md,
        "From the calibration half and, in brackets, the scored half. Entropy of each layer's usage (uniform use \
         = {:.2} bits); share of a token's experts that the next token uses again (random routing: {:.0}%); \
         hit rate of an LRU arena replaying the routing token by token, layer by layer (the decode order).\n",
        (n_expert as f64).log2(),
        100.0 * k as f64 / n_expert as f64
    )?;
    let (s, se) = (usage.stats.as_ref().expect("stats"), eval_usage.stats.as_ref().expect("stats"));
    writeln!(md, "| layer | entropy (bits) | next-token reuse | most used (count share) | least used (count share) |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for il in 0..n_layer as usize {
        let c = &usage.layers[il].counts;
        let total: u64 = c.iter().sum();
        let (imax, imin) = (
            (0..n_expert).max_by_key(|&e| (c[e], std::cmp::Reverse(e))).unwrap(),
            (0..n_expert).min_by_key(|&e| (c[e], e)).unwrap(),
        );
        writeln!(
            md,
            "| {il} | {:.3} ({:.3}) | {:.1}% ({:.1}%) | {imax} ({:.1}%) | {imin} ({:.1}%) |",
            s.entropy_bits[il],
            se.entropy_bits[il],
            100.0 * s.next_token_reuse[il],
            100.0 * se.next_token_reuse[il],
            100.0 * c[imax] as f64 / total as f64,
            100.0 * c[imin] as f64 / total as f64
        )?;
    }
    writeln!(md, "\n| simulated arena | slots | LRU hit rate | LFRU hit rate | optimal (Belady) |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for (a, b) in s.simulated_arena.iter().zip(&se.simulated_arena) {
        writeln!(
            md,
            "| {}% of experts | {} | {:.1}% ({:.1}%) | {:.1}% ({:.1}%) | {:.1}% ({:.1}%) |",
            a.percent_of_experts,
            a.slots,
            100.0 * a.lru_hit_rate,
            100.0 * b.lru_hit_rate,
            100.0 * a.lfru_hit_rate,
            100.0 * b.lfru_hit_rate,
            100.0 * a.optimal_hit_rate,
            100.0 * b.optimal_hit_rate
        )?;
    }
    writeln!(md, "\n## What was found\n")?;
    for (n, won, f, c) in &wins {
        writeln!(
            md,
            "- {n} experts per layer: calibrated {c:.3} vs fixed {f:.3}: {}.",
            if *won {
                format!("calibrated is better by {:.1}%", 100.0 * (1.0 - c / f))
            } else {
                "calibrated is **not** better".into()
            }
        )?;
    }
    let full_ppl = pool_rows[0].2.ppl;
    if let Some((_, n, _, Some(c))) = pool_rows.last() {
        writeln!(
            md,
            "- The smallest pool ({n} experts, the prototype's bet) raises perplexity from {full_ppl:.3} to {:.3} \
             calibrated ({:+.0}%).",
            c.ppl,
            100.0 * (c.ppl / full_ppl - 1.0)
        )?;
    }
    for (t, _, m) in &quant_rows {
        if m.ppl / f16_ppl - 1.0 > 0.05 {
            writeln!(md, "- {t} costs more than 5% perplexity ({:+.1}%).", 100.0 * (m.ppl / f16_ppl - 1.0))?;
        }
    }
    std::fs::write(&out_md, md)?;
    eprintln!("wrote {}", out_md.display());
    Ok(())
}
