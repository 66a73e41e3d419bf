//! The tokenizer in both of sage's forms: `tokenizer.json` (Hugging Face, read by the
//! tokenizers crate at run time) and GGUF `tokenizer.ggml.*` metadata (so llama.cpp can
//! tokenize a merged file). Either is built from the other: Hugging Face checkpoints bring a
//! `tokenizer.json`; llama.cpp GGUFs bring only the metadata.
//!
//! Three kinds, as llama.cpp tells them apart:
//!
//! - byte-level BPE with Qwen2's split (`gpt2` / pre `qwen2`: Qwen3, Qwen2-MoE);
//! - byte-level BPE with GPT-2's split (`gpt2` / a pre name with GPT-2's regex, each family
//!   its own: `olmo` for OLMoE);
//! - SentencePiece-style BPE over `▁`-joined text with byte fallback (`llama`: Mixtral). GGUF
//!   keeps no merges for it, only a score per token: llama.cpp merges the adjacent pair whose
//!   union scores highest. A tokenizer.json converted from a SentencePiece model lists its
//!   pieces in score order, so a piece's score here is minus its id; back from GGUF, the
//!   merges are every pair of pieces whose union is a piece, ranked by that piece's score.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, IoContext, Result};
use crate::ggml::{Gguf, GgufArray, GgufValue};
use crate::names::*;

/// Qwen2/Qwen3's pre-tokenizer split, as in their `tokenizer.json` (llama.cpp: pre = "qwen2").
pub const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's split, as in its `tokenizer.json`: Qwen2's with letters and marks together
/// (llama.cpp: pre = "qwen35").
pub const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// o200k's split (GPT-4o, gpt-oss's o200k_harmony), as in their `tokenizer.json` (llama.cpp:
/// pre = "gpt-4o").
pub const O200K_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The byte-level splits tokenizer.json spells as a `Split` regex, by llama.cpp's name.
const SPLITS: [(&str, &str); 3] = [("qwen2", QWEN2_SPLIT), ("qwen35", QWEN35_SPLIT), ("gpt-4o", O200K_SPLIT)];

/// llama.cpp's pre-tokenizer names whose split is GPT-2's (`ByteLevel` with its built-in
/// regex in tokenizer.json).
const GPT2_PRES: [&str; 3] = ["gpt-2", "olmo", "mpt"];

/// SentencePiece's word-boundary mark.
const SPACE_MARK: &str = "\u{2581}";

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

/// The kinds of tokenizer sage converts (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Byte-level BPE; llama.cpp's pre-tokenizer name.
    ByteLevel(&'static str),
    /// SentencePiece-style BPE with byte fallback; whether a `▁` is put before the text.
    Spm { space_prefix: bool },
}

/// The objects of a pre-tokenizer or normalizer: itself, or its `Sequence`'s members.
fn parts(v: &Value, key: &str) -> Vec<Value> {
    match v.get(key).and_then(|s| s.as_array()) {
        Some(a) if v.get("type").and_then(|t| t.as_str()) == Some("Sequence") => a.clone(),
        _ if v.is_null() => Vec::new(),
        _ => vec![v.clone()],
    }
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(|t| t.as_str()).unwrap_or("")
}

/// Which kind `root` (a tokenizer.json) is, with `gpt2_pre` the family's name for GPT-2's
/// split; None when sage does not know it.
fn kind_of(root: &Value, gpt2_pre: &'static str) -> Option<Kind> {
    let pre = parts(root.get("pre_tokenizer").unwrap_or(&Value::Null), "pretokenizers");
    let norm = parts(root.get("normalizer").unwrap_or(&Value::Null), "normalizers");
    let model = root.get("model")?;
    let byte_level = |p: &Value| type_of(p) == "ByteLevel";
    let split_is = |p: &Value, re: &str| {
        type_of(p) == "Split" && p.get("pattern").and_then(|x| x.get("Regex")).and_then(|r| r.as_str()) == Some(re)
    };
    match pre.as_slice() {
        [s, b] if byte_level(b) => {
            if let Some((pre, _)) = SPLITS.iter().find(|(_, re)| split_is(s, re)) {
                return Some(Kind::ByteLevel(pre));
            }
        }
        [b] if byte_level(b) && b.get("use_regex").and_then(|u| u.as_bool()) != Some(false) => {
            return Some(Kind::ByteLevel(gpt2_pre))
        }
        _ => {}
    }
    if model.get("byte_fallback").and_then(|b| b.as_bool()) != Some(true) {
        return None;
    }
    // Mistral's and Llama's: Prepend("▁") + Replace(" ", "▁") normalizers, no pre-tokenizer;
    // newer files: a Metaspace pre-tokenizer.
    let prepends =
        norm.iter().any(|n| type_of(n) == "Prepend" && n.get("prepend").and_then(|p| p.as_str()) == Some(SPACE_MARK));
    let replaces =
        norm.iter().any(|n| type_of(n) == "Replace" && n.get("content").and_then(|p| p.as_str()) == Some(SPACE_MARK));
    match pre.as_slice() {
        [] if replaces => Some(Kind::Spm { space_prefix: prepends }),
        [m] if type_of(m) == "Metaspace" => {
            let scheme = m.get("prepend_scheme").and_then(|p| p.as_str()).unwrap_or("always");
            Some(Kind::Spm { space_prefix: scheme != "never" })
        }
        _ => None,
    }
}

