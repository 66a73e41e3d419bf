//! OLMoE (`OlmoeForCausalLM` → llama.cpp's `olmoe`): RMS norms on q and k over the whole
//! projection (all heads together, before the split into heads), NEOX RoPE, no biases; the
//! router takes softmax over all experts and the top k without renormalizing them
//! (`norm_topk_prob`, false in OLMoE-1B-7B); no shared expert. The expert FFN width is
//! `intermediate_size` (`olmoe.feed_forward_length`). GPT-NeoX byte-level BPE.

use super::{attention_tensors, Arch, Role, TensorSpec};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct Olmoe;

impl Arch for Olmoe {
    fn name(&self) -> &'static str {
        "olmoe"
    }

    fn family(&self) -> &'static str {
        "OLMoE"
    }

    fn gguf_arch(&self) -> &'static str {
        "olmoe"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["OlmoeForCausalLM", "olmoe"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        c.only("clip_qkv", |_| false, "clipping q, k and v is not supported")?;
        if c.bool_or(&["attention_bias"], false)? {
            return Err(c.err(&["attention_bias"], "attention biases are not supported"));
        }
        // OlmoeConfig's defaults: rms_norm_eps 1e-5 (the published config has no such key).
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-5, rope_theta: 10000.0, yarn: false })?;
        // llama.cpp's olmoe loader sizes both norms n_embd: one KV head per query head, and
        // heads that fill n_embd.
        if cfg.n_head_kv != cfg.n_head || cfg.n_head as u64 * cfg.head_dim != cfg.n_embd {
            return Err(c.err(
                &["num_key_value_heads"],
                format!(
                    "OLMoE's q/k norms span n_embd: {} query and {} KV heads of {} do not fill {} (grouped-query attention is not supported)",
                    cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_embd
                ),
            ));
        }
        cfg.n_ff_exp = c.size("n_ff_exp", &["intermediate_size"])?;
        cfg.n_ff = cfg.n_ff_exp;
        cfg.norm_topk_prob = c.bool_or(&["norm_topk_prob"], false)?;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        cfg.n_ff_exp = k.u64(K_FEED_FORWARD_LENGTH)?;
        // llama.cpp's olmoe graph never renormalizes.
        cfg.norm_topk_prob = k.opt_bool(K_EXPERT_WEIGHTS_NORM) == Some(true);
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(cfg.norm_topk_prob)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let mut t = attention_tensors(cfg, il, false, &["layers.{il}.mlp.gate.weight"]);
        let (q, kv) = (cfg.n_head as u64 * cfg.head_dim, cfg.n_head_kv as u64 * cfg.head_dim);
        let at = t.len() - 2;
        t.insert(at, TensorSpec::layer(il, ATTN_Q_NORM, &[q], Role::Norm, &["layers.{il}.self_attn.q_norm.weight"]));
        t.insert(
            at + 1,
            TensorSpec::layer(il, ATTN_K_NORM, &[kv], Role::Norm, &["layers.{il}.self_attn.k_norm.weight"]),
        );
        t
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        // RMS norms over all heads of q and of k at once, then the split into heads.
        let q = l.rope(l.heads(l.norm(l.proj(w.get(ATTN_Q), None, cur), w.get(ATTN_Q_NORM))), ROPE_NEOX);
        let k = l.rope(l.heads(l.norm(l.proj(w.get(ATTN_K), None, cur), w.get(ATTN_K_NORM))), ROPE_NEOX);
        let v = l.proj(w.get(ATTN_V), None, cur);
        l.attend(q, k, v)
    }

    fn gpt2_pre(&self) -> &'static str {
        "olmo"
    }

    /// OLMoE-1B-7B-0924-Instruct's (Tulu) format.
    fn chat_template(&self) -> &'static str {
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("olmoe-1b-7b", include_str!("../../configs/olmoe-1b-7b.config.json")),
        ]
    }
}
