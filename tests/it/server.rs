//! `sage serve` as clients see it: the real binary on a free loopback port, driven by an
//! independent OpenAI client library (async-openai) and by plain HTTP (reqwest, raw TCP) for
//! what a client library would not send. The reference for every answer is `sage run` on the
//! same model directory and rendered prompt.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::types::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs, CreateCompletionRequestArgs, FinishReason, Prompt,
};
use async_openai::Client;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::util::*;

const SAGE: &str = env!("CARGO_BIN_EXE_sage");
const SYSTEM: &str = "You speak as the King James Bible.";
const QUESTION: &str = "And God said unto Moses,";

/// The bundled model converted to f32 (f32 keeps the references tight).
fn bundled_model(dir: &Path) -> PathBuf {
    convert_into(&bundled(), dir, &opts(None)).0
}

/// A running `sage serve`, killed when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    base: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(SAGE)
            .arg("serve")
            .arg(model)
            .args(["--port", "0", "--threads", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("sage serve printed no address");
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{line}"));
        Server { child, base: url.trim_end_matches("/v1").to_string() }
    }

    fn v1(&self) -> String {
        format!("{}/v1", self.base)
    }

    fn openai(&self) -> Client<OpenAIConfig> {
        Client::with_config(OpenAIConfig::new().with_api_base(self.v1()).with_api_key("unused"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, from /proc.
    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// What `sage run` generates (token ids, text, prompt token count).
struct RunOut {
    ids: Vec<u64>,
    text: String,
    prompt_tokens: u64,
    stop: String,
}

fn sage_run(model: &Path, args: &[&str]) -> RunOut {
    let out = Command::new(SAGE)
        .arg("run")
        .arg(model)
        .args(["--temp", "0", "--json", "--threads", "2"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut r = RunOut { ids: vec![], text: String::new(), prompt_tokens: 0, stop: String::new() };
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(s) = v.get("stats") {
            r.prompt_tokens = s["prompt_tokens"].as_u64().unwrap();
            r.stop = s["stop"].as_str().unwrap().into();
        } else {
            r.ids.push(v["id"].as_u64().unwrap());
            r.text.push_str(v["text"].as_str().unwrap());
        }
    }
    r
}

fn chat_messages() -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessageArgs::default().content(SYSTEM).build().unwrap().into(),
        ChatCompletionRequestUserMessageArgs::default().content(QUESTION).build().unwrap().into(),
    ]
}

/// Prometheus text: every sample `name{labels} value` with a number, every name with HELP and
/// TYPE; returns the samples.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut samples = std::collections::BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let name = w.next().unwrap();
            assert!(matches!(w.next(), Some("counter" | "gauge")), "{line}");
            typed.insert(name.to_string());
        } else if line.starts_with("# HELP ") || line.is_empty() {
        } else {
            let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
            let base = name.split('{').next().unwrap();
            assert!(base.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
            assert!(typed.contains(base), "no TYPE for {line}");
            samples.insert(name.to_string(), v);
        }
    }
    samples
}

async fn metrics(http: &reqwest::Client, s: &Server) -> std::collections::BTreeMap<String, f64> {
    let r = http.get(format!("{}/metrics", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    parse_metrics(&r.text().await.unwrap())
}

#[test]
fn openai_clients_get_the_tokens_sage_run_gives() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let max = 24u32;
    let want =
        sage_run(&model, &["--chat", "--system", SYSTEM, "--prompt", QUESTION, "-n", "24", "--arena-experts", "16"]);
    assert_eq!(want.ids.len(), 24);
    let want_text = sage_run(&model, &["--prompt", QUESTION, "-n", "24", "--arena-experts", "16"]);
    let server = Server::start(&model, &["--arena-experts", "16"]);
    let client = server.openai();
    let http = reqwest::Client::new();
    runtime().block_on(async {
        // Non-streaming chat.
        let req = CreateChatCompletionRequestArgs::default()
            .model("anything")
            .messages(chat_messages())
            .temperature(0.0)
            .max_completion_tokens(max)
            .build()
            .unwrap();
        let r = client.chat().create(req).await.unwrap();
        assert_eq!(r.choices.len(), 1);
        assert_eq!(r.choices[0].message.content.as_deref(), Some(want.text.as_str()));
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens as u64, u.completion_tokens, u.total_tokens),
            (want.prompt_tokens, max, u.prompt_tokens + max)
        );
        assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, Some(0));
        let model_name = model.file_name().unwrap().to_str().unwrap();
        assert_eq!(r.model, model_name);

        // Streaming chat, the same conversation: all of it but its last token is in the cache.
        let req = CreateChatCompletionRequestArgs::default()
            .messages(chat_messages())
            .temperature(0.0)
            .max_tokens(max)
            .stream(true)
            .stream_options(ChatCompletionStreamOptions { include_usage: true })
            .build()
            .unwrap();
        let mut stream = client.chat().create_stream(req).await.unwrap();
        let (mut text, mut chunks, mut usage, mut finish) = (String::new(), 0, None, None);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            if let Some(u) = chunk.usage {
                assert!(chunk.choices.is_empty());
                usage = Some(u);
                continue;
            }
            let c = &chunk.choices[0];
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
            chunks += 1;
        }
        assert_eq!(text, want.text);
        assert_eq!(finish, Some(FinishReason::Length));
        // A role chunk, at most one chunk per token, a last chunk.
        assert!(chunks >= 3 && chunks <= max as usize + 2, "{chunks} chunks");
        let u = usage.expect("a usage chunk when include_usage");
        assert_eq!((u.prompt_tokens as u64, u.completion_tokens), (want.prompt_tokens, max));
        assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, Some(want.prompt_tokens as u32 - 1));

        // Text completions, as text and as token ids, streaming and not.
        let req = CreateCompletionRequestArgs::default()
            .model("m")
            .prompt(QUESTION)
            .temperature(0.0)
            .max_tokens(max)
            .build()
            .unwrap();
        let r = client.completions().create(req).await.unwrap();
        assert_eq!(r.choices[0].text, want_text.text);
        let u = r.usage.unwrap();
        assert_eq!((u.prompt_tokens as u64, u.completion_tokens), (want_text.prompt_tokens, max));
        let body = json!({"prompt": QUESTION, "temperature": 0, "max_tokens": max, "stream": true});
        let sse = http.post(format!("{}/completions", server.v1())).json(&body).send().await.unwrap();
        assert_eq!(sse.status(), 200);
        assert!(sse.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let sse = sse.text().await.unwrap();
        let data: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let streamed: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(streamed, want_text.text);

        // A stop string ends the text before it, streamed or not (finish_reason "stop").
        let t = &want_text.text;
        let cut = (t.len() / 2..t.len()).find(|&i| t.is_char_boundary(i)).unwrap();
        let stop: String = t[cut..].chars().take(3).collect();
        let before = &t[..t.find(&stop).unwrap()];
        for stream in [false, true] {
            let body =
                json!({"prompt": QUESTION, "temperature": 0, "max_tokens": max, "stop": [stop], "stream": stream});
            let r = http.post(format!("{}/completions", server.v1())).json(&body).send().await.unwrap();
            let (text, reason) = if stream {
                let sse = r.text().await.unwrap();
                let chunks: Vec<Value> = sse
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter(|d| *d != "[DONE]")
                    .map(|d| serde_json::from_str(d).unwrap())
                    .collect();
                let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
                (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
            } else {
                let v: Value = r.json().await.unwrap();
                (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].clone())
            };
            assert_eq!((text.as_str(), reason), (before, json!("stop")), "stop {stop:?}, stream {stream}");
        }

        // /v1/models lists the model; /v1/models/{id} finds it.
        let models = client.models().list().await.unwrap();
        assert_eq!(models.data.len(), 1);
        assert_eq!(models.data[0].id, model_name);
        assert_eq!(client.models().retrieve(model_name).await.unwrap().id, model_name);
        let missing = http.get(format!("{}/models/nope", server.v1())).send().await.unwrap();
        assert_eq!(missing.status(), 404);

        // /metrics parses and counts what was served.
        let m = metrics(&http, &server).await;
        assert_eq!(m["sage_requests_total"], 6.0);
        assert!(m["sage_completion_tokens_total"] > 4.0 * max as f64);
        assert_eq!(m["sage_prompt_tokens_total"], (2 * want.prompt_tokens + 4 * want_text.prompt_tokens) as f64);
        assert_eq!(m["sage_queue_length"], 0.0);
        assert_eq!(m["sage_max_concurrent_sequences"], 1.0);
        assert!(m["sage_expert_misses_total"] > 0.0 && m["sage_expert_bytes_read_total"] > 0.0);
        assert!(m["sage_tokens_per_second"] > 0.0);
        assert!(m["sage_arena_bytes"] > 0.0 && m["sage_arena_slots"] == 16.0);
        let health: Value = http.get(format!("{}/health", server.base)).send().await.unwrap().json().await.unwrap();
        assert_eq!(health["status"], "ok");
    });
}

