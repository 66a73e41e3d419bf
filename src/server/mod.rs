//! `sage serve`: the OpenAI API over HTTP (axum on tokio). Requests are parsed, checked, turned
//! into tokens by the model's chat template and tokenizer on the HTTP side; the engine runs on
//! its own thread (`worker`) and serves one sequence at a time, in arrival order, keeping the
//! last conversation in its KV cache so a follow-up evaluates only its new tokens.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming as
//! server-sent events), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`
//! (Prometheus text). Errors are OpenAI's JSON error object with its HTTP status.

pub mod api;
mod metrics;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::chat::ChatTemplate;
use crate::engine::{Engine, GenOptions, Generation};
use crate::error::Error;
use crate::tokenizer::Tokenizer;
use api::{finish_reason, ApiError, Checked, Usage};
use worker::{Event, Job, Shared};

/// How `sage serve` listens and what it allows.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (printed when ready).
    pub port: u16,
    /// Requests to /v1/* and /metrics need `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The name /v1/models lists (default: the model directory's name).
    pub model_name: String,
    pub chat_template: Option<PathBuf>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Requests waiting for the engine beyond this are refused (503).
    pub max_queue: usize,
    /// Sampling for requests that do not say.
    pub defaults: api::Defaults,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_name: "sage".into(),
            chat_template: None,
            max_body: 4 << 20,
            max_queue: 64,
            defaults: api::Defaults::default(),
        }
    }
}

struct App {
    opts: ServeOptions,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    jobs: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    n_ctx: usize,
    n_vocab: u64,
    started: u64,
    next_id: AtomicU64,
    static_metrics: metrics::Static,
    http: metrics::Http,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// What the engine thread reports once the model is loaded.
struct Loaded {
    template: ChatTemplate,
    static_metrics: metrics::Static,
    n_ctx: usize,
    n_vocab: u64,
}

/// Load the engine with `load` on its own thread and serve it until SIGINT or SIGTERM. `ready`
/// gets the bound address once the server accepts connections.
pub fn serve(
    load: impl FnOnce() -> anyhow::Result<Engine> + Send,
    tokenizer: Tokenizer,
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr) + Send,
) -> anyhow::Result<()> {
    let tokenizer = Arc::new(tokenizer);
    let shared = Arc::new(Shared::new());
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // The engine holds ggml's objects, which stay on the thread that made them.
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<anyhow::Result<Loaded>>();
        let (worker_shared, worker_tok, template_file) =
            (shared.clone(), tokenizer.clone(), opts.chat_template.clone());
        let engine_thread = std::thread::Builder::new()
            .name("sage-engine".into())
            .spawn_scoped(scope, move || {
                let prepared = load().and_then(|engine| {
                    let md = engine.model_dir();
                    let template =
                        ChatTemplate::for_model(&md.base, md.config.arch(), &worker_tok, template_file.as_deref())?;
                    let loaded = Loaded {
                        template,
                        static_metrics: metrics::Static::of(&engine),
                        n_ctx: engine.n_ctx(),
                        n_vocab: engine.config.n_vocab,
                    };
                    Ok((engine, loaded))
                });
                match prepared {
                    Ok((engine, loaded)) => {
                        let _ = loaded_tx.send(Ok(loaded));
                        worker::run(engine, worker_tok, rx, worker_shared);
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Usage(format!("starting the engine thread: {e}")))?;
        let loaded = match loaded_rx.recv() {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(e),
            Err(_) => anyhow::bail!("the engine thread stopped while loading"),
        };
        log::info!("chat prompts from {}", loaded.template.origin);
        let app = Arc::new(App {
            opts: opts.clone(),
            tokenizer,
            template: loaded.template,
            jobs: std::sync::Mutex::new(Some(tx)),
            shared: shared.clone(),
            n_ctx: loaded.n_ctx,
            n_vocab: loaded.n_vocab,
            started: now_secs(),
            next_id: AtomicU64::new(1),
            static_metrics: loaded.static_metrics,
            http: metrics::Http::default(),
        });
        let served = serve_http(app.clone(), &opts, ready);
        // No more jobs: the engine thread ends once it has answered what it holds.
        app.shared.shutdown.store(true, Ordering::SeqCst);
        app.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(app);
        let _ = engine_thread.join();
        served
    })
}

fn serve_http(app: Arc<App>, opts: &ServeOptions, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Usage(format!("starting the HTTP runtime: {e}")))?;
    rt.block_on(async {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr().map_err(|e| Error::Usage(format!("listening on {addr}: {e}")))?;
        ready(bound);
        let shutdown_app = app.clone();
        // Each streamed token is its own small write: without TCP_NODELAY, Nagle's algorithm
        // holds one back until the client's (delayed) ACK of the one before, 40 ms here.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                log::warn!("TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                log::warn!("shutting down: finishing the current token");
                shutdown_app.shared.shutdown.store(true, Ordering::SeqCst);
            })
            .await
            .map_err(|e| Error::Usage(format!("serving on {bound}: {e}")))?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), count_responses))
        .with_state(app)
}

