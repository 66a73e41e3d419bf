//! `sage tune`: the lever settings (cache-aware routing's bias, and cold copies where the
//! model directory has them) that read the fewest expert bytes per token within a quality
//! budget, measured on a text against exact routing with full records and the same arena. Each candidate is a full `eval::perplexity_against` run; the exact run is
//! both the reference and the first candidate (bias 0 is always allowed). One engine at a time
//! is loaded.

use crate::engine::router::CacheBias;
use crate::engine::{ColdUse, Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::eval::{perplexity_against, Agreement, Reference};

/// The cache biases `sage tune` tries by default (nats; `CacheBias`).
pub const DEFAULT_BIASES: &[f32] = &[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// What a candidate may cost: perplexity at most `max_ppl` above exact routing's (relative,
/// 0.01 = +1%) and, if given, top-1 agreement with exact routing of at least `min_top1`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Budget {
    pub max_ppl: f64,
    pub min_top1: Option<f64>,
}

/// The settings to try besides exact routing: each bias (with the router's top `keep` always
/// kept), and with each of `colds` (cold copies) every bias again and bias 0.
#[derive(Clone, Debug)]
pub struct Candidates {
    pub biases: Vec<f32>,
    pub keep: usize,
    pub colds: Vec<ColdUse>,
}

/// One measured setting.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Trial {
    pub cache_bias: f32,
    pub keep: usize,
    pub cold: ColdUse,
    pub ppl: f64,
    /// Against exact routing (top-1 1 and KL 0 for the exact run itself).
    pub agreement: Agreement,
    pub hit_rate: f64,
    pub bytes_per_token: f64,
    /// Whether it is within the budget.
    pub within: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuned {
    pub arena_slots: usize,
    pub trials: Vec<Trial>,
    /// Index into `trials` of the setting chosen: fewest bytes per token within the budget
    /// (the exact run, index 0, when nothing else is).
    pub best: usize,
}

impl Tuned {
    pub fn best(&self) -> &Trial {
        &self.trials[self.best]
    }
}

/// Figures of an engine's run so far: hit rate and expert bytes read per token evaluated.
fn io_figures(engine: &Engine) -> (f64, f64) {
    let s = engine.stats();
    (s.sched.hit_rate(), s.sched.bytes_read as f64 / s.tokens_evaluated.max(1) as f64)
}

/// Try exact routing, then each of the `candidates`, on `tokens` in windows of `opts.n_ctx`;
/// pick the fewest bytes per token within `budget`. `load` makes an engine of the model with
/// the options given (the caller's way of loading, e.g. with a warm start); `progress(what,
/// done, total)` after each window.
pub fn tune(
    tokens: &[u32],
    bos: Option<u32>,
    opts: &EngineOptions,
    candidates: &Candidates,
    budget: Budget,
    mut load: impl FnMut(EngineOptions) -> Result<Engine>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Tuned> {
    let Candidates { biases, keep, colds } = candidates;
    let keep = *keep;
    if let Some(b) = biases.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        return Err(Error::Usage(format!("a cache bias to try must be a number above 0, got {b}")));
    }
    let window = opts.n_ctx;
    let exact_opts = EngineOptions { cache_bias: CacheBias::EXACT, cold: ColdUse::Off, ..opts.clone() };
    let (reference, arena_slots, exact_io) = {
        let mut engine = load(exact_opts)?;
        let r = Reference::compute(&mut engine, tokens, window, bos, |d, t, _| progress("exact routing", d, t))?;
        (r, engine.n_slots(), io_figures(&engine))
    };
    let mut trials = vec![Trial {
        cache_bias: 0.0,
        keep,
        cold: ColdUse::Off,
        ppl: reference.perplexity.ppl,
        agreement: Agreement {
            positions: reference.perplexity.tokens_scored,
            top1: 1.0,
            mean_kl: 0.0,
            reference_ppl: reference.perplexity.ppl,
        },
        hit_rate: exact_io.0,
        bytes_per_token: exact_io.1,
        within: true,
    }];
    let settings = biases
        .iter()
        .map(|&b| (b, ColdUse::Off))
        .chain(colds.iter().flat_map(|&c| std::iter::once(0.0).chain(biases.iter().copied()).map(move |b| (b, c))));
    for (bias, cold) in settings {
        let cb = CacheBias { bias, keep, floor: None };
        let mut engine = load(EngineOptions { cache_bias: cb, cold, ..opts.clone() })?;
        let what = match cold {
            ColdUse::Off => format!("cache bias {bias}"),
            c => format!("cache bias {bias}, cold copies ({c:?})"),
        };
        let (p, a) = perplexity_against(&mut engine, &reference, tokens, bos, |d, t, _| progress(&what, d, t))?;
        let (hit_rate, bytes_per_token) = io_figures(&engine);
        let within =
            p.ppl <= reference.perplexity.ppl * (1.0 + budget.max_ppl) && budget.min_top1.is_none_or(|m| a.top1 >= m);
        trials.push(Trial {
            cache_bias: bias,
            keep,
            cold,
            ppl: p.ppl,
            agreement: a,
            hit_rate,
            bytes_per_token,
            within,
        });
    }
    let best = (0..trials.len())
        .filter(|&i| trials[i].within)
        .min_by(|&a, &b| trials[a].bytes_per_token.total_cmp(&trials[b].bytes_per_token).then(a.cmp(&b)))
        .expect("exact routing is always within the budget");
    Ok(Tuned { arena_slots, trials, best })
}
