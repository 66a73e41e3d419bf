//! Perplexity and routing profiles over a text, in windows as llama.cpp's `llama-perplexity`
//! cuts them: the tokens are split into consecutive, non-overlapping windows of `window`
//! tokens, each evaluated from an empty context; in each window the tokens after the first
//! `window / 2` are scored (each predicted with at least half a window of context).

use std::ops::Range;

use crate::engine::trace::RouteTrace;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Consecutive full windows over `n_tokens` tokens (a partial last window is dropped).
pub fn windows(n_tokens: usize, window: usize) -> Result<Vec<Range<usize>>> {
    if window < 2 {
        return Err(Error::Usage(format!("a window of {window} tokens is too small to score (need 2 or more)")));
    }
    if n_tokens < window {
        return Err(Error::Usage(format!(
            "the text has {n_tokens} tokens, fewer than one window of {window}; use a shorter window (--ctx)"
        )));
    }
    Ok((0..n_tokens / window).map(|w| w * window..(w + 1) * window).collect())
}

/// Negative log-likelihood (nats) of `tokens[j + 1]` under `logits[j]` for j in `first..n-1`,
/// summed, with the number of tokens scored. `logits` is [n][n_vocab], row-major.
pub fn score(logits: &[f32], n_vocab: usize, tokens: &[u32], first: usize) -> (f64, usize) {
    let mut nll = 0.0;
    let mut n = 0;
    for j in first..tokens.len().saturating_sub(1) {
        let row = &logits[j * n_vocab..(j + 1) * n_vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
        nll += lse - row[tokens[j + 1] as usize] as f64;
        n += 1;
    }
    (nll, n)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub windows: usize,
    pub window: usize,
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token, nats.
    pub nll: f64,
    pub ppl: f64,
}

/// Perplexity of `tokens`. With `bos` (a model that wants a BOS token first), each window
/// starts with it in place of its first token, as llama-perplexity does. `progress(done,
/// total, ppl_so_far)` is called after each window.
pub fn perplexity(
    engine: &mut Engine,
    tokens: &[u32],
    window: usize,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    let ws = windows(tokens.len(), window)?;
    let n_vocab = engine.config.n_vocab as usize;
    let (mut nll, mut n) = (0.0, 0usize);
    for (i, w) in ws.iter().enumerate() {
        let chunk = window_tokens(tokens, w, bos);
        engine.reset();
        let logits = engine.eval(&chunk, true)?;
        let (s, c) = score(&logits, n_vocab, &chunk, window / 2);
        nll += s;
        n += c;
        progress(i + 1, ws.len(), (nll / n as f64).exp());
    }
    engine.reset();
    let mean = nll / n as f64;
    Ok(Perplexity { windows: ws.len(), window, tokens_scored: n, nll: mean, ppl: mean.exp() })
}

/// Exact routing's next-token distributions at the positions `perplexity` scores, as
/// log-probabilities, window by window: what `perplexity_against` compares a run with a lever
/// (cache-aware routing, cold copies) to. Computed once, so that several candidates (`sage
/// tune`) share it and the reference engine can be dropped before a candidate's is loaded.
pub struct Reference {
    pub window: usize,
    pub n_vocab: usize,
    /// Per window: [scored positions][n_vocab] log-softmax.
    logprobs: Vec<Vec<f32>>,
    pub perplexity: Perplexity,
}

/// The largest reference `Reference::compute` keeps in memory.
pub const REFERENCE_MAX_BYTES: usize = 2 << 30;

impl Reference {
    /// Evaluate `tokens` in windows as `perplexity` does with `engine` (exact routing) and keep
    /// the log-probabilities of every scored position.
    pub fn compute(
        engine: &mut Engine,
        tokens: &[u32],
        window: usize,
        bos: Option<u32>,
        mut progress: impl FnMut(usize, usize, f64),
    ) -> Result<Reference> {
        let ws = windows(tokens.len(), window)?;
        let n_vocab = engine.config.n_vocab as usize;
        let scored = ws.len() * (window - 1 - window / 2);
        if scored.saturating_mul(n_vocab).saturating_mul(4) > REFERENCE_MAX_BYTES {
            return Err(Error::Usage(format!(
                "{scored} scored positions x {n_vocab} vocabulary entries of reference log-probabilities exceed {} MiB; use a shorter text",
                REFERENCE_MAX_BYTES >> 20
            )));
        }
        let (mut nll, mut n) = (0.0, 0usize);
        let mut logprobs = Vec::with_capacity(ws.len());
        for (i, w) in ws.iter().enumerate() {
            let chunk = window_tokens(tokens, w, bos);
            engine.reset();
            let logits = engine.eval(&chunk, true)?;
            let (s, c) = score(&logits, n_vocab, &chunk, window / 2);
            nll += s;
            n += c;
            let mut lp = Vec::with_capacity(c * n_vocab);
            for j in window / 2..window - 1 {
                lp.extend(log_softmax(&logits[j * n_vocab..(j + 1) * n_vocab]));
            }
            logprobs.push(lp);
            progress(i + 1, ws.len(), (nll / n as f64).exp());
        }
        engine.reset();
        let mean = nll / n as f64;
        let perplexity = Perplexity { windows: ws.len(), window, tokens_scored: n, nll: mean, ppl: mean.exp() };
        Ok(Reference { window, n_vocab, logprobs, perplexity })
    }
}

/// A window's tokens, BOS in place of the first where the model wants one.
fn window_tokens(tokens: &[u32], w: &Range<usize>, bos: Option<u32>) -> Vec<u32> {
    let mut chunk = tokens[w.clone()].to_vec();
    if let Some(b) = bos {
        chunk[0] = b;
    }
    chunk
}

/// ln softmax of one row, in f64 and stored as f32.
fn log_softmax(row: &[f32]) -> impl Iterator<Item = f32> + '_ {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(move |&l| (l as f64 - lse) as f32)
}

