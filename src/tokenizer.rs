//! The tokenizer in both of sage's forms: `tokenizer.json` (Hugging Face, read by the
//! tokenizers crate at run time) and GGUF `tokenizer.ggml.*` metadata (so llama.cpp can
//! tokenize a merged file). Either is built from the other: Hugging Face checkpoints bring a
//! `tokenizer.json`; llama.cpp GGUFs bring only the metadata.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, IoContext, Result};
use crate::ggml::{Gguf, GgufArray, GgufValue};
use crate::names::*;

/// Qwen2/Qwen3's pre-tokenizer split, as in their `tokenizer.json` (llama.cpp: pre = "qwen2").
pub const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TokenizerData {
    /// Contents of `tokenizer.json`.
    pub json: String,
    /// `tokenizer.*` GGUF metadata.
    pub gguf_kv: Vec<(String, GgufValue)>,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), reason: reason.into() }
}

/// Load a `tokenizer.json` with the tokenizers crate.
///
/// The crate panics on some damaged files instead of returning an error (tokenizers 0.23:
/// a syntax error inside the `decoder` object reaches an `expect`), so the text is first
/// checked to be JSON, and a panic that still escapes the crate is turned into an error
/// naming the file.
pub fn validate_json(json: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| tok_err(path, format!("not JSON: {e}")))?;
    match std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(tok_err(path, format!("the tokenizers crate cannot load it: {e}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(tok_err(path, format!("the tokenizers crate failed on it ({msg})")))
        }
    }
}

