//! The engine's thread: one generation at a time, in the order requests arrive. Tokens go back
//! to the request over a channel; when the request is gone (the client disconnected, the
//! response was dropped) the next send fails and the generation stops there. Shutdown stops the
//! current generation after its token and refuses what is still queued.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::sampler::{Sampler, SamplerParams};
use crate::engine::{Engine, EngineStats, GenOptions, Generation};
use crate::tokenizer::Tokenizer;

/// The shortest time between two pieces of text sent for one request.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(4);

/// What the engine thread sends back for one request.
pub enum Event {
    /// Text as it is made (never a split character, never part of a stop string).
    Text(String),
    Done(Box<Generation>),
    Failed(String),
    /// Shutdown began before or during this request.
    ShuttingDown,
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub gen: GenOptions,
    pub sampler: SamplerParams,
    pub events: UnboundedSender<Event>,
}

/// Counters since the server started, for /metrics.
#[derive(Default, Clone)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cancelled: u64,
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
    /// The latest generation's rates.
    pub last_prompt_tok_per_s: f64,
    pub last_gen_tok_per_s: f64,
    /// The engine's own counters (experts, bytes, stalls), cumulative since loading.
    pub engine: Option<EngineStats>,
}

/// State the HTTP side and the engine thread share.
pub struct Shared {
    pub queued: AtomicUsize,
    pub busy: AtomicBool,
    pub shutdown: AtomicBool,
    pub totals: Mutex<Totals>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            queued: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            totals: Mutex::new(Totals::default()),
        }
    }

    pub fn totals(&self) -> Totals {
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// Run jobs until every sender is gone.
pub fn run(mut engine: Engine, tokenizer: Arc<Tokenizer>, jobs: std::sync::mpsc::Receiver<Job>, shared: Arc<Shared>) {
    while let Ok(job) = jobs.recv() {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        if shared.shutdown.load(Ordering::SeqCst) {
            let _ = job.events.send(Event::ShuttingDown);
            continue;
        }
        if job.events.is_closed() {
            // The client left while waiting.
            continue;
        }
        shared.busy.store(true, Ordering::SeqCst);
        let mut sampler = Sampler::new(job.sampler.clone());
        let started = Instant::now();
        // Text goes out as it is made, but at most one piece per COALESCE: faster than that
        // (hundreds of tokens a second), pieces wait for the next token and go together, so
        // the HTTP side wakes less often than the engine makes tokens.
        let (mut held, mut sent_at) = (String::new(), None::<Instant>);
        let result = engine.generate(&tokenizer, &job.prompt, &job.gen, &mut sampler, |_, piece| {
            if shared.shutdown.load(Ordering::SeqCst) || job.events.is_closed() {
                return false;
            }
            held.push_str(piece);
            if !held.is_empty() && sent_at.is_none_or(|t| t.elapsed() >= COALESCE) {
                sent_at = Some(Instant::now());
                return job.events.send(Event::Text(std::mem::take(&mut held))).is_ok();
            }
            true
        });
        if !held.is_empty() {
            let _ = job.events.send(Event::Text(held));
        }
        let mut t = shared.totals.lock().unwrap_or_else(|p| p.into_inner());
        t.requests += 1;
        match result {
            Ok(g) => {
                t.prompt_tokens += g.prompt_tokens as u64;
                t.cached_prompt_tokens += g.cached_tokens as u64;
                t.completion_tokens += g.tokens.len() as u64;
                t.prompt_seconds += g.prompt_time.as_secs_f64();
                t.decode_seconds += g.gen_time.as_secs_f64();
                t.last_prompt_tok_per_s = g.prompt_tok_per_s();
                t.last_gen_tok_per_s = g.gen_tok_per_s();
                t.engine = Some(g.stats.clone());
                let cancelled = g.stop == crate::engine::Finish::Cancelled;
                t.cancelled += u64::from(cancelled);
                drop(t);
                let ev = if cancelled && shared.shutdown.load(Ordering::SeqCst) {
                    Event::ShuttingDown
                } else {
                    Event::Done(Box::new(g))
                };
                let _ = job.events.send(ev);
            }
            Err(e) => {
                drop(t);
                // A failed evaluation leaves the KV cache in doubt: start the next from scratch.
                engine.reset();
                log::error!("generation failed after {:?}: {e}", started.elapsed());
                let _ = job.events.send(Event::Failed(e.to_string()));
            }
        }
        shared.busy.store(false, Ordering::SeqCst);
    }
}