/// How a run's next-token distributions compare with exact routing's over the scored
/// positions: the quality gates of `sage eval` and `sage tune`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Agreement {
    pub positions: usize,
    /// Share of positions whose most likely token is exact routing's most likely token.
    pub top1: f64,
    /// Mean KL(exact ‖ this run) of the next-token distributions, nats.
    pub mean_kl: f64,
    /// Perplexity with exact routing over the same positions.
    pub reference_ppl: f64,
}

/// Top-1 agreement and KL(p ‖ q) between two rows of log-probabilities.
pub fn compare_rows(p: &[f32], q: &[f32]) -> (bool, f64) {
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |best, (i, &v)| if v > r[best] { i } else { best });
    let kl: f64 = p.iter().zip(q).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum();
    (argmax(p) == argmax(q), kl.max(0.0))
}

/// `perplexity` of `engine` (with a lever), and how it agrees with `reference` (exact
/// routing over the same tokens and windows).
pub fn perplexity_against(
    engine: &mut Engine,
    reference: &Reference,
    tokens: &[u32],
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(Perplexity, Agreement)> {
    let window = reference.window;
    let ws = windows(tokens.len(), window)?;
    let n_vocab = engine.config.n_vocab as usize;
    if ws.len() != reference.logprobs.len() || n_vocab != reference.n_vocab {
        return Err(Error::Usage(format!(
            "the reference has {} windows of a {}-token vocabulary; this text has {} windows and the model {}",
            reference.logprobs.len(),
            reference.n_vocab,
            ws.len(),
            n_vocab
        )));
    }
    let (mut nll, mut n, mut agree, mut kl) = (0.0, 0usize, 0usize, 0.0);
    for (i, w) in ws.iter().enumerate() {
        let chunk = window_tokens(tokens, w, bos);
        engine.reset();
        let logits = engine.eval(&chunk, true)?;
        let (s, c) = score(&logits, n_vocab, &chunk, window / 2);
        nll += s;
        n += c;
        for (r, j) in (window / 2..window - 1).enumerate() {
            let q: Vec<f32> = log_softmax(&logits[j * n_vocab..(j + 1) * n_vocab]).collect();
            let (same, d) = compare_rows(&reference.logprobs[i][r * n_vocab..(r + 1) * n_vocab], &q);
            agree += same as usize;
            kl += d;
        }
        progress(i + 1, ws.len(), (nll / n as f64).exp());
    }
    engine.reset();
    let mean = nll / n as f64;
    let ppl = Perplexity { windows: ws.len(), window, tokens_scored: n, nll: mean, ppl: mean.exp() };
    let a = Agreement {
        positions: n,
        top1: agree as f64 / n as f64,
        mean_kl: kl / n as f64,
        reference_ppl: reference.perplexity.ppl,
    };
    Ok((ppl, a))
}

/// The routing of every token of `tokens`, evaluated in windows (with every router logit if
/// `router_logits`: see `Engine::start_trace`).
pub fn profile(
    engine: &mut Engine,
    tokens: &[u32],
    window: usize,
    router_logits: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<RouteTrace> {
    let ws = windows(tokens.len(), window)?;
    engine.start_trace(router_logits)?;
    for (i, w) in ws.iter().enumerate() {
        engine.reset();
        if let Err(e) = engine.eval(&tokens[w.clone()], false) {
            engine.take_trace();
            return Err(e);
        }
        progress(i + 1, ws.len());
    }
    engine.reset();
    Ok(engine.take_trace().expect("started above"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_scoring() {
        assert_eq!(windows(10, 4).unwrap(), vec![0..4, 4..8]);
        assert!(windows(3, 4).unwrap_err().to_string().contains("fewer than one window"));
        // Uniform logits over 4 tokens: each scored token costs ln 4.
        let logits = vec![0.0f32; 4 * 4];
        let (nll, n) = score(&logits, 4, &[0, 1, 2, 3], 1);
        assert_eq!(n, 2);
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-12);
        // A confident right answer costs almost nothing.
        let mut l = vec![0.0f32; 2 * 3];
        l[1] = 30.0;
        assert!(score(&l, 3, &[0, 1], 0).0 < 1e-9);
    }

    #[test]
    fn agreement_of_distributions() {
        let p: Vec<f32> = log_softmax(&[1.0, 2.0, 0.5]).collect();
        assert!((p.iter().map(|&x| (x as f64).exp()).sum::<f64>() - 1.0).abs() < 1e-6);
        let (same, kl) = compare_rows(&p, &p);
        assert!(same && kl < 1e-9);
        // KL of two coins: p = (0.9, 0.1), q = (0.5, 0.5).
        let (a, b): (Vec<f32>, Vec<f32>) = ([0.9f32.ln(), 0.1f32.ln()].into(), [0.5f32.ln(), 0.5f32.ln()].into());
        let (same, kl) = compare_rows(&a, &b);
        let want = 0.9 * (0.9f64 / 0.5).ln() + 0.1 * (0.1f64 / 0.5).ln();
        assert!(same && (kl - want).abs() < 1e-6, "{kl} vs {want}");
        let (same, _) = compare_rows(&a, &[0.2f32.ln(), 0.8f32.ln()]);
        assert!(!same);
    }
}