async fn count_responses(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    app.http.count(resp.status().as_u16());
    resp
}

/// `Authorization: Bearer KEY`, compared in constant time.
async fn authorize(State(app): State<Arc<App>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &app.opts.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        use subtle::ConstantTimeEq;
        // Lengths differ → not equal; ct_eq of unequal lengths is false without a timing hint
        // about where they differ.
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            let mut e =
                ApiError::status(401, "invalid_request_error", "missing or wrong API key (Authorization: Bearer KEY)");
            e.code = Some("invalid_api_key");
            return e.into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::status(404, "invalid_request_error", format!("no such endpoint: {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::status(405, "invalid_request_error", format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shared.shutdown.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

fn model_object(app: &App) -> Value {
    json!({"id": app.opts.model_name, "object": "model", "created": app.started, "owned_by": "sage",
           "meta": {"n_ctx": app.n_ctx, "n_vocab": app.n_vocab, "max_concurrent_sequences": 1}})
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&app)]}))
}

async fn model(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    if id != app.opts.model_name {
        let mut e = ApiError::status(404, "invalid_request_error", format!("the model {id:?} does not exist"));
        e.code = Some("model_not_found");
        return e.into_response();
    }
    Json(model_object(&app)).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = metrics::render(&app.static_metrics, &app.shared, &app.http);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The body, refused when it is larger than allowed. An oversized body is still read (and
/// dropped, up to `DRAIN_LIMIT`) so the client, still sending, gets the 413 rather than a reset
/// connection.
async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> std::result::Result<Bytes, ApiError> {
    const DRAIN_LIMIT: usize = 256 << 20;
    let too_large = || {
        ApiError::status(
            413,
            "invalid_request_error",
            format!("the request body is larger than {} bytes", app.opts.max_body),
        )
    };
    // Any Content-Type: the body must be JSON (curl -d sends form-urlencoded, as llama-server
    // users know).
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut kept = Vec::with_capacity(declared.unwrap_or(0).min(app.opts.max_body as u64) as usize);
    let (mut seen, mut over) = (0usize, false);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = tokio_stream::StreamExt::next(&mut chunks).await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > app.opts.max_body {
            over = true;
            kept = Vec::new();
            if seen > DRAIN_LIMIT {
                break;
            }
        } else {
            kept.extend_from_slice(&chunk);
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(Bytes::from(kept))
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(&self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn id(&self, n: u64) -> String {
        let prefix = match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        format!("{prefix}-sage{:x}{n:06}", now_secs())
    }
}

/// Parsing, rendering and tokenizing off the HTTP thread: a large prompt takes a while, and
/// other connections (a streaming answer among them) go on meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, ApiError> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::status(500, "server_error", format!("preparing the request: {e}"))))
}

/// Read the body, prepare the request off the async workers with `prepare` (parse, check,
/// render, tokenize: the request's sampling and prompt ids), then answer it as `kind`.
async fn handle(
    app: Arc<App>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
    prepare: impl FnOnce(&App, &[u8]) -> std::result::Result<(api::Checked, Vec<u32>), ApiError> + Send + 'static,
) -> Response {
    let bytes = match read_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let prep_app = app.clone();
    match blocking(move || prepare(&prep_app, &bytes)).await {
        Ok((checked, ids)) => complete(app, kind, checked, ids).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, headers, body, Kind::Chat, |app, bytes| {
        let req: api::ChatRequest = api::parse(bytes)?;
        let checked = req.common.check(&app.opts.defaults)?;
        let messages = req.conversation()?;
        let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
        let text = app
            .template
            .render_with(&messages, true, &kwargs)
            .map_err(|e| ApiError::param("messages", e.to_string()))?;
        let ids = app
            .tokenizer
            .encode_with(&text, false)
            .map_err(|e| ApiError::status(500, "server_error", format!("tokenizing the prompt: {e}")))?;
        Ok((checked, ids))
    })
    .await
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, headers, body, Kind::Text, |app, bytes| {
        let req: api::CompletionRequest = api::parse(bytes)?;
        let checked = req.common.check(&app.opts.defaults)?;
        req.check_extras()?;
        let encode = |t: &str| {
            app.tokenizer
                .encode(t)
                .map_err(|e| ApiError::status(500, "server_error", format!("tokenizing the prompt: {e}")))
        };
        let tokens = |v: &[i64]| -> std::result::Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|&t| {
                    u32::try_from(t).ok().filter(|&t| u64::from(t) < app.n_vocab).ok_or_else(|| {
                        ApiError::param(
                            "prompt",
                            format!("token id {t} is outside the vocabulary (0..{})", app.n_vocab),
                        )
                    })
                })
                .collect()
        };
        let one = || ApiError::param("prompt", "sage completes one prompt per request: give a string or one list");
        let ids = match &req.prompt {
            api::Prompt::Text(t) => encode(t)?,
            api::Prompt::Texts(v) if v.len() == 1 => encode(&v[0])?,
            api::Prompt::Tokens(v) => tokens(v)?,
            api::Prompt::TokenLists(v) if v.len() == 1 => tokens(&v[0])?,
            _ => return Err(one()),
        };
        Ok((checked, ids))
    })
    .await
}