/// A special token named in tokenizer_config.json: a string or {"content": ...}.
fn token_field(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// Whether a tokenizer.json pre-tokenizer is Qwen2's (Split on QWEN2_SPLIT, then ByteLevel).
fn is_qwen2_pre(pre: &Value) -> bool {
    let s = pre.to_string();
    let pattern_ok = pre
        .get("pretokenizers")
        .and_then(|p| p.as_array())
        .map(|ps| {
            ps.iter().any(|p| {
                p.get("type").and_then(|t| t.as_str()) == Some("Split")
                    && p.get("pattern").and_then(|x| x.get("Regex")).and_then(|r| r.as_str()) == Some(QWEN2_SPLIT)
            })
        })
        .unwrap_or(false);
    pattern_ok && s.contains("ByteLevel")
}

impl TokenizerData {
    /// From `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` when present).
    pub fn from_hf_dir(dir: &Path, cfg: &ModelConfig) -> Result<TokenizerData> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path).at(&path)?;
        validate_json(&json, &path)?;
        let root: Value = serde_json::from_str(&json).map_err(|e| tok_err(&path, e.to_string()))?;
        let model = root.get("model").ok_or_else(|| tok_err(&path, "no 'model'"))?;
        if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
            return Err(tok_err(
                &path,
                format!("model type {} is not supported; expected \"BPE\"", model.get("type").unwrap_or(&Value::Null)),
            ));
        }
        if !root.get("pre_tokenizer").is_some_and(is_qwen2_pre) {
            return Err(tok_err(&path, "pre-tokenizer is not Qwen2's byte-level split; sage supports qwen2 only"));
        }
        let vocab = model.get("vocab").and_then(|v| v.as_object()).ok_or_else(|| tok_err(&path, "no 'model.vocab'"))?;
        let mut tokens: Vec<Option<(String, i32)>> = Vec::new();
        let mut put = |id: u64, s: &str, ty: i32| -> Result<()> {
            if id >= cfg.n_vocab {
                return Err(tok_err(
                    &path,
                    format!("token '{s}' has id {id}, but the model has {} embedding rows", cfg.n_vocab),
                ));
            }
            if tokens.len() <= id as usize {
                tokens.resize(id as usize + 1, None);
            }
            tokens[id as usize] = Some((s.to_string(), ty));
            Ok(())
        };
        for (s, id) in vocab {
            let id = id.as_u64().ok_or_else(|| tok_err(&path, format!("vocab id of '{s}' is not an integer")))?;
            put(id, s, TOKEN_NORMAL)?;
        }
        for t in root.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
            let id = t.get("id").and_then(|i| i.as_u64()).ok_or_else(|| tok_err(&path, "added token without id"))?;
            let s = t
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| tok_err(&path, "added token without content"))?;
            let special = t.get("special").and_then(|c| c.as_bool()).unwrap_or(false);
            put(id, s, if special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED })?;
        }
        // Rows of the embedding past the tokenizer are padding, as llama.cpp's converter writes.
        tokens.resize(cfg.n_vocab as usize, None);
        let (strs, types): (Vec<String>, Vec<i32>) = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED)))
            .unzip();
        let merges: Vec<String> = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| tok_err(&path, "no 'model.merges'"))?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(p) if p.len() == 2 => {
                    Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
                }
                other => Err(tok_err(&path, format!("merge {other} is neither \"a b\" nor [a, b]"))),
            })
            .collect::<Result<_>>()?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| tok_err(&tc_path, e.to_string()))?,
            Err(_) => Value::Null,
        };
        let id_of = |name: Option<String>| name.and_then(|n| strs.iter().position(|s| *s == n)).map(|i| i as u32);
        let mut kv = vec![
            (TOK_MODEL.to_string(), GgufValue::Str("gpt2".into())),
            (TOK_PRE.to_string(), GgufValue::Str("qwen2".into())),
            (
                TOK_ADD_BOS.to_string(),
                GgufValue::Bool(tc.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false)),
            ),
        ];
        if let Some(id) = id_of(token_field(tc.get("eos_token"))) {
            kv.push((TOK_EOS.into(), GgufValue::U32(id)));
        }
        if let Some(id) = id_of(token_field(tc.get("bos_token"))) {
            kv.push((TOK_BOS.into(), GgufValue::U32(id)));
        }
        if let Some(id) = id_of(token_field(tc.get("pad_token"))) {
            kv.push((TOK_PAD.into(), GgufValue::U32(id)));
        }
        let template = match tc.get("chat_template").and_then(|t| t.as_str()) {
            Some(t) => Some(t.to_string()),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        if let Some(t) = template {
            kv.push((TOK_CHAT_TEMPLATE.into(), GgufValue::Str(t)));
        }
        kv.push((TOK_TOKENS.into(), GgufValue::Array(GgufArray::Str(strs))));
        kv.push((TOK_TYPES.into(), GgufValue::Array(GgufArray::I32(types))));
        kv.push((TOK_MERGES.into(), GgufValue::Array(GgufArray::Str(merges))));
        Ok(TokenizerData { json, gguf_kv: kv })
    }

    /// From a GGUF's `tokenizer.ggml.*` metadata (byte-level BPE with the qwen2 pre-tokenizer).
    pub fn from_gguf(g: &Gguf, path: &Path) -> Result<TokenizerData> {
        let kv: Vec<(String, GgufValue)> = g
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("tokenizer."))
            .filter_map(|k| g.get(&k).map(|v| (k, v)))
            .collect();
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        match get(TOK_MODEL) {
            Some(GgufValue::Str(m)) if m == "gpt2" => {}
            other => {
                return Err(tok_err(path, format!("{TOK_MODEL} is {other:?}; sage supports \"gpt2\" (byte-level BPE)")))
            }
        }
        match get(TOK_PRE) {
            Some(GgufValue::Str(p)) if p == "qwen2" => {}
            other => return Err(tok_err(path, format!("{TOK_PRE} is {other:?}; sage supports \"qwen2\""))),
        }
        let Some(GgufValue::Array(GgufArray::Str(tokens))) = get(TOK_TOKENS) else {
            return Err(tok_err(path, format!("{TOK_TOKENS} is missing or not a string array")));
        };
        let types: Vec<i32> = match get(TOK_TYPES) {
            Some(GgufValue::Array(GgufArray::I32(t))) if t.len() == tokens.len() => t.clone(),
            None => vec![TOKEN_NORMAL; tokens.len()],
            Some(other) => {
                return Err(tok_err(
                    path,
                    format!("{TOK_TYPES} is not {} i32 values: {}", tokens.len(), other.type_name()),
                ))
            }
        };
        let merges: Vec<String> = match get(TOK_MERGES) {
            Some(GgufValue::Array(GgufArray::Str(m))) => m.clone(),
            _ => return Err(tok_err(path, format!("{TOK_MERGES} is missing or not a string array"))),
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, (s, &ty)) in tokens.iter().zip(&types).enumerate() {
            match ty {
                TOKEN_CONTROL | TOKEN_USER_DEFINED => added.push(json!({
                    "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == TOKEN_CONTROL,
                })),
                TOKEN_UNUSED => {}
                _ => {
                    vocab.insert(s.clone(), json!(id));
                }
            }
        }
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let root = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            // No normalizer: llama.cpp applies none, and this file must tokenize as it does.
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let json = serde_json::to_string_pretty(&root).expect("JSON of plain values");
        validate_json(&json, path)?;
        Ok(TokenizerData { json, gguf_kv: kv })
    }
}
