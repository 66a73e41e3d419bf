//! Model hyperparameters: read from a Hugging Face `config.json` (transformers 4.x and 5.x
//! spellings, plain Qwen3-MoE or the thinker of Qwen3-Omni) or from GGUF `qwen3moe.*` keys,
//! and written back as GGUF keys.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::ggml::{Gguf, GgufValue};
use crate::names::*;

/// Which checkpoint layout a Hugging Face directory has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfLayout {
    /// `Qwen3MoeForCausalLM`: tensors `model.*`, `lm_head.*`.
    Qwen3Moe,
    /// `Qwen3OmniMoeForConditionalGeneration`: the thinker's text model, `thinker.model.*`,
    /// `thinker.lm_head.*`; everything else (audio, vision, talker) is skipped.
    Qwen3OmniThinker,
}

impl HfLayout {
    /// Prefix of the text model's tensors (`model.` or `thinker.model.`).
    pub fn model_prefix(self) -> &'static str {
        match self {
            HfLayout::Qwen3Moe => "model.",
            HfLayout::Qwen3OmniThinker => "thinker.model.",
        }
    }

    pub fn lm_head(self) -> &'static str {
        match self {
            HfLayout::Qwen3Moe => "lm_head.weight",
            HfLayout::Qwen3OmniThinker => "thinker.lm_head.weight",
        }
    }
}

pub const SUPPORTED_HF: &str = "Qwen3MoeForCausalLM or Qwen3OmniMoeForConditionalGeneration";

/// Hyperparameters of a Qwen3-MoE text model, named as llama.cpp names them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub name: String,
    pub n_vocab: u64,
    pub n_embd: u64,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    /// Per-head dimension of queries, keys and values (`head_dim`).
    pub head_dim: u64,
    /// Width of a dense FFN (`intermediate_size`); Qwen3-MoE has no dense layers, llama.cpp
    /// still records it.
    pub n_ff: u64,
    /// Width of one expert's FFN (`moe_intermediate_size`).
    pub n_ff_exp: u64,
    pub n_expert: u32,
    pub n_expert_used: u32,
    /// Renormalize the chosen experts' weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub n_ctx_train: u64,
    pub tie_word_embeddings: bool,
}

/// Largest sizes a model may declare. llama.cpp's own caps for layers and experts
/// (`LLAMA_MAX_LAYERS`, `LLAMA_MAX_EXPERTS`); generous bounds for the rest, far above any
/// published model, so that sizes computed from them (tensor bytes, footprints, per-layer
/// tables) cannot overflow or ask for memory a file's few bytes do not justify.
pub const LIMITS: [(&str, u64); 8] = [
    ("n_layer", 512),
    ("n_expert", 512),
    ("n_embd", 1 << 20),
    ("n_head", 1 << 16),
    ("head_dim", 1 << 16),
    ("n_ff", 1 << 22),
    ("n_ff_exp", 1 << 22),
    ("n_vocab", 1 << 24),
];

impl ModelConfig {
    /// The first size above `LIMITS`: (name, value, limit).
    fn over_limit(&self) -> Option<(&'static str, u64, u64)> {
        let values = [
            self.n_layer as u64,
            self.n_expert as u64,
            self.n_embd,
            self.n_head as u64,
            self.head_dim,
            self.n_ff,
            self.n_ff_exp,
            self.n_vocab,
        ];
        LIMITS.iter().zip(values).find(|((_, lim), v)| v > lim).map(|((name, lim), v)| (*name, v, *lim))
    }

    /// The first of `rms_eps` and `rope_theta` that is not a positive finite number (ggml
    /// aborts on a negative epsilon; a theta of 0 or less makes every position NaN).
    fn bad_float(&self) -> Option<(&'static str, f32)> {
        [("rms_eps", self.rms_eps), ("rope_theta", self.rope_theta)]
            .into_iter()
            .find(|(_, x)| !(x.is_finite() && *x > 0.0))
    }
}

fn cfg_err(path: &Path, key: &str, reason: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), key: key.to_string(), reason: reason.into() }
}

/// A JSON object with the file it came from, for error messages.
struct Obj<'a> {
    path: &'a Path,
    prefix: &'a str,
    v: &'a Value,
}

