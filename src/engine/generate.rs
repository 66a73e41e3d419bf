//! Tokens in, tokens out: prompt evaluation (reusing the prompt's prefix already in the KV
//! cache where asked), sampling, text decoded a token at a time, stop tokens and stop strings,
//! timings. Tokenizing is the tokenizer's, chat templates `chat`'s.

use std::time::{Duration, Instant};

use super::sampler::Sampler;
use super::{Engine, EngineStats};
use crate::error::{Error, Result};
use crate::tokenizer::{Detokenizer, Tokenizer};

/// What ends a generation besides sampling: the model's end tokens, stop strings, a length.
#[derive(Clone, Debug, Default)]
pub struct GenOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Ids that end the generation (the model's end-of-generation tokens); not part of the text.
    pub stop_ids: Vec<u32>,
    /// Strings that end the generation: the text stops before the first one, which is not
    /// streamed either.
    pub stop: Vec<String>,
    /// Keep the longest prefix of the prompt the KV cache already holds (an earlier turn of the
    /// conversation) and evaluate only the rest; else start from an empty context.
    pub reuse_prefix: bool,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// One of the model's end tokens (`GenOptions::stop_ids`).
    Eos,
    /// A stop string.
    Stop,
    MaxTokens,
    /// The context (KV cache) is full.
    ContextFull,
    /// The caller asked to stop (`on_token` returned false).
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Stop => "stop",
            Finish::MaxTokens => "max_tokens",
            Finish::ContextFull => "context_full",
            Finish::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Of those, already in the KV cache (not evaluated again).
    pub cached_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Why generation stopped.
    pub stop: Finish,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    pub stats: EngineStats,
}

impl Generation {
    pub fn prompt_tok_per_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn gen_tok_per_s(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_time.as_secs_f64().max(1e-9)
    }
}

/// Text held back while it could be the start of a stop string: how many bytes at the end of
/// `text` are a proper prefix of one of `stop` (on a char boundary).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if k > hold && text.ends_with(&s[..k]) {
                hold = k;
            }
        }
    }
    hold
}

impl Engine {
    /// Generate from `prompt_ids`. `on_token(Some(id), text)` sees each token as it is made,
    /// with the text it completes (empty while a UTF-8 character is incomplete or the text could
    /// be the start of a stop string; such text comes with a later token, or after the last
    /// token as `on_token(None, text)`); returning false stops the generation
    /// (`Finish::Cancelled`) after that token.
    pub fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        opts: &GenOptions,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(Option<u32>, &str) -> bool,
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
        let cached = if opts.reuse_prefix { self.keep_prefix_of(prompt_ids) } else { 0 };
        if cached == 0 {
            self.reset();
        }
        let t0 = Instant::now();
        // A recurrent state is checkpointed before the prompt's last token (where a prompt
        // sharing this one's prefix, or the same prompt again, continues: at least its last
        // token is evaluated again for its logits) and after the answer.
        let rest = &prompt_ids[cached..];
        let mut logits = if self.is_recurrent() && rest.len() > 1 {
            self.eval(&rest[..rest.len() - 1], false)?;
            self.checkpoint();
            self.eval(&rest[rest.len() - 1..], false)?
        } else {
            self.eval(rest, false)?
        };
        let prompt_time = t0.elapsed();
        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut out = Vec::new();
        // The last prompt token leads the decoding window, so the first piece has the spacing
        // it has after the prompt.
        let mut detok = Detokenizer::new(tokenizer, &prompt_ids[prompt_ids.len() - 1..]);
        let (mut text, mut sent) = (String::new(), 0);
        let mut stop = Finish::MaxTokens;
        let t1 = Instant::now();
        while out.len() < opts.max_tokens {
            let id = sampler.sample(&mut logits, &history);
            if opts.stop_ids.contains(&id) {
                stop = Finish::Eos;
                break;
            }
            out.push(id);
            history.push(id);
            text.push_str(&detok.push(id)?);
            let found = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            if let Some(at) = found {
                text.truncate(at);
                let piece = text.get(sent..).unwrap_or("").to_string();
                on_token(Some(id), &piece);
                stop = Finish::Stop;
                break;
            }
            let ready = text.len() - held_back(&text, &opts.stop);
            let piece = &text[sent.min(ready)..ready];
            let go_on = on_token(Some(id), piece);
            sent = sent.max(ready);
            if !go_on {
                stop = Finish::Cancelled;
                break;
            }
            if out.len() == opts.max_tokens {
                break;
            }
            if self.n_past() >= self.n_ctx() {
                stop = Finish::ContextFull;
                break;
            }
            logits = self.eval(&[id], false)?;
        }
        if stop != Finish::Stop {
            // What was held back for a stop string that did not come, and what an incomplete
            // character left undecoded.
            text.push_str(&detok.flush()?);
            if text.len() > sent {
                on_token(None, &text[sent..]);
            }
        }
        let gen_time = t1.elapsed();
        self.checkpoint();
        Ok(Generation {
            prompt_tokens: prompt_ids.len(),
            cached_tokens: cached,
            tokens: out,
            text,
            stop,
            prompt_time,
            gen_time,
            stats: self.stats(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stop = vec!["</answer>".to_string(), "STOP".to_string()];
        assert_eq!(held_back("the end </ans", &stop), 5);
        assert_eq!(held_back("the end S", &stop), 1);
        assert_eq!(held_back("the end", &stop), 0);
        assert_eq!(held_back("née", &["ée!".to_string()]), "ée".len());
    }
}