#[test]
fn a_follow_up_turn_reuses_the_conversation_and_only_its_new_tokens_are_evaluated() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let server = Server::start(&model, &[]);
    let http = reqwest::Client::new();
    runtime().block_on(async {
        let url = format!("{}/chat/completions", server.v1());
        let ask = |messages: Value| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http
                    .post(url)
                    .json(&json!({"messages": messages, "temperature": 0, "max_tokens": 12}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()
            }
        };
        let first = json!([{"role": "user", "content": QUESTION}]);
        let r1 = ask(first.clone()).await;
        let answer = r1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let p1 = r1["usage"]["prompt_tokens"].as_u64().unwrap();
        let before = metrics(&http, &server).await["sage_tokens_evaluated_total"];
        let second = json!([
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And Moses answered,"}
        ]);
        let r2 = ask(second).await;
        let u = &r2["usage"];
        let (p2, cached) =
            (u["prompt_tokens"].as_u64().unwrap(), u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
        // The first turn's prompt and its answer but the last token (sampled, never evaluated),
        // provided the answer tokenizes back to the tokens generated.
        assert_eq!(cached, p1 + 11, "{r2}");
        // llama-server's timings say the same.
        let t = &r2["timings"];
        assert_eq!(
            (t["cache_n"].as_u64(), t["prompt_n"].as_u64(), t["predicted_n"].as_u64()),
            (Some(cached), Some(p2 - cached), Some(12))
        );
        assert!(t["predicted_per_second"].as_f64().unwrap() > 0.0);
        let after = metrics(&http, &server).await["sage_tokens_evaluated_total"];
        assert_eq!(after - before, (p2 - cached + 11) as f64, "evaluated: the new prompt tokens and 11 answer tokens");
    });
}