impl Obj<'_> {
    fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|v| !v.is_null()))
    }

    fn key(&self, keys: &[&str]) -> String {
        format!("{}{}", self.prefix, keys.join("' or '"))
    }

    fn u64(&self, keys: &[&str]) -> Result<u64> {
        let v = self.get(keys).ok_or_else(|| cfg_err(self.path, &self.key(keys), "missing"))?;
        v.as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| cfg_err(self.path, &self.key(keys), format!("expected a positive integer, got {v}")))
    }

    fn u32(&self, keys: &[&str]) -> Result<u32> {
        let n = self.u64(keys)?;
        u32::try_from(n).map_err(|_| cfg_err(self.path, &self.key(keys), format!("{n} is too large")))
    }

    fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| cfg_err(self.path, &self.key(keys), format!("expected a number, got {v}")))
            }
        }
    }

    fn bool_or(&self, keys: &[&str], default: bool) -> Result<bool> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| cfg_err(self.path, &self.key(keys), format!("expected true or false, got {v}"))),
        }
    }
}

/// Read `config.json` of a Hugging Face checkpoint.
pub fn read_hf_config(path: &Path) -> Result<(HfLayout, ModelConfig)> {
    let text = std::fs::read_to_string(path).at(path)?;
    parse_hf_config(&text, path)
}

/// Parse the text of a `config.json`; `path` names it in errors (and gives the model's name
/// when the file has no `_name_or_path`).
pub fn parse_hf_config(text: &str, path: &Path) -> Result<(HfLayout, ModelConfig)> {
    let root: Value = serde_json::from_str(text).map_err(|e| cfg_err(path, "(json)", e.to_string()))?;
    let arch = root
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| root.get("model_type").and_then(|m| m.as_str()))
        .unwrap_or("(none)")
        .to_string();
    let (layout, text_cfg, prefix) = match arch.as_str() {
        "Qwen3MoeForCausalLM" | "qwen3_moe" => (HfLayout::Qwen3Moe, &root, ""),
        "Qwen3OmniMoeForConditionalGeneration" | "Qwen3OmniMoeThinkerForConditionalGeneration" | "qwen3_omni_moe" => {
            let t = root
                .get("thinker_config")
                .and_then(|t| t.get("text_config"))
                .ok_or_else(|| cfg_err(path, "thinker_config.text_config", "missing"))?;
            (HfLayout::Qwen3OmniThinker, t, "thinker_config.text_config.")
        }
        _ => {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                got: format!("'{arch}'"),
                expected: SUPPORTED_HF.into(),
            })
        }
    };
    let o = Obj { path, prefix, v: text_cfg };

    // Features of the Qwen3-MoE family that llama.cpp's qwen3moe graph does not have.
    if o.u64(&["decoder_sparse_step"]).unwrap_or(1) != 1 {
        return Err(cfg_err(path, &o.key(&["decoder_sparse_step"]), "only 1 (every layer MoE) is supported"));
    }
    if let Some(v) = o.get(&["mlp_only_layers"]) {
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            return Err(cfg_err(
                path,
                &o.key(&["mlp_only_layers"]),
                format!("dense layers are not supported, got {v}"),
            ));
        }
    }
    if o.bool_or(&["attention_bias"], false)? {
        return Err(cfg_err(path, &o.key(&["attention_bias"]), "attention biases are not supported"));
    }
    if let Some(act) = o.get(&["hidden_act"]) {
        if act.as_str() != Some("silu") {
            return Err(cfg_err(path, &o.key(&["hidden_act"]), format!("only silu is supported, got {act}")));
        }
    }
    // RoPE: transformers 4.x writes rope_theta (+ rope_scaling); 5.x writes rope_parameters.
    let rope = o.get(&["rope_parameters", "rope_scaling"]);
    if let Some(r) = rope {
        let ty = r.get("rope_type").or_else(|| r.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        // Qwen3-Omni's interleaved M-RoPE is plain RoPE when all position components are equal,
        // as they are for text-only input.
        if ty != "default" {
            return Err(cfg_err(path, &o.key(&["rope_scaling"]), format!("rope type '{ty}' is not supported")));
        }
    }
    let rope_theta = match (o.get(&["rope_theta"]), rope.and_then(|r| r.get("rope_theta"))) {
        (Some(v), _) | (None, Some(v)) => {
            v.as_f64().ok_or_else(|| cfg_err(path, &o.key(&["rope_theta"]), format!("expected a number, got {v}")))?
        }
        (None, None) => 10000.0,
    };

    let n_embd = o.u64(&["hidden_size"])?;
    let n_head = o.u32(&["num_attention_heads"])?;
    let head_dim = match o.get(&["head_dim"]) {
        Some(_) => o.u64(&["head_dim"])?,
        None => n_embd / n_head as u64,
    };
    let n_expert = o.u32(&["num_experts", "num_local_experts"])?;
    let n_expert_used = o.u32(&["num_experts_per_tok"])?;
    if n_expert_used > n_expert {
        return Err(cfg_err(
            path,
            &o.key(&["num_experts_per_tok"]),
            format!("{n_expert_used} experts per token but only {n_expert} experts"),
        ));
    }
    let n_head_kv = match o.get(&["num_key_value_heads"]) {
        Some(_) => o.u32(&["num_key_value_heads"])?,
        None => n_head,
    };
    if n_head % n_head_kv != 0 {
        return Err(cfg_err(
            path,
            &o.key(&["num_key_value_heads"]),
            format!("{n_head} heads are not a multiple of {n_head_kv}"),
        ));
    }
    let cfg = ModelConfig {
        name: match root.get("_name_or_path").and_then(|n| n.as_str()) {
            Some(n) if !n.is_empty() => n.to_string(),
            // The checkpoint's directory name, as llama.cpp's converter does.
            _ => path
                .parent()
                .and_then(|d| d.file_name())
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or(arch.clone()),
        },
        n_vocab: o.u64(&["vocab_size"])?,
        n_embd,
        n_layer: o.u32(&["num_hidden_layers"])?,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: o.get(&["intermediate_size"]).and_then(|v| v.as_u64()).unwrap_or(0),
        n_ff_exp: o.u64(&["moe_intermediate_size"])?,
        n_expert,
        n_expert_used,
        norm_topk_prob: o.bool_or(&["norm_topk_prob"], false)?,
        rms_eps: o.f64_or(&["rms_norm_eps"], 1e-6)? as f32,
        rope_theta: rope_theta as f32,
        n_ctx_train: o.get(&["max_position_embeddings"]).and_then(|v| v.as_u64()).unwrap_or(4096),
        tie_word_embeddings: o.bool_or(&["tie_word_embeddings"], false)?,
    };
    if let Some((name, v, lim)) = cfg.over_limit() {
        let keys: &[&str] = match name {
            "n_layer" => &["num_hidden_layers"],
            "n_expert" => &["num_experts", "num_local_experts"],
            "n_embd" => &["hidden_size"],
            "n_head" => &["num_attention_heads"],
            "head_dim" => &["head_dim"],
            "n_ff" => &["intermediate_size"],
            "n_ff_exp" => &["moe_intermediate_size"],
            _ => &["vocab_size"],
        };
        return Err(cfg_err(path, &o.key(keys), format!("{v} is above the largest supported ({name} <= {lim})")));
    }
    if let Some((name, x)) = cfg.bad_float() {
        let keys: &[&str] = if name == "rms_eps" { &["rms_norm_eps"] } else { &["rope_theta"] };
        return Err(cfg_err(path, &o.key(keys), format!("expected a positive number, got {x}")));
    }
    Ok((layout, cfg))
}