/// A byte token's text, `<0xNN>`, and its byte.
fn byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
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
        let kind = kind_of(&root, cfg.arch().gpt2_pre()).ok_or_else(|| {
            tok_err(
                &path,
                "not a tokenizer sage knows: byte-level BPE with Qwen2's or GPT-2's split, or SentencePiece-style BPE with byte fallback",
            )
        })?;
        let vocab = model.get("vocab").and_then(|v| v.as_object()).ok_or_else(|| tok_err(&path, "no 'model.vocab'"))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| tok_err(&tc_path, e.to_string()))?,
            Err(_) => Value::Null,
        };
        let unk = model.get("unk_token").and_then(|u| u.as_str());
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
            let ty = match kind {
                Kind::Spm { .. } if byte_token(s).is_some() => TOKEN_BYTE,
                Kind::Spm { .. } if Some(s.as_str()) == unk => TOKEN_UNKNOWN,
                _ => TOKEN_NORMAL,
            };
            put(id, s, ty)?;
        }
        for t in root.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
            let id = t.get("id").and_then(|i| i.as_u64()).ok_or_else(|| tok_err(&path, "added token without id"))?;
            let s = t
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| tok_err(&path, "added token without content"))?;
            let special = t.get("special").and_then(|c| c.as_bool()).unwrap_or(false);
            let ty = match special {
                // SentencePiece's own unknown piece keeps its type, as llama.cpp's converter reads it.
                true if Some(s) == unk && matches!(kind, Kind::Spm { .. }) => TOKEN_UNKNOWN,
                true => TOKEN_CONTROL,
                false => TOKEN_USER_DEFINED,
            };
            put(id, s, ty)?;
        }
        // Rows of the embedding past the tokenizer are padding, as llama.cpp's converter writes.
        tokens.resize(cfg.n_vocab as usize, None);
        let (strs, types): (Vec<String>, Vec<i32>) = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED)))
            .unzip();
        let id_of = |name: Option<String>| name.and_then(|n| strs.iter().position(|s| *s == n)).map(|i| i as u32);
        let mut kv = Vec::new();
        let mut merges = None;
        match kind {
            Kind::ByteLevel(pre) => {
                let list: Vec<String> = model
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
                merges = Some(list);
                kv.push((TOK_MODEL.to_string(), GgufValue::Str("gpt2".into())));
                kv.push((TOK_PRE.to_string(), GgufValue::Str(pre.into())));
                let add_bos = tc.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
                kv.push((TOK_ADD_BOS.to_string(), GgufValue::Bool(add_bos)));
            }
            Kind::Spm { space_prefix } => {
                // Pieces in score order: a piece's score is minus its id; bytes, control and
                // unknown pieces score 0, padding -1000, as llama.cpp's converter writes them.
                let scores: Vec<f32> = types
                    .iter()
                    .enumerate()
                    .map(|(i, &ty)| match ty {
                        TOKEN_NORMAL => -(i as f32),
                        TOKEN_UNUSED | TOKEN_USER_DEFINED => -1000.0,
                        _ => 0.0,
                    })
                    .collect();
                kv.push((TOK_MODEL.to_string(), GgufValue::Str("llama".into())));
                kv.push((TOK_PRE.to_string(), GgufValue::Str("default".into())));
                kv.push((TOK_SCORES.into(), GgufValue::Array(GgufArray::F32(scores))));
                let add_bos = tc.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(true);
                let add_eos = tc.get("add_eos_token").and_then(|b| b.as_bool()).unwrap_or(false);
                kv.push((TOK_ADD_BOS.to_string(), GgufValue::Bool(add_bos)));
                kv.push((TOK_ADD_EOS.to_string(), GgufValue::Bool(add_eos)));
                kv.push((TOK_ADD_SPACE_PREFIX.to_string(), GgufValue::Bool(space_prefix)));
                if let Some(id) = id_of(unk.map(String::from)) {
                    kv.push((TOK_UNK.into(), GgufValue::U32(id)));
                }
            }
        }
        for (key, field) in [(TOK_EOS, "eos_token"), (TOK_BOS, "bos_token"), (TOK_PAD, "pad_token")] {
            if let Some(id) = id_of(token_field(tc.get(field))) {
                kv.push((key.into(), GgufValue::U32(id)));
            }
        }
        // The end tokens of generation_config.json (an id or a list).
        let gc_path = dir.join("generation_config.json");
        if let Ok(t) = std::fs::read_to_string(&gc_path) {
            let gc: Value = serde_json::from_str(&t).map_err(|e| tok_err(&gc_path, e.to_string()))?;
            let ids: Vec<u32> = match gc.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().into_iter().map(|n| n as u32).collect(),
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
                _ => Vec::new(),
            };
            if let Some(&bad) = ids.iter().find(|&&i| i as u64 >= cfg.n_vocab) {
                return Err(tok_err(
                    &gc_path,
                    format!("eos_token_id {bad} is outside the vocabulary of {}", cfg.n_vocab),
                ));
            }
            if !ids.is_empty() {
                kv.push((SAGE_EOS_IDS.into(), GgufValue::Array(GgufArray::U32(ids))));
            }
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
        if let Some(m) = merges {
            kv.push((TOK_MERGES.into(), GgufValue::Array(GgufArray::Str(m))));
        }
        Ok(TokenizerData { json, gguf_kv: kv })
    }

    /// From a GGUF's `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`, with the qwen2 or a
    /// GPT-2-split pre-tokenizer) or SentencePiece-style BPE (`llama`).
    pub fn from_gguf(g: &Gguf, path: &Path) -> Result<TokenizerData> {
        let kv: Vec<(String, GgufValue)> = g
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("tokenizer."))
            .filter_map(|k| g.get(&k).map(|v| (k, v)))
            .collect();
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let model = match get(TOK_MODEL) {
            Some(GgufValue::Str(m)) if m == "gpt2" || m == "llama" => m.clone(),
            other => {
                return Err(tok_err(
                    path,
                    format!("{TOK_MODEL} is {other:?}; sage supports \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece-style BPE)"),
                ))
            }
        };
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
        let root = if model == "gpt2" {
            let pre = match get(TOK_PRE) {
                Some(GgufValue::Str(p)) if SPLITS.iter().any(|(n, _)| n == p) || GPT2_PRES.contains(&p.as_str()) => {
                    p.clone()
                }
                other => {
                    return Err(tok_err(
                        path,
                        format!(
                            "{TOK_PRE} is {other:?}; sage supports \"qwen2\", \"gpt-4o\" and GPT-2's split ({})",
                            GPT2_PRES.join(", ")
                        ),
                    ))
                }
            };
            let merges: Vec<String> = match get(TOK_MERGES) {
                Some(GgufValue::Array(GgufArray::Str(m))) => m.clone(),
                _ => return Err(tok_err(path, format!("{TOK_MERGES} is missing or not a string array"))),
            };
            byte_level_json(tokens, &types, merges, &pre)
        } else {
            let scores: Vec<f32> = match get(TOK_SCORES) {
                Some(GgufValue::Array(GgufArray::F32(s))) if s.len() == tokens.len() => s.clone(),
                other => {
                    return Err(tok_err(
                        path,
                        format!("{TOK_SCORES} is not {} f32 values: {:?}", tokens.len(), other.map(|v| v.type_name())),
                    ))
                }
            };
            let space_prefix = !matches!(get(TOK_ADD_SPACE_PREFIX), Some(GgufValue::Bool(false)));
            spm_json(tokens, &types, &scores, space_prefix, path)?
        };
        let json = serde_json::to_string_pretty(&root).expect("JSON of plain values");
        validate_json(&json, path)?;
        Ok(TokenizerData { json, gguf_kv: kv })
    }
}

