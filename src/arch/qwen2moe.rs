//! Qwen2-MoE and Qwen1.5-MoE (`Qwen2MoeForCausalLM` → llama.cpp's `qwen2moe`): biases on q, k
//! and v, no q/k norms, NEOX RoPE; the router takes softmax over all experts and the top k
//! without renormalizing them (`norm_topk_prob`, false by default); a shared expert beside
//! the routed ones, scaled by sigmoid(`shared_expert_gate` · x), always resident in the base.
//! Qwen2 byte-level BPE, ChatML.
//!
//! Qwen1.5-MoE-A2.7B's published config.json could not be found here; transformers'
//! `Qwen2MoeConfig()` defaults are documented as that model's configuration, and
//! `synth --like qwen1.5-moe-a2.7b` uses them (configs/qwen1.5-moe-a2.7b.config.json).

use super::{attention_tensors, Arch, Role, TensorSpec};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct Qwen2Moe;

impl Arch for Qwen2Moe {
    fn name(&self) -> &'static str {
        "qwen2moe"
    }

    fn family(&self) -> &'static str {
        "Qwen2-MoE"
    }

    fn gguf_arch(&self) -> &'static str {
        "qwen2moe"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["Qwen2MoeForCausalLM", "qwen2_moe"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        c.only("decoder_sparse_step", |v| v.as_u64() == Some(1), "only 1 (every layer MoE) is supported")?;
        c.only("mlp_only_layers", |v| v.as_array().is_some_and(|a| a.is_empty()), "dense layers are not supported")?;
        c.only("use_sliding_window", |v| v.as_bool() == Some(false), "sliding-window attention is not supported")?;
        c.only("qkv_bias", |v| v.as_bool() == Some(true), "the q/k/v biases of the family are expected")?;
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-6, rope_theta: 10000.0, yarn: false })?;
        // llama.cpp's qwen2moe sizes attn_output n_embd x n_embd.
        if cfg.n_head as u64 * cfg.head_dim != cfg.n_embd {
            return Err(c.err(
                &["head_dim"],
                format!("{} heads of {} must fill n_embd {}", cfg.n_head, cfg.head_dim, cfg.n_embd),
            ));
        }
        cfg.n_ff = c.get(&["intermediate_size"]).and_then(|v| v.as_u64()).unwrap_or(0);
        cfg.n_ff_exp = c.size("n_ff_exp", &["moe_intermediate_size"])?;
        cfg.n_ff_shexp = c.size("n_ff_shexp", &["shared_expert_intermediate_size"])?;
        cfg.norm_topk_prob = c.bool_or(&["norm_topk_prob"], false)?;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        // llama.cpp's fallbacks when the widths are absent.
        cfg.n_ff_exp = match k.opt_u64(K_EXPERT_FEED_FORWARD_LENGTH)? {
            Some(n) => n,
            None => cfg.n_ff / cfg.n_expert_used.max(1) as u64,
        };
        cfg.n_ff_shexp = k.opt_u64(K_EXPERT_SHARED_FEED_FORWARD_LENGTH)?.unwrap_or(cfg.n_ff);
        if cfg.n_ff_shexp == 0 {
            return Err(k.err(K_EXPERT_SHARED_FEED_FORWARD_LENGTH, "a positive shared expert width", "0"));
        }
        // llama.cpp's qwen2moe graph never renormalizes.
        cfg.norm_topk_prob = k.opt_bool(K_EXPERT_WEIGHTS_NORM) == Some(true);
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
        kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_EXPERT_SHARED_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_shexp as u32)));
        kv.push((k(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(cfg.norm_topk_prob)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let (e, f) = (cfg.n_embd, cfg.n_ff_shexp);
        let mut t = attention_tensors(cfg, il, true, &["layers.{il}.mlp.gate.weight"]);
        t.extend([
            TensorSpec::layer(
                il,
                FFN_GATE_INP_SHEXP,
                &[e],
                Role::Router,
                &["layers.{il}.mlp.shared_expert_gate.weight"],
            ),
            TensorSpec::layer(
                il,
                FFN_GATE_SHEXP,
                &[e, f],
                Role::Weight,
                &["layers.{il}.mlp.shared_expert.gate_proj.weight"],
            ),
            TensorSpec::layer(
                il,
                FFN_UP_SHEXP,
                &[e, f],
                Role::Weight,
                &["layers.{il}.mlp.shared_expert.up_proj.weight"],
            ),
            TensorSpec::layer(
                il,
                FFN_DOWN_SHEXP,
                &[f, e],
                Role::Weight,
                &["layers.{il}.mlp.shared_expert.down_proj.weight"],
            ),
        ]);
        t
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let q = l.rope(l.heads(l.proj(w.get(ATTN_Q), w.opt(ATTN_Q_BIAS), cur)), ROPE_NEOX);
        let k = l.rope(l.heads(l.proj(w.get(ATTN_K), w.opt(ATTN_K_BIAS), cur)), ROPE_NEOX);
        let v = l.proj(w.get(ATTN_V), w.opt(ATTN_V_BIAS), cur);
        let mut out = l.attend(q, k, v);
        // The shared expert over what the routed experts see, scaled by its gate.
        let x = out.normed;
        let gate = l.sigmoid_as_llama(l.ctx.mul_mat(w.get(FFN_GATE_INP_SHEXP), x));
        let ffn = l.swiglu(x, w.get(FFN_GATE_SHEXP), w.get(FFN_UP_SHEXP), w.get(FFN_DOWN_SHEXP));
        out.shared = Some(l.ctx.mul(ffn, gate));
        out
    }

    fn chat_template(&self) -> &'static str {
        super::qwen3moe::CHATML
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("qwen1.5-moe-a2.7b", include_str!("../../configs/qwen1.5-moe-a2.7b.config.json")),
        ]
    }
}
