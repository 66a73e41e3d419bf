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
    let mut chunk = Vec::with_capacity(window);
    for (i, w) in ws.iter().enumerate() {
        chunk.clear();
        chunk.extend_from_slice(&tokens[w.clone()]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
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
}