fn context_error(app: &App, prompt: usize, asked: Option<usize>) -> Option<ApiError> {
    if prompt == 0 {
        return Some(ApiError::param("prompt", "the prompt is empty"));
    }
    if prompt >= app.n_ctx {
        return Some(
            ApiError::param(
                "messages",
                format!(
                    "the prompt is {prompt} tokens, but the context holds {} (sage serve --ctx): no room for an answer",
                    app.n_ctx
                ),
            )
            .with_code("context_length_exceeded"),
        );
    }
    match asked {
        Some(m) if m > app.n_ctx - prompt => Some(
            ApiError::param(
                "max_tokens",
                format!(
                    "max_tokens is {m}, but the context of {} tokens has room for {} after the prompt's {prompt}",
                    app.n_ctx,
                    app.n_ctx - prompt
                ),
            )
            .with_code("context_length_exceeded"),
        ),
        _ => None,
    }
}

/// Queue the generation and answer: one JSON object, or a stream of chunks.
async fn complete(app: Arc<App>, kind: Kind, checked: Checked, ids: Vec<u32>) -> Response {
    if let Some(e) = context_error(&app, ids.len(), checked.max_tokens) {
        return e.into_response();
    }
    if app.shared.shutdown.load(Ordering::SeqCst) {
        return ApiError::status(503, "server_error", "the server is shutting down").into_response();
    }
    let max_tokens = checked.max_tokens.unwrap_or(app.n_ctx - ids.len());
    let gen =
        GenOptions { max_tokens, stop_ids: app.tokenizer.eog.clone(), stop: checked.stop.clone(), reuse_prefix: true };
    let (events_tx, events) = mpsc::unbounded_channel();
    let job = Job { prompt: ids, gen, sampler: checked.sampler.clone(), events: events_tx };
    if app.shared.queued.fetch_add(1, Ordering::SeqCst) >= app.opts.max_queue {
        app.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return ApiError::status(
            503,
            "server_error",
            format!(
                "{} requests are waiting for the engine (one sequence at a time): try again later",
                app.opts.max_queue
            ),
        )
        .into_response();
    }
    let sent = app.jobs.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|tx| tx.send(job).is_ok());
    if sent != Some(true) {
        app.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return ApiError::status(503, "server_error", "the server is shutting down").into_response();
    }
    let id = kind.id(app.next_id.fetch_add(1, Ordering::Relaxed));
    if checked.stream {
        stream(app, kind, id, checked.include_usage, events).into_response()
    } else {
        whole(app, kind, id, events).await
    }
}

fn usage_of(g: &Generation) -> Usage {
    Usage::new(g.prompt_tokens, g.cached_tokens, g.tokens.len())
}

