//! Qwen3-MoE (`Qwen3MoeForCausalLM` → llama.cpp's `qwen3moe`), and the thinker of Qwen3-Omni,
//! whose text model is the same: per-head RMS norms on q and k, NEOX RoPE, no biases; the
//! router takes softmax over all experts, the top k, and renormalizes them when
//! `norm_topk_prob` (Qwen3-30B-A3B: true); no shared expert. Qwen2 byte-level BPE, ChatML.

use super::{attention_tensors, Arch, HfLayout, Role, TensorSpec};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct Qwen3Moe;

/// Qwen3-Omni's thinker: the text model under `thinker.`, its hyperparameters under
/// `thinker_config.text_config`; the audio, vision, talker and code2wav parts are skipped.
const OMNI_THINKER: HfLayout = HfLayout {
    model_prefix: "thinker.model.",
    lm_head: "thinker.lm_head.weight",
    config_path: &["thinker_config", "text_config"],
    keep: &["thinker.model.", "thinker.lm_head."],
};

const OMNI: [&str; 3] =
    ["Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration", "qwen3_omni_moe"];

/// ChatML, the form of Qwen's chat templates (without the default system prompt some add).
pub(crate) const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl Arch for Qwen3Moe {
    fn name(&self) -> &'static str {
        "qwen3moe"
    }

    fn family(&self) -> &'static str {
        "Qwen3-MoE"
    }

    fn gguf_arch(&self) -> &'static str {
        "qwen3moe"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &[
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            "Qwen3OmniMoeForConditionalGeneration",
            "Qwen3OmniMoeThinkerForConditionalGeneration",
            "qwen3_omni_moe",
        ]
    }

    fn hf_layout(&self, hf_arch: &str) -> HfLayout {
        if OMNI.contains(&hf_arch) {
            OMNI_THINKER
        } else {
            HfLayout::PLAIN
        }
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        // Features of the family that llama.cpp's qwen3moe graph does not have.
        c.only("decoder_sparse_step", |v| v.as_u64() == Some(1), "only 1 (every layer MoE) is supported")?;
        c.only("mlp_only_layers", |v| v.as_array().is_some_and(|a| a.is_empty()), "dense layers are not supported")?;
        if c.bool_or(&["attention_bias"], false)? {
            return Err(c.err(&["attention_bias"], "attention biases are not supported"));
        }
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-6, rope_theta: 10000.0, yarn: false })?;
        cfg.n_ff = c.get(&["intermediate_size"]).and_then(|v| v.as_u64()).unwrap_or(0);
        cfg.n_ff_exp = c.size("n_ff_exp", &["moe_intermediate_size"])?;
        cfg.norm_topk_prob = c.bool_or(&["norm_topk_prob"], false)?;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        cfg.n_ff_exp = k.u64(K_EXPERT_FEED_FORWARD_LENGTH)?;
        // llama.cpp's qwen3moe graph always renormalizes the chosen experts' weights.
        cfg.norm_topk_prob = k.opt_bool(K_EXPERT_WEIGHTS_NORM) != Some(false);
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
        kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(cfg.norm_topk_prob)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let mut t = attention_tensors(cfg, il, false, &["layers.{il}.mlp.gate.weight"]);
        let hd = cfg.head_dim;
        // After attn_output, before ffn_norm: the order llama.cpp's converter writes.
        let at = t.len() - 2;
        t.insert(at, TensorSpec::layer(il, ATTN_Q_NORM, &[hd], Role::Norm, &["layers.{il}.self_attn.q_norm.weight"]));
        t.insert(
            at + 1,
            TensorSpec::layer(il, ATTN_K_NORM, &[hd], Role::Norm, &["layers.{il}.self_attn.k_norm.weight"]),
        );
        t
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        // RMS norms over each head of q and k, before RoPE.
        let q = l.rope(l.norm(l.heads(l.proj(w.get(ATTN_Q), None, cur)), w.get(ATTN_Q_NORM)), ROPE_NEOX);
        let k = l.rope(l.norm(l.heads(l.proj(w.get(ATTN_K), None, cur)), w.get(ATTN_K_NORM)), ROPE_NEOX);
        let v = l.proj(w.get(ATTN_V), None, cur);
        l.attend(q, k, v)
    }

    fn chat_template(&self) -> &'static str {
        CHATML
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("qwen3-30b-a3b", include_str!("../../configs/qwen3-30b-a3b.config.json")),
            ("qwen3-omni-30b-a3b", include_str!("../../configs/qwen3-omni-30b-a3b-instruct.config.json")),
            ("tiny", include_str!("../../configs/tiny-qwen3moe.config.json")),
        ]
    }
}
