//! What the two command-line programs share beyond their argument parsing: sizes as users
//! write them, progress bars over the library's progress callbacks, and the figures `sage run`
//! prints. The library itself draws nothing: these are for the binaries.

use std::io::IsTerminal;

use crate::engine::generate::Generation;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::inspect::short_bytes;

/// `2GiB`, `512MiB`, `1.5GB`, `4096`: a size in bytes. Refuses what is not a size, an unknown
/// unit, and a size past 2^64 bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |why: &str| Error::Usage(format!("'{s}' {why}"));
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| bad("is not a size like 2GiB or 512MiB"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(Error::Usage(format!("unknown size unit '{u}' in '{s}' (use B, KiB, MiB, GiB, KB, MB, GB)"))),
    };
    let bytes = n * mul;
    if !(bytes.is_finite() && bytes >= 0.0) {
        return Err(bad("is not a size"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(bad("is larger than any memory (2^64 bytes)"));
    }
    Ok(bytes as u64)
}

/// The process's peak resident memory (VmHWM), where /proc tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A progress bar of `len` steps drawn with `template` on stderr, hidden when stderr is not
/// a terminal.
pub fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    pb
}

/// A bar over bytes, for the library's `Progress` callbacks: `(done, total, what)`.
pub fn bytes_bar() -> (indicatif::ProgressBar, impl FnMut(u64, u64, &str)) {
    let pb = bar(0, "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}");
    let p = pb.clone();
    let update = move |done: u64, total: u64, what: &str| {
        p.set_length(total);
        p.set_position(done);
        p.set_message(what.to_string());
    };
    (pb, update)
}

/// A bar over windows of a text (`sage eval`, `sage profile`), named `what`.
pub fn windows_bar(n: usize, what: &str) -> indicatif::ProgressBar {
    let pb = bar(n as u64, "{prefix} [{bar:30}] {pos}/{len} windows {msg} ({eta})");
    pb.set_prefix(what.to_string());
    pb
}

/// Everything `sage run` reports about a generation, as JSON (`--json`'s last line, and what
/// `--stats` prints).
pub fn run_stats(g: &Generation, engine: &Engine) -> serde_json::Value {
    let st = &g.stats.sched;
    let n_tok = g.stats.tokens_evaluated.max(1);
    let mem = engine.memory();
    let peak = peak_rss_bytes();
    // Everything else the process holds: code, the tokenizer, allocator slack.
    let overhead = peak.map(|p| p.saturating_sub(mem.total() as u64));
    serde_json::json!({
        "device": engine.device_name(),
        "prompt_tokens": g.prompt_tokens,
        "generated_tokens": g.tokens.len(),
        "stop": g.stop,
        "prompt_tok_per_s": g.prompt_tok_per_s(),
        "gen_tok_per_s": g.gen_tok_per_s(),
        "expert_hits": st.hits,
        "expert_misses": st.misses,
        "expert_hit_rate": st.hit_rate(),
        "bytes_read": st.bytes_read,
        "bytes_read_per_token": st.bytes_read / n_tok,
        "load_stall_s": st.stall.as_secs_f64(),
        "prefetch": g.stats.prefetch,
        "arena_bytes": engine.arena_bytes(),
        "arena_slots": engine.n_slots(),
        "all_resident": engine.all_resident(),
        "memory": mem,
        "peak_rss_bytes": peak,
        "overhead_bytes": overhead,
    })
}

/// `sage run --stats`: speed, expert traffic, prefetch and memory, a line each.
pub fn print_run_stats(g: &Generation, engine: &Engine) {
    let st = &g.stats.sched;
    let n_tok = g.stats.tokens_evaluated.max(1);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s (stop: {})",
        g.prompt_tokens,
        g.prompt_tok_per_s(),
        g.tokens.len(),
        g.gen_tok_per_s(),
        g.stop
    );
    eprintln!(
        "experts: hit rate {:.1}% ({} hits, {} misses), {} read from shards ({} per token), {:.3} s stalled on loads",
        100.0 * st.hit_rate(),
        st.hits,
        st.misses,
        short_bytes(st.bytes_read),
        short_bytes(st.bytes_read / n_tok),
        st.stall.as_secs_f64()
    );
    let pf = &g.stats.prefetch;
    if pf.issued + pf.skipped > 0 {
        eprintln!(
            "prefetch: {} reads started ({} straight into arena slots), {} used by loads, {} not needed; {} predictions not read (recent ones mostly wrong)",
            pf.issued, pf.into_arena, pf.used, pf.wasted, pf.skipped
        );
    }
    let mem = engine.memory();
    let peak = peak_rss_bytes();
    let overhead = peak.map(|p| p.saturating_sub(mem.total() as u64));
    eprintln!(
        "memory: base {} + arena {} ({} slots of {}) + KV {} + compute {} = {}; peak RSS {} (overhead {}) | device {}",
        short_bytes(mem.base as u64),
        short_bytes(mem.arena as u64),
        engine.n_slots(),
        short_bytes(engine.slot_bytes() as u64),
        short_bytes(mem.kv as u64),
        short_bytes((mem.compute + mem.staging) as u64),
        short_bytes(mem.total() as u64),
        peak.map(short_bytes).unwrap_or_else(|| "?".into()),
        overhead.map(short_bytes).unwrap_or_else(|| "?".into()),
        engine.device_name()
    );
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("2 parsecs").unwrap_err().to_string().contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").unwrap_err().to_string().contains("2^64"));
        assert!(parse_size("-3MiB").is_err());
    }
}