#[test]
fn eight_concurrent_clients_each_get_a_complete_correct_answer() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    // Different first words: no request finds another's prefix in the cache, so each answer is
    // the one `sage run` gives from an empty cache.
    let prompts = [
        "And God said",
        "In the beginning",
        "The LORD is my",
        "Blessed are the",
        "A hacker is",
        "Python's list type",
        "Thou shalt not",
        "Jesus wept, and",
    ];
    let want: Vec<String> = prompts.iter().map(|p| sage_run(&model, &["--prompt", p, "-n", "16"]).text).collect();
    let server = Server::start(&model, &[]);
    let client = server.openai();
    runtime().block_on(async {
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let client = client.clone();
                let req = CreateCompletionRequestArgs::default()
                    .model("m")
                    .prompt(Prompt::String(p.to_string()))
                    .temperature(0.0)
                    .max_tokens(16u32)
                    .build()
                    .unwrap();
                tokio::spawn(async move { client.completions().create(req).await })
            })
            .collect();
        for ((t, p), w) in tasks.into_iter().zip(prompts).zip(&want) {
            let r = t.await.unwrap().unwrap();
            assert_eq!(&r.choices[0].text, w, "{p}");
            assert_eq!(r.usage.unwrap().completion_tokens, 16, "{p}");
        }
    });
}

