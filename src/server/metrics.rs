//! /metrics in Prometheus' text format (version 0.0.4): requests, tokens in and out, rates,
//! the expert arena's hits, misses, bytes read and stalls, the queue.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::worker::Shared;
use crate::engine::Engine;

/// What does not change while serving.
pub struct Static {
    arena_bytes: u64,
    arena_slots: u64,
    all_resident: bool,
    n_ctx: u64,
    memory_bytes: u64,
}

impl Static {
    pub fn of(e: &Engine) -> Static {
        Static {
            arena_bytes: e.arena_bytes() as u64,
            arena_slots: e.n_slots() as u64,
            all_resident: e.all_resident(),
            n_ctx: e.n_ctx() as u64,
            memory_bytes: e.memory().total() as u64,
        }
    }
}

/// Responses by status class.
#[derive(Default)]
pub struct Http {
    ok: AtomicU64,
    client_error: AtomicU64,
    server_error: AtomicU64,
}

impl Http {
    pub fn count(&self, status: u16) {
        let c = match status {
            400..=499 => &self.client_error,
            500..=599 => &self.server_error,
            _ => &self.ok,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP sage_{name} {help}\n# TYPE sage_{name} {kind}\nsage_{name} {value}");
}

pub fn render(s: &Static, shared: &Shared, http: &Http) -> String {
    let t = shared.totals();
    let e = t.engine.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "# HELP sage_http_responses_total HTTP responses by status class.");
    let _ = writeln!(out, "# TYPE sage_http_responses_total counter");
    for (class, c) in [("2xx", &http.ok), ("4xx", &http.client_error), ("5xx", &http.server_error)] {
        let _ = writeln!(out, "sage_http_responses_total{{class=\"{class}\"}} {}", c.load(Ordering::Relaxed));
    }
    metric(&mut out, "requests_total", "counter", "Generations run by the engine.", t.requests);
    metric(
        &mut out,
        "requests_cancelled_total",
        "counter",
        "Generations stopped early (client gone, shutdown).",
        t.cancelled,
    );
    metric(&mut out, "prompt_tokens_total", "counter", "Prompt tokens of all generations.", t.prompt_tokens);
    metric(
        &mut out,
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens found in the KV cache (not evaluated again).",
        t.cached_prompt_tokens,
    );
    metric(&mut out, "completion_tokens_total", "counter", "Tokens generated.", t.completion_tokens);
    metric(&mut out, "prompt_seconds_total", "counter", "Time spent evaluating prompts.", t.prompt_seconds);
    metric(&mut out, "decode_seconds_total", "counter", "Time spent generating tokens.", t.decode_seconds);
    metric(
        &mut out,
        "prompt_tokens_per_second",
        "gauge",
        "Prompt evaluation rate of the latest generation.",
        t.last_prompt_tok_per_s,
    );
    metric(&mut out, "tokens_per_second", "gauge", "Generation rate of the latest generation.", t.last_gen_tok_per_s);
    metric(
        &mut out,
        "tokens_evaluated_total",
        "counter",
        "Tokens the engine evaluated since loading.",
        e.tokens_evaluated,
    );
    metric(&mut out, "expert_hits_total", "counter", "Experts found resident in the arena.", e.sched.hits);
    metric(&mut out, "expert_misses_total", "counter", "Experts read from the shards into the arena.", e.sched.misses);
    metric(&mut out, "expert_hit_rate", "gauge", "Hits over hits and misses since loading.", e.sched.hit_rate());
    metric(&mut out, "expert_bytes_read_total", "counter", "Bytes read from the expert shards.", e.sched.bytes_read);
    metric(
        &mut out,
        "expert_stall_seconds_total",
        "counter",
        "Time the engine waited for expert reads.",
        e.sched.stall.as_secs_f64(),
    );
    metric(&mut out, "arena_bytes", "gauge", "Size of the expert arena (fixed).", s.arena_bytes);
    metric(&mut out, "arena_slots", "gauge", "Experts the arena holds.", s.arena_slots);
    metric(&mut out, "arena_all_resident", "gauge", "1 when every expert is resident.", u8::from(s.all_resident));
    metric(
        &mut out,
        "memory_bytes",
        "gauge",
        "Bytes the engine holds (base, arena, KV cache, compute).",
        s.memory_bytes,
    );
    metric(&mut out, "context_size", "gauge", "Tokens the KV cache holds (--ctx).", s.n_ctx);
    metric(&mut out, "queue_length", "gauge", "Requests waiting for the engine.", shared.queued.load(Ordering::SeqCst));
    metric(&mut out, "busy", "gauge", "1 while a generation runs.", u8::from(shared.busy.load(Ordering::SeqCst)));
    metric(&mut out, "max_concurrent_sequences", "gauge", "Sequences generated at once (sage serves one).", 1);
    out
}
