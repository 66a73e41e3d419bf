//! Mixtral (`MixtralForCausalLM`). llama.cpp runs it as its `llama` architecture with
//! `llama.expert_count` set: no biases, no q/k norms, RoPE on adjacent pairs (so the rows of q
//! and k are reordered from transformers' half-split layout, as llama.cpp's converter does);
//! the router takes softmax over all experts, the top k, and always renormalizes them (the
//! same as softmax over the top k logits); no shared expert. The expert FFN width is
//! `intermediate_size` (`llama.feed_forward_length`). SentencePiece BPE with byte fallback and
//! a BOS token; Mistral's `[INST]` chat format.

use super::{attention_tensors, Arch, FromHf, TensorSpec};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NORMAL};
use crate::names::*;

pub struct Mixtral;

impl Arch for Mixtral {
    fn name(&self) -> &'static str {
        "mixtral"
    }

    fn family(&self) -> &'static str {
        "Mixtral"
    }

    fn gguf_arch(&self) -> &'static str {
        "llama"
    }

    /// A `llama` GGUF with experts; a dense Llama is not a Mixture of Experts.
    fn accepts_gguf(&self, k: &GgufKeys) -> bool {
        matches!(k.opt_u64(K_EXPERT_COUNT), Ok(Some(n)) if n > 0)
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["MixtralForCausalLM", "mixtral"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        // Mixtral-8x7B publishes `sliding_window: null`; attention over a window is another
        // model (llama.cpp's llama graph has none either).
        if c.get(&["sliding_window"]).is_some() {
            return Err(c.err(&["sliding_window"], "sliding-window attention is not supported"));
        }
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-5, rope_theta: 1e6, yarn: false })?;
        cfg.n_ff_exp = c.size("n_ff_exp", &["intermediate_size"])?;
        cfg.n_ff = cfg.n_ff_exp;
        cfg.norm_topk_prob = true;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        cfg.n_ff_exp = k.u64(K_FEED_FORWARD_LENGTH)?;
        cfg.norm_topk_prob = true;
        // llama.cpp requires RoPE over whole heads for this architecture.
        if let Some(n_rot) = k.opt_u64(K_ROPE_DIMENSION_COUNT)? {
            if n_rot != cfg.head_dim {
                return Err(k.err(
                    K_ROPE_DIMENSION_COUNT,
                    &format!("the head dimension {}", cfg.head_dim),
                    &n_rot.to_string(),
                ));
            }
        }
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_ROPE_DIMENSION_COUNT), GgufValue::U32(cfg.head_dim as u32)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        // Hub checkpoints name the MoE block `block_sparse_moe`; transformers 5 in memory `mlp`.
        let router = ["layers.{il}.block_sparse_moe.gate.weight", "layers.{il}.mlp.gate.weight"];
        let mut t = attention_tensors(cfg, il, false, &router);
        for spec in &mut t {
            if spec.name == blk(il, ATTN_Q) {
                spec.from_hf = FromHf::RopePairs { n_head: cfg.n_head };
            } else if spec.name == blk(il, ATTN_K) {
                spec.from_hf = FromHf::RopePairs { n_head: cfg.n_head_kv };
            }
        }
        t
    }

    fn hf_expert(&self, il: u32, e: u32, p: Proj) -> String {
        let w = match p {
            Proj::Gate => "w1",
            Proj::Down => "w2",
            Proj::Up => "w3",
        };
        format!("layers.{il}.block_sparse_moe.experts.{e}.{w}.weight")
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let q = l.rope(l.heads(l.proj(w.get(ATTN_Q), None, cur)), ROPE_NORMAL);
        let k = l.rope(l.heads(l.proj(w.get(ATTN_K), None, cur)), ROPE_NORMAL);
        let v = l.proj(w.get(ATTN_V), None, cur);
        l.attend(q, k, v)
    }

    /// Mixtral-8x7B-Instruct-v0.1's template as released (the Hub's changed in 2024 to match
    /// mistral_common).
    fn chat_template(&self) -> &'static str {
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("mixtral-8x7b", include_str!("../../configs/mixtral-8x7b.config.json")),
        ]
    }
}