#[test]
fn a_client_that_disconnects_stops_its_generation_and_frees_the_engine() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let server = Server::start(&model, &[]);
    let http = reqwest::Client::new();
    let rt = runtime();
    let received = rt.block_on(async {
        let body = json!({"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                          "max_tokens": 4000, "stream": true});
        let mut r = http.post(format!("{}/chat/completions", server.v1())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut sse = String::new();
        while sse.matches("\"content\"").count() < 6 {
            sse.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
        }
        // Dropping the response closes the connection.
        let text: String = sse
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .map(|v| v["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
            .collect();
        // Tokens received, counted by tokenizing the text again (greedy text of this model
        // tokenizes back to itself, give or take a merge).
        sage::tokenizer::Tokenizer::load(&model).unwrap().encode_with(&text, false).unwrap().len() as f64
    });
    drop(http);
    let http = reqwest::Client::new();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let m = loop {
            let m = metrics(&http, &server).await;
            if m["sage_requests_total"] == 1.0 {
                break m;
            }
            assert!(Instant::now() < deadline, "the generation did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(m["sage_requests_cancelled_total"], 1.0);
        let made = m["sage_completion_tokens_total"];
        println!("disconnect: client read {received} tokens, the engine made {made}");
        // The engine checks the request before every token: it stops at the first one after the
        // HTTP side lets go of the stream. The bound leaves room for what was in flight: text
        // held for the next chunk (up to 4 ms of tokens, about 12 for this model on 2 cores),
        // chunks in the socket the client never read, the time to notice the closed
        // connection (measured: 8 to 11 tokens beyond what the client read).
        assert!(made - received <= 32.0, "{made} tokens made, {received} read");
        // The engine serves the next request.
        let r = http
            .post(format!("{}/completions", server.v1()))
            .json(&json!({"prompt": "And", "max_tokens": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["usage"]["completion_tokens"], 3);
    });
}

/// Send raw bytes on a fresh connection; the status of the reply, if any.
fn raw(base: &str, bytes: &[u8]) -> Option<u16> {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    reply.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok())
}

#[test]
fn hostile_requests_get_clear_4xx_errors_and_the_server_keeps_serving_with_flat_memory() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let server = Server::start(&model, &["--ctx", "256", "--max-body", "64KiB"]);
    let http = reqwest::Client::new();
    let chat = format!("{}/chat/completions", server.v1());
    let completions = format!("{}/completions", server.v1());
    let long_prompt = "Moses ".repeat(600);
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let embeddings = format!("{}/embeddings", server.v1());
    let models = format!("{}/models", server.v1());
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", &chat, b"{\"messages\": [".to_vec(), 400, "malformed JSON"),
        ("POST", &chat, b"{\"messages\": \"hi\"}".to_vec(), 400, "messages"),
        ("POST", &chat, br#"{"messages": [{"role": 1, "content": "x"}]}"#.to_vec(), 400, "messages[0].role"),
        ("POST", &chat, br#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#.to_vec(), 400, "n = 2"),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#.to_vec(),
            400,
            "temperature",
        ),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}"#.to_vec(),
            400,
            "context",
        ),
        (
            "POST",
            &chat,
            json!({"messages": [{"role": "user", "content": long_prompt}]}).to_string().into_bytes(),
            400,
            "context holds 256",
        ),
        ("POST", &chat, vec![b'x'; 100 << 10], 413, "larger than"),
        ("POST", &chat, br#"{"messages": []}"#.to_vec(), 400, "messages is empty"),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#.to_vec(),
            400,
            "image_url",
        ),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "stop": ["", "a"]}"#.to_vec(),
            400,
            "stop",
        ),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#.to_vec(),
            400,
            "stream",
        ),
        (
            "POST",
            &chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "top_p": 1e400}"#.to_vec(),
            400,
            "malformed JSON",
        ),
        ("POST", &chat, b"\xff\xfe{\"messages\"}".to_vec(), 400, "malformed JSON"),
        ("POST", &chat, b"null".to_vec(), 400, "invalid"),
        ("POST", &chat, b"".to_vec(), 400, "no body"),
        ("POST", &chat, nested.into_bytes(), 400, "recursion"),
        ("POST", &completions, br#"{"prompt": [99999999]}"#.to_vec(), 400, "outside the vocabulary"),
        ("POST", &completions, br#"{"prompt": [-1]}"#.to_vec(), 400, "outside the vocabulary"),
        ("POST", &completions, br#"{"prompt": ["a", "b"]}"#.to_vec(), 400, "one prompt"),
        ("POST", &completions, br#"{"prompt": []}"#.to_vec(), 400, "empty"),
        ("POST", &completions, br#"{"prompt": "x", "echo": true}"#.to_vec(), 400, "echo"),
        ("POST", &embeddings, b"{}".to_vec(), 404, "no such endpoint"),
        ("GET", &chat, vec![], 405, "not allowed"),
        ("DELETE", &models, vec![], 405, "not allowed"),
    ];
    let rt = runtime();
    let valid = || {
        rt.block_on(async {
            let r = http
                .post(&completions)
                .json(&json!({"prompt": QUESTION, "temperature": 0, "max_tokens": 8}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
        })
    };
    let answer = valid();
    let rss_start = server.rss_kib();
    let mut rss_before = 0;
    let mut sent = 0;
    for round in 0.. {
        if round == 1 {
            // After one round: the HTTP side's buffers and the allocator's arenas in use.
            rss_before = server.rss_kib();
        }
        for (method, url, body, status, says) in &cases {
            let got = rt.block_on(async {
                let r = http
                    .request(method.parse().unwrap(), *url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {url} ({} bytes): {e}", body.len()));
                let s = r.status().as_u16();
                (s, r.json::<Value>().await.unwrap())
            });
            assert_eq!(
                got.0,
                *status,
                "{method} {url} {}: {}",
                String::from_utf8_lossy(&body[..body.len().min(80)]),
                got.1
            );
            let msg = got.1["error"]["message"].as_str().unwrap_or_else(|| panic!("{}", got.1));
            assert!(msg.contains(says), "{msg:?} should say {says:?}");
            assert!(got.1["error"]["type"].is_string());
            sent += 1;
        }
        // Raw HTTP no client library would send.
        let broken: [&[u8]; 4] = [
            b"GARBAGE\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n{}",
            b"\x00\x01\x02\x03\xff",
        ];
        for b in broken {
            let status = raw(&server.base, b);
            assert!(status.is_none_or(|s| (400..500).contains(&s)), "{status:?} for {:?}", String::from_utf8_lossy(b));
            sent += 1;
        }
        if round % 4 == 3 {
            assert_eq!(valid(), answer, "a valid request after {sent} hostile ones");
        }
        if sent >= 500 {
            break;
        }
    }
    assert_eq!(valid(), answer);
    let rss_after = server.rss_kib();
    println!(
        "hostile: {sent} requests; server RSS {rss_start} KiB at the start, {rss_before} KiB after the first {} requests, {rss_after} KiB after all",
        cases.len() + 4
    );
    assert!(rss_after < rss_before + 8 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    let m = rt.block_on(metrics(&http, &server));
    assert!(m["sage_http_responses_total{class=\"4xx\"}"] >= (sent - 4 * (sent / 30)) as f64);
    assert_eq!(m["sage_http_responses_total{class=\"5xx\"}"], 0.0);
}

#[test]
fn an_api_key_is_required_when_set_and_compared_whole() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let server = Server::start(&model, &["--api-key", "s3cret-key"]);
    let http = reqwest::Client::new();
    runtime().block_on(async {
        let body = json!({"prompt": "And", "max_tokens": 2});
        for auth in
            [None, Some("Bearer wrong"), Some("Bearer s3cret-ke"), Some("Bearer s3cret-key2"), Some("s3cret-key")]
        {
            let mut r = http.post(format!("{}/completions", server.v1())).json(&body);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 401, "{auth:?}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key");
        }
        let r = http.get(format!("{}/metrics", server.base)).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = http.get(format!("{}/health", server.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "/health needs no key");
        // The OpenAI client sends the key as a bearer token.
        let client = Client::with_config(OpenAIConfig::new().with_api_base(server.v1()).with_api_key("s3cret-key"));
        let req = CreateCompletionRequestArgs::default().model("m").prompt("And").max_tokens(2u32).build().unwrap();
        assert_eq!(client.completions().create(req).await.unwrap().usage.unwrap().completion_tokens, 2);
    });
}

#[test]
fn sigterm_finishes_the_current_token_and_exits_cleanly() {
    let dir = tmp();
    let model = bundled_model(dir.path());
    let mut server = Server::start(&model, &[]);
    let http = reqwest::Client::new();
    let rt = runtime();
    let mut r = rt.block_on(async {
        let body = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4000, "stream": true});
        let mut r = http.post(format!("{}/chat/completions", server.v1())).json(&body).send().await.unwrap();
        let first = r.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        r
    });
    let t0 = Instant::now();
    let status = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(status.success());
    // The stream ends (with the shutdown error as its last event) and the process exits 0.
    let rest = rt.block_on(async {
        let mut rest = String::new();
        while let Ok(Some(c)) = r.chunk().await {
            rest.push_str(&String::from_utf8_lossy(&c));
        }
        rest
    });
    assert!(rest.contains("shutting down"), "{}", &rest[rest.len().saturating_sub(300)..]);
    let code = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "sage serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{code:?}");
}
