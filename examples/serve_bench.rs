//! `sage serve` against `sage run`, side by side in one run:
//!
//! 1. decode rate as a client sees it: the same prompt, greedy, through `sage run --json`
//!    (a token per line on stdout) and through the server's streaming /v1/completions
//!    (chunks over HTTP); rate = (tokens - 1) / (time of the last token - time of the first),
//!    runs alternating, medians, and the median of each server run's ratio to the run before;
//! 2. time to the first token of a conversation's follow-up turn when the server's KV cache
//!    holds the conversation so far, against the same conversation sent fresh (the cache
//!    holding something else), runs alternating, medians.
//!
//! cargo build --release --bins && cargo run --release --example serve_bench -- MODEL_DIR
//!     [--runs 5] [--gen 256] [--answer 32] [--system-words 0] [--skip-decode] [ENGINE ARGS…]
//!
//! ENGINE ARGS (e.g. `--arena-experts 1536 --threads 2`) go to both `sage run` and `sage serve`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sage_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("sage")).unwrap();
    anyhow::ensure!(bin.exists(), "{} is missing: cargo build --release --bins", bin.display());
    Ok(bin)
}

const PROMPT: &str = "And God said unto Moses,";

/// Decode rate of `sage run` as its stdout shows tokens.
fn run_rate(sage: &Path, dir: &Path, gen: usize, engine: &[String]) -> anyhow::Result<f64> {
    let mut child = Command::new(sage)
        .arg("run")
        .arg(dir)
        .args(["--prompt", PROMPT, "--temp", "0", "--json", "-n", &gen.to_string()])
        .args(engine)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut times = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        if line.starts_with("{\"id\"") {
            times.push(Instant::now());
        }
    }
    anyhow::ensure!(child.wait()?.success(), "sage run failed");
    anyhow::ensure!(times.len() == gen, "sage run made {} tokens, not {gen}", times.len());
    Ok((gen - 1) as f64 / (times[gen - 1] - times[0]).as_secs_f64())
}

struct Streamed {
    /// From sending the request to the first chunk with text (or the last chunk, if no text).
    ttft: Duration,
    /// (tokens - 1) / (last chunk - first text chunk)
    rate: f64,
    usage: Value,
    text: String,
}