/// The tokens tokenizer.json lists as added tokens, matched in text before the model sees it:
/// control and unknown tokens (special) and user-defined ones. They are in the model's vocab
/// too, or the tokenizers crate gives them new ids past it.
fn added_tokens(tokens: &[String], types: &[i32]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &ty))| matches!(ty, TOKEN_CONTROL | TOKEN_UNKNOWN | TOKEN_USER_DEFINED))
        .map(|(id, (s, &ty))| {
            json!({
                "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != TOKEN_USER_DEFINED,
            })
        })
        .collect()
}

/// A byte-level BPE tokenizer.json with llama.cpp's pre-tokenizer `pre` (checked known).
fn byte_level_json(tokens: &[String], types: &[i32], merges: Vec<String>, pre: &str) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, (s, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty != TOKEN_UNUSED {
            vocab.insert(s.clone(), json!(id));
        }
    }
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": regex});
    let pre_tokenizer = match SPLITS.iter().find(|(n, _)| *n == pre) {
        Some((_, re)) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        // GPT-2's split is ByteLevel's own regex.
        None => byte_level(true),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        // No normalizer: llama.cpp applies none, and this file must tokenize as it does.
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": byte_level(false),
        "decoder": byte_level(false),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// A SentencePiece-style BPE tokenizer.json (Mistral's layout) from pieces, their scores and
/// types: every pair of pieces whose union is a normal piece is a merge, ranked by that piece's
/// score, highest first (ties: the union's id, then the left piece's), which is the order
/// llama.cpp's tokenizer merges in.
fn spm_json(tokens: &[String], types: &[i32], scores: &[f32], space_prefix: bool, path: &Path) -> Result<Value> {
    let mut vocab = serde_json::Map::new();
    let mut id_of: HashMap<&str, usize> = HashMap::new();
    for (id, (s, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty != TOKEN_UNUSED {
            vocab.insert(s.clone(), json!(id));
            id_of.entry(s.as_str()).or_insert(id);
        }
    }
    let unk = types.iter().position(|&t| t == TOKEN_UNKNOWN).map(|i| tokens[i].clone());
    for b in 0..=255u8 {
        let name = format!("<0x{b:02X}>");
        if !id_of.contains_key(name.as_str()) {
            return Err(tok_err(
                path,
                format!("{name} is missing: a SentencePiece tokenizer falls back to byte tokens"),
            ));
        }
    }
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty != TOKEN_NORMAL {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(at);
            if let (Some(&ia), Some(&ib)) = (id_of.get(a), id_of.get(b)) {
                if types[ia] == TOKEN_NORMAL && types[ib] == TOKEN_NORMAL {
                    merges.push((scores[id], id, ia, format!("{a} {b}")));
                }
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<String> = merges.into_iter().map(|m| m.3).collect();
    let mut normalizers = Vec::new();
    if space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": SPACE_MARK}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        // sage adds BOS itself (`Tokenizer::encode`), as llama.cpp does from add_bos_token.
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// The tokenizer of a model directory as `sage run` uses it: `tokenizer.json` through the
/// tokenizers crate, and from base.gguf the BOS rule (`tokenizer.ggml.add_bos_token`, applied as
/// llama.cpp applies it) and the tokens that end a generation.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Put before every encoded text (llama.cpp's `add_bos_token`).
    pub bos: Option<u32>,
    /// The model's BOS token, whether or not texts get it (chat templates write it).
    pub bos_token: Option<u32>,
    pub eos: Option<u32>,
    /// The tokens that end a generation: EOS, end-of-turn, and the `eos_token_id` list of the
    /// checkpoint's generation_config.json.
    pub eog: Vec<u32>,
}

/// `sage.generation.eos_token_ids`: generation_config.json's `eos_token_id` (an id or a list), kept
/// in base.gguf.
pub const SAGE_EOS_IDS: &str = "sage.generation.eos_token_ids";

impl Tokenizer {
    /// Load the tokenizer of model directory `dir`.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        crate::model_dir::check_model_dir(dir)?;
        let base = dir.join(crate::model_dir::BASE);
        let g = Gguf::open(&base).map_err(|e| Error::BadGguf { path: base.clone(), reason: e.to_string() })?;
        Tokenizer::load_with(dir, &g)
    }

    /// Load the tokenizer of model directory `dir` whose base.gguf is `g`.
    pub fn load_with(dir: &Path, g: &Gguf) -> Result<Tokenizer> {
        let path = dir.join(crate::model_dir::TOKENIZER);
        let json = std::fs::read_to_string(&path).at(&path)?;
        let inner = validate_json(&json, &path)?;
        let id = |key: &str| match g.get(key) {
            Some(GgufValue::U32(id)) => Some(id),
            Some(GgufValue::I32(id)) if id >= 0 => Some(id as u32),
            _ => None,
        };
        let add_bos = matches!(g.get(TOK_ADD_BOS), Some(GgufValue::Bool(true)));
        let (bos, eos) = (id(TOK_BOS), id(TOK_EOS));
        let mut eog: Vec<u32> = eos.into_iter().chain(id(TOK_EOT)).collect();
        if let Some(GgufValue::Array(GgufArray::U32(ids))) = g.get(SAGE_EOS_IDS) {
            eog.extend(ids);
        }
        eog.sort_unstable();
        eog.dedup();
        Ok(Tokenizer { inner, bos: bos.filter(|_| add_bos), bos_token: bos, eos, eog })
    }

    /// The ids of `text`: special tokens written in it are matched, and the BOS token comes
    /// first where the model wants one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// `encode`, with the model's BOS rule applied only when `add_bos` (a rendered chat
    /// template writes its own, as transformers' `apply_chat_template` tokenizes it).
    pub fn encode_with(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Usage(format!("tokenizing: {e}")))?;
        let bos = if add_bos { self.bos } else { None };
        Ok(bos.into_iter().chain(enc.get_ids().iter().copied()).collect())
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Usage(format!("decoding tokens: {e}")))
    }

    /// The text of token `id` as the vocabulary writes it (`<s>`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The tokenizers crate's tokenizer underneath.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Text from tokens one at a time: each token's text is what decoding a short window of tokens
/// ending with it adds to decoding the window without it, so a character split over tokens
/// comes out whole, once, with the next token that completes it, and a decoder that strips or
/// adds spaces at the start of a text (SentencePiece's) sees the tokens before it. Each step
/// decodes a few tokens, not the whole output.
pub struct Detokenizer<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// The window starts here; `read` is where its already returned part ends.
    prefix: usize,
    read: usize,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer whose text follows `context` (e.g. the prompt's last token), which it does
    /// not return.
    pub fn new(tok: &'a Tokenizer, context: &[u32]) -> Detokenizer<'a> {
        Detokenizer { tok, ids: context.to_vec(), prefix: 0, read: context.len() }
    }

    /// The text `id` completes.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.take(false)
    }

    /// What is left undecoded (an incomplete character at the end), as best it decodes.
    pub fn flush(&mut self) -> Result<String> {
        self.take(true)
    }

    fn take(&mut self, all: bool) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || (!all && now.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        let piece = match now.get(before.len()..) {
            Some(p) if now.starts_with(&before) => p.to_string(),
            // A decoder that rewrote the window's start: the characters past the old text.
            _ => now.chars().skip(before.chars().count()).collect(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_are_recognized() {
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0xff>"), Some(255));
        assert_eq!(byte_token("<0x100>"), None);
        assert_eq!(byte_token("<s>"), None);
    }

    #[test]
    fn kinds_are_told_apart() {
        let qwen = json!({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}}, {"type": "ByteLevel"}]}});
        assert_eq!(kind_of(&qwen, "olmo"), Some(Kind::ByteLevel("qwen2")));
        let neox = json!({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": true}});
        assert_eq!(kind_of(&neox, "olmo"), Some(Kind::ByteLevel("olmo")));
        let mistral = json!({"model": {"type": "BPE", "byte_fallback": true}, "pre_tokenizer": null,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, {"type": "Replace", "content": "\u{2581}"}]}});
        assert_eq!(kind_of(&mistral, "gpt-2"), Some(Kind::Spm { space_prefix: true }));
        let plain = json!({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}});
        assert_eq!(kind_of(&plain, "gpt-2"), None);
    }
}
