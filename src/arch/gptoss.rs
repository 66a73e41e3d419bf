//! gpt-oss (`GptOssForCausalLM` → llama.cpp's `gpt-oss`, its `openai-moe` graph): q, k, v and
//! o biases; attention sinks (one learned logit per head in every softmax, with no value);
//! sliding-window attention on the even layers and full attention on the odd ones
//! (`layer_types`; llama.cpp hard-codes that pattern); YaRN RoPE over half-split heads (NEOX);
//! the post-attention norm named `post_attention_norm`; a router with a bias, softmax over the
//! top k of its logits (the same as softmax, top k, renormalize); experts with biases on gate,
//! up and down, and the clamped SwiGLU (`swiglu_oai`, alpha 1.702, limit 7, which llama.cpp
//! hard-codes). The published checkpoints store the experts in MXFP4 (`*_blocks`,
//! `*_scales`), which sage keeps bit for bit; unquantized checkpoints interleave gate and up
//! (`Arch::hf_interleaved_experts`). o200k byte-level BPE (llama.cpp's `gpt-4o`
//! pre-tokenizer); the harmony chat format.

use super::{Arch, Role, TensorSpec};
use crate::config::{ExpertAct, GgufKeys, HfConfig, HfDefaults, ModelConfig, Yarn};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{Attention, LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct GptOss;

/// The activation llama.cpp's graph hard-codes for the family (`build_moe_ffn`).
const ACT: ExpertAct = ExpertAct::SwiGluOai { alpha: 1.702, limit: 7.0 };

/// transformers' and llama.cpp's layer pattern: even layers slide, odd layers attend fully.
fn swa_pattern(n_layer: u32) -> Vec<bool> {
    (0..n_layer).map(|il| il % 2 == 0).collect()
}

/// llama.cpp's built-in harmony template (`LLM_CHAT_TEMPLATE_OPENAI_MOE`), for a model that
/// brings none: each message as `<|start|>{role}<|message|>{content}<|end|>`, the generation
/// prompt `<|start|>assistant`.
const HARMONY: &str = "{%- for message in messages -%}\
{{- '<|start|>' + message['role'] + '<|message|>' + message['content'] -}}\
{%- if message['role'] == 'assistant' -%}{{- '<|return|>' -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}";

impl Arch for GptOss {
    fn name(&self) -> &'static str {
        "gptoss"
    }

    fn family(&self) -> &'static str {
        "gpt-oss"
    }

    fn gguf_arch(&self) -> &'static str {
        "gpt-oss"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["GptOssForCausalLM", "gpt_oss"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        // What llama.cpp's graph hard-codes must be what the checkpoint says.
        c.only("attention_bias", |v| v.as_bool() == Some(true), "gpt-oss has q/k/v/o biases (llama.cpp requires them)")?;
        c.only("swiglu_limit", |v| v.as_f64() == Some(7.0), "llama.cpp's gpt-oss graph clamps at 7.0")?;
        c.only(
            "swiglu_alpha",
            |v| v.as_f64().is_some_and(|a| (a - 1.702).abs() < 1e-6),
            "llama.cpp's gpt-oss graph uses alpha 1.702",
        )?;
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-5, rope_theta: 150000.0, yarn: true })?;
        if c.get(&["rope_parameters", "rope_scaling"]).is_none() {
            // GptOssConfig's default.
            cfg.yarn = Some(Yarn { factor: 32.0, n_ctx_orig: 4096, beta_fast: 32.0, beta_slow: 1.0, log_mul: 0.0 });
        }
        cfg.n_ff_exp = c.size("n_ff_exp", &["intermediate_size"])?;
        cfg.n_ff = cfg.n_ff_exp;
        cfg.norm_topk_prob = true;
        cfg.n_swa = c.size_or("n_ctx", &["sliding_window"], 128)?;
        cfg.swa_layers = swa_pattern(cfg.n_layer);
        if let Some(types) = c.layer_types(cfg.n_layer, "sliding_attention")? {
            if types != cfg.swa_layers {
                return Err(c.err(
                    &["layer_types"],
                    "sliding attention on the even layers and full attention on the odd ones is the only pattern llama.cpp runs for gpt-oss",
                ));
            }
        }
        cfg.expert_bias = true;
        cfg.expert_act = ACT;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        cfg.n_ff_exp = k.u64(K_EXPERT_FEED_FORWARD_LENGTH)?;
        if cfg.n_swa == 0 {
            return Err(k.err(K_SLIDING_WINDOW, "a positive window", "nothing"));
        }
        cfg.swa_layers = swa_pattern(cfg.n_layer);
        cfg.norm_topk_prob = true;
        cfg.expert_bias = true;
        cfg.expert_act = ACT;
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
        kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let e = cfg.n_embd;
        let q = cfg.n_head as u64 * cfg.head_dim;
        let kv = cfg.n_head_kv as u64 * cfg.head_dim;
        let attn = |n: &str| format!("layers.{{il}}.self_attn.{n}");
        let t = |suffix: &str, ne: &[u64], role: Role, hf: &str| TensorSpec::layer(il, suffix, ne, role, &[hf]);
        vec![
            t(ATTN_NORM, &[e], Role::Norm, "layers.{il}.input_layernorm.weight"),
            t(ATTN_Q, &[e, q], Role::Weight, &attn("q_proj.weight")),
            t(ATTN_K, &[e, kv], Role::Weight, &attn("k_proj.weight")),
            t(ATTN_V, &[e, kv], Role::Weight, &attn("v_proj.weight")),
            t(ATTN_Q_BIAS, &[q], Role::Bias, &attn("q_proj.bias")),
            t(ATTN_K_BIAS, &[kv], Role::Bias, &attn("k_proj.bias")),
            t(ATTN_V_BIAS, &[kv], Role::Bias, &attn("v_proj.bias")),
            t(ATTN_OUT, &[q, e], Role::Weight, &attn("o_proj.weight")),
            t(ATTN_OUT_BIAS, &[e], Role::Bias, &attn("o_proj.bias")),
            t(ATTN_SINKS, &[cfg.n_head as u64], Role::Bias, &attn("sinks")),
            t(ATTN_POST_NORM, &[e], Role::Norm, "layers.{il}.post_attention_layernorm.weight"),
            t(FFN_GATE_INP, &[e, cfg.n_expert as u64], Role::Router, "layers.{il}.mlp.router.weight"),
            t(FFN_GATE_INP_BIAS, &[cfg.n_expert as u64], Role::Bias, "layers.{il}.mlp.router.bias"),
        ]
    }

    fn hf_interleaved_experts(&self, il: u32) -> Option<String> {
        Some(format!("layers.{il}.mlp.experts."))
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let q = l.rope(l.heads(l.proj(w.get(ATTN_Q), w.opt(ATTN_Q_BIAS), cur)), ROPE_NEOX);
        let k = l.rope(l.heads(l.proj(w.get(ATTN_K), w.opt(ATTN_K_BIAS), cur)), ROPE_NEOX);
        let v = l.proj(w.get(ATTN_V), w.opt(ATTN_V_BIAS), cur);
        l.attend_with(q, k, v, Attention { sinks: Some(w.get(ATTN_SINKS)), o_bias: w.opt(ATTN_OUT_BIAS), o_gate: None })
    }

    fn chat_template(&self) -> &'static str {
        HARMONY
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("gpt-oss-20b", include_str!("../../configs/gpt-oss-20b.config.json")),
            ("gpt-oss-120b", include_str!("../../configs/gpt-oss-120b.config.json")),
        ]
    }
}
