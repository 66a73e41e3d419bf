//! The OpenAI API's shapes as sage serves them: requests parsed with the path of a bad field,
//! checked (what sage does not do is refused, not ignored), responses, stream chunks, errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat::Message;
use crate::engine::sampler::SamplerParams;
use crate::engine::Finish;

/// An error as the OpenAI API sends it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: None, code: None }
    }

    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..ApiError::invalid(message) }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: text, or a list of parts of which sage reads the text ones.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ApiMessage {
    pub role: String,
    /// Null for an assistant message that only calls tools.
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// What chat and text completions share: sampling, length, stops, streaming.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// llama.cpp's and Ollama's extension.
    pub top_k: Option<u32>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// llama.cpp's extension.
    pub repeat_penalty: Option<f32>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Accepted and not used (an end-user id for abuse monitoring).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ApiMessage>,
    /// Read from the same object by `parse_request` (serde's flatten would lose the path of a
    /// bad field).
    #[serde(skip)]
    pub common: Common,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    /// llama.cpp's extension: more variables for the chat template (`enable_thinking`, …).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// `prompt` of a text completion: text or token ids, alone or as a one-element list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(skip)]
    pub common: Common,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

/// A request with the fields every completion shares.
pub trait Request: serde::de::DeserializeOwned {
    fn set_common(&mut self, c: Common);
}

impl Request for ChatRequest {
    fn set_common(&mut self, c: Common) {
        self.common = c;
    }
}

impl Request for CompletionRequest {
    fn set_common(&mut self, c: Common) {
        self.common = c;
    }
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid(format!("invalid request: {inner}"))
        } else {
            ApiError::param(&path, format!("invalid request: {path}: {inner}"))
        }
    })
}

/// Parse a request body: malformed JSON, a body that is not an object, and a field of the
/// wrong type are errors that say which (the field by its path, e.g. `messages[0].role`).
pub fn parse<T: Request>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("the request has no body: send a JSON object"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("invalid request: the body must be a JSON object"));
    }
    let mut req: T = from_value(&v)?;
    req.set_common(from_value(&v)?);
    Ok(req)
}

/// What a request asks of the engine, checked.
pub struct Checked {
    pub sampler: SamplerParams,
    /// Asked for, if at all (else the rest of the context).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn finite_in(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => {
            Err(ApiError::param(name, format!("{name} must be between {lo} and {hi}, got {x}")))
        }
        _ => Ok(v),
    }
}

/// The server's sampling where a request does not say, and its seed if it has one (else each
/// request without a seed samples differently, as OpenAI's do).
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub sampler: SamplerParams,
    pub seed: Option<u64>,
}

impl Common {
    pub fn check(&self, d: &Defaults) -> Result<Checked, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::param("n", format!("n = {n}: sage makes one choice per request (n = 1)")));
            }
        }
        if matches!(&self.logprobs, Some(v) if !v.is_null() && *v != Value::Bool(false)) || self.top_logprobs.is_some()
        {
            return Err(ApiError::param("logprobs", "logprobs are not supported"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::param("logit_bias", "logit_bias is not supported"));
        }
        let temp = finite_in("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(d.sampler.temp);
        let top_p = finite_in("top_p", self.top_p, 0.0, 1.0)?.unwrap_or(d.sampler.top_p);
        if top_p == 0.0 {
            return Err(ApiError::param("top_p", "top_p must be greater than 0"));
        }
        let presence = finite_in("presence_penalty", self.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
        let frequency = finite_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
        let repeat = finite_in("repeat_penalty", self.repeat_penalty, 0.0, 10.0)?.unwrap_or(d.sampler.repeat_penalty);
        if repeat == 0.0 {
            return Err(ApiError::param("repeat_penalty", "repeat_penalty must be greater than 0 (1 is off)"));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) | (None, Some(m)) if m == 0 => {
                return Err(ApiError::param("max_tokens", "max_tokens must be at least 1"));
            }
            (Some(m), _) | (None, Some(m)) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            (None, None) => None,
        };
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::param("stop", format!("at most 16 stop strings, got {}", stop.len())));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::param("stop", "a stop string is empty"));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::param("stream_options", "stream_options is only allowed with stream: true"));
        }
        let sampler = SamplerParams {
            temp,
            top_k: self.top_k.map(|k| k as usize).unwrap_or(d.sampler.top_k),
            top_p,
            repeat_penalty: repeat,
            presence_penalty: presence,
            frequency_penalty: frequency,
            seed: self.seed.map(|s| s as u64).or(d.seed).unwrap_or_else(fresh_seed),
            repeat_last_n: d.sampler.repeat_last_n,
        };
        Ok(Checked {
            sampler,
            max_tokens,
            stop,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

impl ChatRequest {
    /// The conversation for the chat template: text parts joined, OpenAI's `developer` role
    /// as `system` (what the templates know).
    pub fn conversation(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::param("messages", "messages is empty"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::param("tools", "tools (function calling) are not supported"));
        }
        if let Some(f) = &self.response_format {
            if f.kind != "text" {
                return Err(ApiError::param(
                    "response_format",
                    format!("response_format {:?} is not supported (only \"text\")", f.kind),
                ));
            }
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::param(
                                        &format!("messages[{i}].content"),
                                        format!("content of type {kind:?} is not supported (text only)"),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                if role.is_empty() {
                    return Err(ApiError::param(&format!("messages[{i}].role"), "role is empty"));
                }
                Ok(Message::new(role, &content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn check_extras(&self) -> Result<(), ApiError> {
        if self.echo {
            return Err(ApiError::param("echo", "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::param("suffix", "suffix (fill in the middle) is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::param("best_of", "best_of must be 1"));
        }
        Ok(())
    }
}

pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stop | Finish::Cancelled => "stop",
        Finish::MaxTokens | Finish::ContextFull => "length",
    }
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

impl Usage {
    pub fn new(prompt: usize, cached: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptDetails { cached_tokens: cached },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let e = parse::<ChatRequest>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert!(e.message.contains("messages[0]"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"messages": [}"#).unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = parse::<ChatRequest>(b"").unwrap_err();
        assert!(e.message.contains("no body"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"messages": []} trailing"#).unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = parse::<ChatRequest>(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"prompt": "x", "stop": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"), "{}", e.message);
        assert!(parse::<ChatRequest>(br#"{"model": "x"}"#).unwrap_err().message.contains("messages"));
    }

    #[test]
    fn what_sage_does_not_do_is_refused() {
        let req = |extra: &str| {
            parse::<ChatRequest>(format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#).as_bytes())
                .unwrap()
        };
        assert!(req("").common.check(&Defaults::default()).is_ok());
        for (extra, param) in [
            (r#", "n": 2"#, "n"),
            (r#", "temperature": 3"#, "temperature"),
            (r#", "top_p": 0"#, "top_p"),
            (r#", "max_tokens": 0"#, "max_tokens"),
            (r#", "stop": ["a", ""]"#, "stop"),
            (r#", "logprobs": true"#, "logprobs"),
            (r#", "stream_options": {"include_usage": true}"#, "stream_options"),
        ] {
            let e = req(extra).common.check(&Defaults::default()).err().unwrap_or_else(|| panic!("{extra} accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
        assert!(req(r#", "tools": [{"type": "function"}]"#).conversation().is_err());
        assert!(req(r#", "tools": []"#).conversation().is_ok());
        let parts = req("").messages[0].clone();
        assert!(matches!(parts.content, Some(Content::Text(_))));
        let r = parse::<ChatRequest>(
            br#"{"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.conversation().unwrap(), vec![Message::new("system", "ab")]);
    }
}