/// llama-server's `timings`, measured by the engine: prompt tokens evaluated (those found in
/// the cache apart) and generated, with their times and rates.
fn timings_of(g: &Generation) -> Value {
    let (pms, gms) = (g.prompt_time.as_secs_f64() * 1e3, g.gen_time.as_secs_f64() * 1e3);
    json!({"cache_n": g.cached_tokens, "prompt_n": g.prompt_tokens - g.cached_tokens, "prompt_ms": pms,
           "prompt_per_second": g.prompt_tok_per_s(), "predicted_n": g.tokens.len(), "predicted_ms": gms,
           "predicted_per_second": g.gen_tok_per_s()})
}

fn failure(event: Event) -> ApiError {
    match event {
        Event::Failed(m) => ApiError::status(500, "server_error", format!("generation failed: {m}")),
        _ => ApiError::status(503, "server_error", "the server is shutting down"),
    }
}

async fn whole(app: Arc<App>, kind: Kind, id: String, mut events: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(g)) => {
                let reason = finish_reason(g.stop);
                let choice = match kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": null, "finish_reason": reason}),
                    Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason}),
                };
                return Json(json!({
                    "id": id, "object": kind.object(false), "created": now_secs(), "model": app.opts.model_name,
                    "choices": [choice], "usage": usage_of(&g), "timings": timings_of(&g),
                    "system_fingerprint": system_fingerprint(),
                }))
                .into_response();
            }
            Some(other) => return failure(other).into_response(),
            None => return failure(Event::ShuttingDown).into_response(),
        }
    }
}

fn system_fingerprint() -> String {
    format!("sage-{}", env!("CARGO_PKG_VERSION"))
}

/// Server-sent events: a first chunk with the role, a chunk per piece of text (pieces made
/// while the previous chunk was being sent go together), a last chunk
/// with the finish reason (and the usage, which OpenAI sends in a chunk of its own when asked
/// by `stream_options.include_usage`), then `data: [DONE]`. The client leaving drops this
/// stream, which drops `events`, which stops the generation at its next token.
fn stream(
    app: Arc<App>,
    kind: Kind,
    id: String,
    include_usage: bool,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl tokio_stream::Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<std::result::Result<SseEvent, Infallible>>(16);
    let created = now_secs();
    let model = app.opts.model_name.clone();
    let chunk = move |delta: Value, reason: Option<&str>, usage: Option<Usage>, timings: Option<Value>| -> SseEvent {
        let choice = match kind {
            Kind::Chat => json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}),
            Kind::Text => json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                                 "logprobs": null, "finish_reason": reason}),
        };
        let mut v = json!({"id": id, "object": kind.object(true), "created": created, "model": model,
                           "system_fingerprint": system_fingerprint(), "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        if let Some(t) = timings {
            v["timings"] = t;
        }
        if reason.is_none() && usage.is_some() {
            v["choices"] = json!([]);
        }
        SseEvent::default().data(v.to_string())
    };
    tokio::spawn(async move {
        let send = |e: SseEvent| tx.send(Ok(e));
        if send(chunk(json!({"role": "assistant", "content": ""}), None, None, None)).await.is_err() {
            return;
        }
        let mut pending = None;
        loop {
            // The client leaving drops the response body, which closes `tx`: stop waiting for
            // tokens then, so `events` is dropped and the engine stops at its next token.
            let next = match pending.take() {
                Some(ev) => ev,
                None => tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => ev,
                        None => return,
                    },
                    _ = tx.closed() => return,
                },
            };
            match next {
                Event::Text(mut text) => {
                    // Text that arrived while the last chunk was being written goes out as one
                    // chunk: a slow client gets fewer, larger writes, not a growing backlog.
                    while let Ok(ev) = events.try_recv() {
                        match ev {
                            Event::Text(more) => text.push_str(&more),
                            other => {
                                pending = Some(other);
                                break;
                            }
                        }
                    }
                    if send(chunk(json!({"content": text}), None, None, None)).await.is_err() {
                        return;
                    }
                }
                Event::Done(g) => {
                    let usage = usage_of(&g);
                    let reason = finish_reason(g.stop);
                    let timings = Some(timings_of(&g));
                    if include_usage {
                        if send(chunk(json!({}), Some(reason), None, timings)).await.is_err() {
                            return;
                        }
                        let _ = send(chunk(json!({}), None, Some(usage), None)).await;
                    } else {
                        let _ = send(chunk(json!({}), Some(reason), Some(usage), timings)).await;
                    }
                    let _ = send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                other => {
                    let _ = send(SseEvent::default().data(failure(other).body().to_string())).await;
                    return;
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}
