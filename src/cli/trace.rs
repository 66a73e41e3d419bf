//! `sage trace` (routing traces: record, synth, map, replay) and `sage plan`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::engine::scheduler;
use crate::engine::trace::RouteTrace;
use crate::engine::{Engine, EngineOptions};
use crate::plan::{Plan, PlanOptions};
use crate::trace_gen::{Generator, TraceShape, LRU_CURVE, MEDIAN_REUSE_DISTANCE, NEXT_TOKEN_REPEAT};

/// Arena slots for `pct` percent of the trace's experts (at least one token's).
pub fn slots_at(t: &RouteTrace, pct: f64) -> usize {
    (((t.n_layer * t.n_expert) as f64 * pct / 100.0).round() as usize).max(t.n_expert_used)
}

/// The replay table: per arena size, LRU, LFRU, the policies that use the router's ranking
/// (when the trace has router logits) and Belady's optimal, and the share of LRU's gap to
/// Belady the best online policy closes. Markdown.
pub fn replay_table(t: &RouteTrace, pcts: &[f64]) -> String {
    let ranked = t.router_logits.is_some();
    let mut out = String::from("| arena | slots | LRU | LFRU | LFRU-ghost (default) |");
    if ranked {
        out.push_str(" LRU + runners-up |");
    }
    out.push_str(" Belady (optimal) | best online closes of LRU→Belady |\n|---|---|---|---|---|");
    if ranked {
        out.push_str("---|");
    }
    out.push_str("---|---|\n");
    for &pct in pcts {
        let slots = slots_at(t, pct);
        let lru = t.hit_rate("lru", slots);
        let lfru = t.hit_rate("lfru", slots);
        let ghost = t.hit_rate("lfru-ghost", slots);
        let mut online = vec![lru, lfru, ghost];
        let mut row =
            format!("| {pct}% | {slots} | {:.1}% | {:.1}% | {:.1}% |", 100.0 * lru, 100.0 * lfru, 100.0 * ghost);
        if ranked {
            let h =
                t.replay_hinted(slots, scheduler::policy("lru-ranked", slots, 0).expect("a policy"), t.n_expert_used);
            online.push(h);
            row.push_str(&format!(" {:.1}% |", 100.0 * h));
        }
        let opt = t.optimal_hit_rate(slots);
        let best = online.iter().copied().fold(0.0, f64::max);
        let closes = if opt > lru { (best - lru) / (opt - lru) } else { 0.0 };
        row.push_str(&format!(" {:.1}% | {:.0}% |\n", 100.0 * opt, 100.0 * closes));
        out.push_str(&row);
    }
    out
}

/// Routing statistics of a trace beside the published ones the generator is fitted to.
pub fn stats_lines(t: &RouteTrace) -> String {
    let mut s = format!(
        "{} tokens x {} layers, top-{} of {} experts\nnext-token repeat {:.1}% (published Qwen3-30B-A3B: {:.0}%); median reuse distance {} tokens (published: {MEDIAN_REUSE_DISTANCE})\n",
        t.n_tokens(),
        t.n_layer,
        t.n_expert_used,
        t.n_expert,
        100.0 * t.next_token_repeat(),
        100.0 * NEXT_TOKEN_REPEAT,
        t.median_reuse_distance().map_or("-".into(), |d| d.to_string()),
    );
    for (f, published) in LRU_CURVE {
        let slots = ((t.n_layer * t.n_expert) as f64 * f).round() as usize;
        s.push_str(&format!(
            "LRU at {:.0}% of the experts ({slots} slots): {:.1}% (published: {:.0}%)\n",
            100.0 * f,
            100.0 * t.hit_rate("lru", slots.max(t.n_expert_used)),
            100.0 * published
        ));
    }
    if let Some(r) = t.next_layer_recall(t.n_expert_used) {
        let r2 = t.next_layer_recall(2 * t.n_expert_used).unwrap_or(0.0);
        s.push_str(&format!(
            "next-layer prediction (layer il's router on the residual before layer il-1's experts): recall at {} {:.1}%, at {} {:.1}%\n",
            t.n_expert_used,
            100.0 * r,
            2 * t.n_expert_used,
            100.0 * r2
        ));
    }
    s
}