impl ModelConfig {
    /// Write the hyperparameters as llama.cpp's `qwen3moe.*` keys.
    pub fn write_gguf(&self, g: &mut Gguf) -> Result<()> {
        let u32v = |n: u64| GgufValue::U32(n.min(u32::MAX as u64) as u32);
        let kv: Vec<(String, GgufValue)> = vec![
            (GENERAL_ARCHITECTURE.into(), GgufValue::Str(ARCH.into())),
            (GENERAL_NAME.into(), GgufValue::Str(self.name.clone())),
            (arch_key(K_VOCAB_SIZE), u32v(self.n_vocab)),
            (arch_key(K_BLOCK_COUNT), GgufValue::U32(self.n_layer)),
            (arch_key(K_CONTEXT_LENGTH), u32v(self.n_ctx_train)),
            (arch_key(K_EMBEDDING_LENGTH), u32v(self.n_embd)),
            (arch_key(K_FEED_FORWARD_LENGTH), u32v(self.n_ff)),
            (arch_key(K_EXPERT_FEED_FORWARD_LENGTH), u32v(self.n_ff_exp)),
            (arch_key(K_HEAD_COUNT), GgufValue::U32(self.n_head)),
            (arch_key(K_HEAD_COUNT_KV), GgufValue::U32(self.n_head_kv)),
            (arch_key(K_KEY_LENGTH), u32v(self.head_dim)),
            (arch_key(K_VALUE_LENGTH), u32v(self.head_dim)),
            (arch_key(K_RMS_EPS), GgufValue::F32(self.rms_eps)),
            (arch_key(K_ROPE_FREQ_BASE), GgufValue::F32(self.rope_theta)),
            (arch_key(K_EXPERT_COUNT), GgufValue::U32(self.n_expert)),
            (arch_key(K_EXPERT_USED_COUNT), GgufValue::U32(self.n_expert_used)),
            (arch_key(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(self.norm_topk_prob)),
        ];
        for (k, v) in &kv {
            g.set(k, v).map_err(|e| Error::Usage(e.to_string()))?;
        }
        Ok(())
    }

    /// Read llama.cpp's `qwen3moe.*` keys; `n_vocab` comes from the token embedding's shape.
    pub fn read_gguf(g: &Gguf, path: &Path) -> Result<ModelConfig> {
        let arch = match g.get(GENERAL_ARCHITECTURE) {
            Some(GgufValue::Str(s)) => s,
            Some(v) => return Err(meta_err(path, GENERAL_ARCHITECTURE, "a string", v.type_name())),
            None => "(none)".into(),
        };
        if arch != ARCH {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                got: format!("'{arch}'"),
                expected: format!("'{ARCH}' (Qwen3-MoE)"),
            });
        }
        let int = |k: &str| -> Result<u64> {
            let key = arch_key(k);
            match g.get(&key) {
                Some(GgufValue::U32(n)) => Ok(n as u64),
                Some(GgufValue::U64(n)) => Ok(n),
                Some(GgufValue::I32(n)) if n >= 0 => Ok(n as u64),
                Some(GgufValue::I64(n)) if n >= 0 => Ok(n as u64),
                Some(v) => Err(meta_err(path, &key, "an unsigned integer", &format!("{v:?}"))),
                None => Err(meta_err(path, &key, "an unsigned integer", "nothing")),
            }
        };
        let float = |k: &str, default: Option<f32>| -> Result<f32> {
            let key = arch_key(k);
            match (g.get(&key), default) {
                (Some(GgufValue::F32(x)), _) => Ok(x),
                (Some(GgufValue::F64(x)), _) => Ok(x as f32),
                (None, Some(d)) => Ok(d),
                (v, _) => Err(meta_err(path, &key, "a float", &format!("{v:?}"))),
            }
        };
        let small = |k: &str| -> Result<u32> {
            let n = int(k)?;
            u32::try_from(n).map_err(|_| meta_err(path, &arch_key(k), "a 32-bit count", &n.to_string()))
        };
        let n_embd = int(K_EMBEDDING_LENGTH)?;
        let n_head = small(K_HEAD_COUNT)?;
        let tok = g
            .find_tensor(TOKEN_EMBD)
            .map(|i| g.tensor(i))
            .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), tensor: TOKEN_EMBD.into() })?;
        let cfg = ModelConfig {
            name: match g.get(GENERAL_NAME) {
                Some(GgufValue::Str(s)) => s,
                _ => ARCH.into(),
            },
            n_vocab: tok.ne.get(1).copied().unwrap_or(1),
            n_embd,
            n_layer: small(K_BLOCK_COUNT)?,
            n_head,
            n_head_kv: small(K_HEAD_COUNT_KV).unwrap_or(n_head),
            head_dim: int(K_KEY_LENGTH).unwrap_or(n_embd / n_head.max(1) as u64),
            n_ff: int(K_FEED_FORWARD_LENGTH).unwrap_or(0),
            n_ff_exp: int(K_EXPERT_FEED_FORWARD_LENGTH)?,
            n_expert: small(K_EXPERT_COUNT)?,
            n_expert_used: small(K_EXPERT_USED_COUNT)?,
            // llama.cpp's qwen3moe graph always renormalizes the chosen experts' weights.
            norm_topk_prob: !matches!(g.get(&arch_key(K_EXPERT_WEIGHTS_NORM)), Some(GgufValue::Bool(false))),
            rms_eps: float(K_RMS_EPS, None)?,
            rope_theta: float(K_ROPE_FREQ_BASE, Some(10000.0))?,
            n_ctx_train: int(K_CONTEXT_LENGTH).unwrap_or(4096),
            tie_word_embeddings: g.find_tensor(OUTPUT).is_none(),
        };
        if cfg.n_head == 0
            || cfg.n_head_kv == 0
            || !cfg.n_head.is_multiple_of(cfg.n_head_kv)
            || cfg.n_expert == 0
            || cfg.n_expert_used == 0
            || cfg.n_expert_used > cfg.n_expert
        {
            return Err(meta_err(
                path,
                &arch_key(K_HEAD_COUNT),
                "heads a multiple of KV heads and 0 < experts used <= experts",
                &format!(
                    "{} heads, {} KV heads, {} of {} experts",
                    cfg.n_head, cfg.n_head_kv, cfg.n_expert_used, cfg.n_expert
                ),
            ));
        }
        if let Some((name, v, lim)) = cfg.over_limit() {
            let key = match name {
                "n_layer" => arch_key(K_BLOCK_COUNT),
                "n_expert" => arch_key(K_EXPERT_COUNT),
                "n_embd" => arch_key(K_EMBEDDING_LENGTH),
                "n_head" => arch_key(K_HEAD_COUNT),
                "head_dim" => arch_key(K_KEY_LENGTH),
                "n_ff" => arch_key(K_FEED_FORWARD_LENGTH),
                "n_ff_exp" => arch_key(K_EXPERT_FEED_FORWARD_LENGTH),
                _ => format!("{TOKEN_EMBD} rows"),
            };
            return Err(meta_err(path, &key, &format!("{name} <= {lim}"), &v.to_string()));
        }
        if let Some((name, x)) = cfg.bad_float() {
            let key = arch_key(if name == "rms_eps" { K_RMS_EPS } else { K_ROPE_FREQ_BASE });
            return Err(meta_err(path, &key, "a positive number", &x.to_string()));
        }
        // Every layer has at least 9 base tensors; a count the file cannot hold is a lie.
        if cfg.n_layer as usize * 9 > g.n_tensors() {
            return Err(meta_err(
                path,
                &arch_key(K_BLOCK_COUNT),
                &format!(
                    "at most {} layers (the file has {} tensors, 9 or more per layer)",
                    g.n_tensors() / 9,
                    g.n_tensors()
                ),
                &cfg.n_layer.to_string(),
            ));
        }
        Ok(cfg)
    }
}

