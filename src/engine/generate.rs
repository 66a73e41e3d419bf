//! Tokens in, tokens out: prompt evaluation, sampling, streaming text, timings. (Tokenizing
//! and the chat template are the tokenizer's and the family's: `tokenizer::Tokenizer`,
//! `arch::Arch::chat_prompt`.)

use std::time::{Duration, Instant};

use super::sampler::Sampler;
use super::{Engine, EngineStats};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Why generation stopped: "eos", "max_tokens" or "context_full".
    pub stop: &'static str,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    pub stats: EngineStats,
}

impl Generation {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn gen_tok_per_s(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_time.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    /// Generate from `prompt_ids` after a fresh context. `on_token(id, text_piece)` sees each
    /// token as it is made (the piece is empty while a UTF-8 character is incomplete).
    pub fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32, &str),
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(Error::Usage("the prompt is empty".into()));
        }
        if prompt_ids.len() > self.n_ctx() {
            return Err(Error::Usage(format!(
                "the prompt has {} tokens but the context holds {} (--ctx)",
                prompt_ids.len(),
                self.n_ctx()
            )));
        }
        self.reset();
        let t0 = Instant::now();
        let mut logits = self.eval(prompt_ids, false)?;
        let prompt_time = t0.elapsed();
        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut out = Vec::new();
        let mut text = String::new();
        let mut stop = "max_tokens";
        let t1 = Instant::now();
        while out.len() < max_tokens {
            let id = sampler.sample(&mut logits, &history);
            if Some(id) == self.eos {
                stop = "eos";
                break;
            }
            out.push(id);
            history.push(id);
            let full = tokenizer.decode(&out)?;
            let piece =
                if full.ends_with('\u{FFFD}') || !full.starts_with(text.as_str()) { "" } else { &full[text.len()..] };
            on_token(id, piece);
            if !piece.is_empty() {
                text = full;
            }
            if out.len() == max_tokens {
                break;
            }
            if self.n_past() >= self.n_ctx() {
                stop = "context_full";
                break;
            }
            logits = self.eval(&[id], false)?;
        }
        let gen_time = t1.elapsed();
        let text = tokenizer.decode(&out)?;
        Ok(Generation {
            prompt_tokens: prompt_ids.len(),
            tokens: out,
            text,
            stop,
            prompt_time,
            gen_time,
            stats: self.stats(),
        })
    }
}