/// One streaming request; times its chunks.
async fn stream(http: &reqwest::Client, url: &str, body: Value) -> anyhow::Result<Streamed> {
    let t0 = Instant::now();
    let mut r = http.post(url).json(&body).send().await?;
    anyhow::ensure!(r.status() == 200, "{}: {}", r.status(), r.text().await?);
    let (mut first, mut last, mut usage, mut text, mut buf) = (None, None, Value::Null, String::new(), String::new());
    while let Some(chunk) = r.chunk().await? {
        buf.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            let choice = &v["choices"][0];
            let piece = choice["text"].as_str().or(choice["delta"]["content"].as_str()).unwrap_or("");
            if !piece.is_empty() {
                first.get_or_insert_with(Instant::now);
                text.push_str(piece);
            }
            if !choice["finish_reason"].is_null() {
                last = Some(Instant::now());
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
    }
    // A random-weight model may make tokens without text: the first token then shows as the
    // end of a one-token answer.
    let last = last.unwrap_or_else(Instant::now);
    let first = first.unwrap_or(last);
    let n = usage["completion_tokens"].as_u64().unwrap_or(0) as f64;
    Ok(Streamed { ttft: first - t0, rate: (n - 1.0) / (last - first).as_secs_f64(), usage, text })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!args.is_empty(), "usage: serve_bench MODEL_DIR [--runs N] [--gen N] [--answer N] [--system-words N] [--skip-decode] [ENGINE ARGS]");
    let dir = PathBuf::from(&args[0]);
    let (mut runs, mut gen, mut answer, mut system_words, mut skip_decode, mut engine) = (5, 256, 32, 0, false, vec![]);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut num =
            || -> anyhow::Result<usize> { Ok(it.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?.parse()?) };
        match a.as_str() {
            "--runs" => runs = num()?,
            "--gen" => gen = num()?,
            "--answer" => answer = num()?,
            "--system-words" => system_words = num()?,
            "--skip-decode" => skip_decode = true,
            _ => engine.push(a.clone()),
        }
    }
    let sage = sage_bin()?;
    let mut server = Command::new(&sage)
        .arg("serve")
        .arg(&dir)
        .args(["--port", "0"])
        .args(&engine)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line)?;
    let v1 = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or("").to_string();
    anyhow::ensure!(!v1.is_empty(), "sage serve printed no address: {line:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let http = reqwest::Client::new();
    let result = (|| -> anyhow::Result<()> {
        println!("model {}, engine args {engine:?}, {runs} runs alternating", dir.display());
        if !skip_decode {
            let (mut run, mut srv) = (vec![], vec![]);
            for i in 0..runs {
                let r = run_rate(&sage, &dir, gen, &engine)?;
                let body = json!({"prompt": PROMPT, "temperature": 0, "max_tokens": gen, "stream": true});
                let s = rt.block_on(stream(&http, &format!("{v1}/completions"), body))?;
                anyhow::ensure!(
                    s.usage["completion_tokens"] == gen,
                    "server made {} tokens",
                    s.usage["completion_tokens"]
                );
                println!("  run {i}: sage run {r:.1} tok/s, server {:.1} tok/s", s.rate);
                run.push(r);
                srv.push(s.rate);
            }
            // Each server run against the sage run just before it: pairs close in time cancel
            // the machine's drift.
            let paired = median(run.iter().zip(&srv).map(|(r, s)| s / r).collect());
            let (r, s) = (median(run), median(srv));
            println!(
                "decode, {gen} tokens: sage run {r:.1} tok/s, server {s:.1} tok/s (medians), server/run {:.3}; median of paired ratios {paired:.3}",
                s / r
            );
            println!(
                "{}",
                json!({"bench": "decode", "gen": gen, "run_tok_s": r, "server_tok_s": s, "ratio": s / r, "paired_ratio": paired})
            );
        }
        // A conversation: an optional long system message, a question, its answer, a follow-up.
        let system: String = (0..system_words)
            .map(|i| ["In", "the", "beginning", "God", "created", "heaven"][i % 6])
            .collect::<Vec<_>>()
            .join(" ");
        let mut messages = vec![];
        if system_words > 0 {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": PROMPT}));
        let chat = format!("{v1}/chat/completions");
        let body = |m: &Vec<Value>, n: usize| json!({"messages": m, "temperature": 0, "max_tokens": n, "stream": true, "stream_options": {"include_usage": true}});
        let first = rt.block_on(stream(&http, &chat, body(&messages, answer)))?;
        let mut follow = messages.clone();
        follow.push(json!({"role": "assistant", "content": first.text}));
        follow.push(json!({"role": "user", "content": "And Moses answered,"}));
        let (mut warm, mut fresh) = (vec![], vec![]);
        for i in 0..runs {
            // Warm: the cache holds the first turn and its answer.
            rt.block_on(stream(&http, &chat, body(&messages, answer)))?;
            let w = rt.block_on(stream(&http, &chat, body(&follow, 1)))?;
            // Fresh: another prompt first (its first token differs), then the whole conversation.
            rt.block_on(stream(
                &http,
                &format!("{v1}/completions"),
                json!({"prompt": "Zebra", "max_tokens": 1, "stream": true}),
            ))?;
            let f = rt.block_on(stream(&http, &chat, body(&follow, 1)))?;
            anyhow::ensure!(f.usage["prompt_tokens_details"]["cached_tokens"] == 0, "fresh found a cache: {}", f.usage);
            println!(
                "  run {i}: follow-up TTFT {:.3} s ({} of {} prompt tokens cached), fresh {:.3} s",
                w.ttft.as_secs_f64(),
                w.usage["prompt_tokens_details"]["cached_tokens"],
                w.usage["prompt_tokens"],
                f.ttft.as_secs_f64()
            );
            warm.push((w.ttft.as_secs_f64(), w.usage.clone()));
            fresh.push(f.ttft.as_secs_f64());
        }
        let w = median(warm.iter().map(|x| x.0).collect());
        let f = median(fresh);
        let u = &warm[0].1;
        println!(
            "follow-up turn: {} prompt tokens, {} cached; time to first token {w:.3} s vs {f:.3} s fresh (medians): {:.1}x faster",
            u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], f / w
        );
        println!(
            "{}",
            json!({"bench": "follow_up_ttft", "prompt_tokens": u["prompt_tokens"], "cached_tokens": u["prompt_tokens_details"]["cached_tokens"], "warm_s": w, "fresh_s": f, "speedup": f / w})
        );
        Ok(())
    })();
    let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    let _ = server.wait();
    result
}