/// `sage trace record`: route a text through the model (windows of `opts.n_ctx`, the
/// streaming path so every router logit and next-layer prediction is recorded), save the
/// trace, print its statistics and replays.
pub fn record(dir: &Path, text: &Path, out: &Path, opts: EngineOptions, pcts: &[f64]) -> anyhow::Result<()> {
    let (tokens, _) = super::read_text_tokens(dir, text)?;
    let window = opts.n_ctx;
    let how = match (opts.cache_bias.is_exact(), opts.arena) {
        (true, _) => String::new(),
        (false, a) => format!(", cache-aware routing (bias {}) with an arena of {a:?}", opts.cache_bias.bias),
    };
    let opts = EngineOptions { fused: false, ..opts };
    let mut engine = Engine::load(dir, opts)?;
    let pb = super::windows_bar(tokens.len() / window.max(1), "route");
    let t = crate::eval::profile(&mut engine, &tokens, window, true, |done, _| pb.set_position(done as u64))
        .with_context(|| format!("routing {}", text.display()))?;
    pb.finish_and_clear();
    t.save(out, &format!("recorded by sage trace record from {} over {}{how}", dir.display(), text.display()))?;
    println!("wrote {}", out.display());
    print!("{}", stats_lines(&t));
    print!("{}", replay_table(&t, pcts));
    Ok(())
}

/// `sage trace synth`: a trace from the generator fitted to the published statistics.
pub fn synth(out: &Path, shape: TraceShape, n_tokens: usize, seed: u64) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1 << 20).contains(&n_tokens), "--tokens must be 1 to 1048576");
    anyhow::ensure!(
        (1..=4096).contains(&shape.n_layer)
            && shape.n_expert_used > 0
            && shape.n_expert_used < shape.n_expert
            && shape.n_expert <= 1 << 16,
        "need 1 ≤ --layers ≤ 4096 and 1 ≤ --top-k < --experts ≤ 65536"
    );
    let g = Generator::fit(shape);
    let t = g.trace(n_tokens, seed);
    let masses: Vec<String> = g.masses.iter().map(|m| format!("{m:.4}")).collect();
    t.save(
        out,
        &format!(
            "drawn by sage trace synth (seed {seed}): LRU-stack generator fitted to published Qwen3-30B-A3B routing statistics; band masses {}",
            masses.join(" ")
        ),
    )?;
    println!("wrote {}", out.display());
    print!("{}", stats_lines(&t));
    Ok(())
}

/// `sage trace map`: the same routing on another number of layers.
pub fn map(input: &Path, out: &Path, n_layer: usize) -> anyhow::Result<()> {
    anyhow::ensure!((1..=4096).contains(&n_layer), "--layers must be 1 to 4096");
    let t = RouteTrace::open(input)?;
    let m = t.map_layers(n_layer);
    m.save(out, &format!("{} mapped from {} layers onto {n_layer} by sage trace map", input.display(), t.n_layer))?;
    println!("wrote {}", out.display());
    print!("{}", stats_lines(&m));
    Ok(())
}

/// `sage trace replay`.
pub fn replay(path: &Path, pcts: &[f64]) -> anyhow::Result<()> {
    let t = RouteTrace::open(path)?;
    print!("{}", stats_lines(&t));
    print!("{}", replay_table(&t, pcts));
    Ok(())
}

/// A trace for `EngineOptions::route_trace`.
pub fn load_route_trace(path: &Path) -> anyhow::Result<Arc<RouteTrace>> {
    Ok(Arc::new(RouteTrace::open(path)?))
}

/// `sage plan`.
pub fn plan(path: &Path, opts: &PlanOptions, json: bool) -> anyhow::Result<Plan> {
    // Measuring takes a few seconds (a model directory's base is loaded to time its compute).
    eprintln!("sage plan: measuring this machine (memory bandwidth; the disk unless --disk gives it; a model directory's compute)…");
    let p = crate::plan::plan(path, opts).with_context(|| format!("planning {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{p}");
    }
    Ok(p)
}