fn meta_err(path: &Path, key: &str, expected: &str, got: &str) -> Error {
    Error::Config { path: path.to_path_buf(), key: key.to_string(), reason: format!("expected {expected}, got {got}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, v: &Value) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn transformers4_and_5_spellings_agree() {
        let d = tempfile::tempdir().unwrap();
        let v4 = serde_json::json!({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_hidden_layers": 2,
            "vocab_size": 100, "rope_theta": 1e6, "norm_topk_prob": true});
        let mut v5 = v4.clone();
        let o = v5.as_object_mut().unwrap();
        o.remove("num_experts");
        o.remove("rope_theta");
        o.insert("num_local_experts".into(), 8.into());
        o.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 1e6}));
        let (_, a) = read_hf_config(&write(d.path(), &v4)).unwrap();
        let (_, b) = read_hf_config(&write(d.path(), &v5)).unwrap();
        assert_eq!(a, b);
        assert_eq!((a.n_expert, a.rope_theta, a.head_dim), (8, 1e6, 16));
    }

    #[test]
    fn published_configs_read_as_the_real_models() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs");
        let (l, q) = read_hf_config(&dir.join("qwen3-30b-a3b.config.json")).unwrap();
        let (lo, o) = read_hf_config(&dir.join("qwen3-omni-30b-a3b-instruct.config.json")).unwrap();
        assert_eq!((l, lo), (HfLayout::Qwen3Moe, HfLayout::Qwen3OmniThinker));
        for c in [&q, &o] {
            assert_eq!((c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim), (48, 2048, 32, 4, 128));
            assert_eq!((c.n_expert, c.n_expert_used, c.n_ff_exp, c.norm_topk_prob), (128, 8, 768, true));
            assert_eq!((c.rope_theta, c.rms_eps), (1e6, 1e-6));
        }
        assert_eq!((q.n_vocab, o.n_vocab), (151936, 152064));
    }

    #[test]
    fn errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let v = serde_json::json!({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64});
        let e = read_hf_config(&write(d.path(), &v)).unwrap_err().to_string();
        assert!(e.contains("'num_attention_heads': missing"), "{e}");
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"]});
        let e = read_hf_config(&write(d.path(), &v)).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture 'LlamaForCausalLM'"), "{e}");
    }
}
