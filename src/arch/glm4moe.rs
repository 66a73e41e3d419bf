//! GLM-4.5, GLM-4.6 and GLM-4.5-Air (`Glm4MoeForCausalLM` → llama.cpp's `glm4moe`): GQA with
//! biases on q, k and v, optional per-head q/k RMS norms (`use_qk_norm`: GLM-4.5 has them,
//! Air not), NEOX RoPE on the first `partial_rotary_factor` of each head; the first
//! `first_k_dense_replace` layers have a dense SwiGLU FFN, the others routed experts beside an
//! ungated shared expert (`n_shared_experts` × `moe_intermediate_size` wide), both in the base.
//! The router scores with a sigmoid, chooses with `e_score_correction_bias` added, by groups
//! (`n_group`, `topk_group`), renormalizes (`norm_topk_prob`) and scales the weights
//! (`routed_scaling_factor`): `config::Gating`. The next-token-prediction layer
//! (`num_nextn_predict_layers`, stored as the layers after the last) is skipped at conversion
//! and named; a llama.cpp GGUF's is ignored. GLM byte-level BPE (`glm4` pre-tokenizer).

use super::{Arch, Role, TensorSpec};
use crate::config::{Gating, GatingFunc, GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct Glm4Moe;

/// GLM-4.5's chat template, reduced to messages (tools and reasoning come with the model's own
/// template, in its tokenizer_config.json).
const GLM4_TEMPLATE: &str = "[gMASK]<sop>{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

impl Arch for Glm4Moe {
    fn name(&self) -> &'static str {
        "glm4moe"
    }

    fn family(&self) -> &'static str {
        "GLM-4.5"
    }

    fn gguf_arch(&self) -> &'static str {
        "glm4moe"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["Glm4MoeForCausalLM", "glm4_moe"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-5, rope_theta: 10000.0, yarn: false })?;
        cfg.n_rot = c.partial_rotary(cfg.head_dim, 0.5)?;
        dense_lead_and_ffn_hf(c, &mut cfg, 1)?;
        cfg.norm_topk_prob = c.bool_or(&["norm_topk_prob"], true)?;
        cfg.qk_norm = c.bool_or(&["use_qk_norm"], false)?;
        cfg.gating = gating_hf(c, cfg.n_expert, cfg.n_expert_used)?;
        if !c.bool_or(&["attention_bias"], false)? {
            return Err(c.err(&["attention_bias"], "GLM-4.5's q/k/v biases are expected (llama.cpp's glm4moe has them)"));
        }
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        // llama.cpp counts the next-token-prediction layers in block_count.
        let nextn = k.opt_u64(K_NEXTN_PREDICT_LAYERS)?.unwrap_or(0) as u32;
        if nextn >= cfg.n_layer {
            return Err(k.err(K_NEXTN_PREDICT_LAYERS, "fewer than block_count", &nextn.to_string()));
        }
        cfg.n_layer -= nextn;
        cfg.n_ff_exp = k.u64(K_EXPERT_FEED_FORWARD_LENGTH)?;
        cfg.n_ff_shexp = cfg.n_ff_exp * k.opt_u64(K_EXPERT_SHARED_COUNT)?.unwrap_or(1);
        cfg.n_layer_dense_lead = k.opt_u64(K_LEADING_DENSE_BLOCK_COUNT)?.unwrap_or(0) as u32;
        if cfg.n_layer_dense_lead >= cfg.n_layer {
            return Err(k.err(K_LEADING_DENSE_BLOCK_COUNT, "fewer than the layers", &cfg.n_layer_dense_lead.to_string()));
        }
        cfg.norm_topk_prob = k.opt_bool(K_EXPERT_WEIGHTS_NORM) == Some(true);
        cfg.qk_norm = k.g.find_tensor(&blk(0, ATTN_Q_NORM)).is_some();
        cfg.gating = gating_gguf(k, cfg, GatingFunc::Sigmoid)?;
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
        kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_EXPERT_SHARED_COUNT), GgufValue::U32((cfg.n_ff_shexp / cfg.n_ff_exp.max(1)) as u32)));
        kv.push((k(K_LEADING_DENSE_BLOCK_COUNT), GgufValue::U32(cfg.n_layer_dense_lead)));
        kv.push((k(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(cfg.norm_topk_prob)));
        gating_kv(cfg, kv, self.gguf_arch());
        // No next-token-prediction layers are kept.
        kv.push((k(K_NEXTN_PREDICT_LAYERS), GgufValue::U32(0)));
        // llama.cpp's glm4moe always writes the rotated dimensions.
        if cfg.n_rot == cfg.head_dim {
            kv.push((k(K_ROPE_DIMENSION_COUNT), GgufValue::U32(cfg.n_rot as u32)));
        }
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let e = cfg.n_embd;
        let hd = cfg.head_dim;
        let q = cfg.n_head as u64 * hd;
        let kv = cfg.n_head_kv as u64 * hd;
        let l = |suffix, ne: &[u64], role, hf: &str| TensorSpec::layer(il, suffix, ne, role, &[hf]);
        let mut t = vec![
            l(ATTN_NORM, &[e], Role::Norm, "layers.{il}.input_layernorm.weight"),
            l(ATTN_Q, &[e, q], Role::Weight, "layers.{il}.self_attn.q_proj.weight"),
            l(ATTN_K, &[e, kv], Role::Weight, "layers.{il}.self_attn.k_proj.weight"),
            l(ATTN_V, &[e, kv], Role::Weight, "layers.{il}.self_attn.v_proj.weight"),
            l(ATTN_Q_BIAS, &[q], Role::Bias, "layers.{il}.self_attn.q_proj.bias"),
            l(ATTN_K_BIAS, &[kv], Role::Bias, "layers.{il}.self_attn.k_proj.bias"),
            l(ATTN_V_BIAS, &[kv], Role::Bias, "layers.{il}.self_attn.v_proj.bias"),
            l(ATTN_OUT, &[q, e], Role::Weight, "layers.{il}.self_attn.o_proj.weight"),
        ];
        if cfg.qk_norm {
            t.push(l(ATTN_Q_NORM, &[hd], Role::Norm, "layers.{il}.self_attn.q_norm.weight"));
            t.push(l(ATTN_K_NORM, &[hd], Role::Norm, "layers.{il}.self_attn.k_norm.weight"));
        }
        t.push(l(ATTN_POST_NORM, &[e], Role::Norm, "layers.{il}.post_attention_layernorm.weight"));
        t.extend(ffn_tensors(cfg, il));
        t
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let w = &l.w;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let qk = |proj, bias, norm| {
            let t = l.heads(l.proj(w.get(proj), w.opt(bias), cur));
            let t = match w.opt(norm) {
                Some(n) => l.norm(t, n),
                None => t,
            };
            l.rope(t, ROPE_NEOX)
        };
        let q = qk(ATTN_Q, ATTN_Q_BIAS, ATTN_Q_NORM);
        let k = qk(ATTN_K, ATTN_K_BIAS, ATTN_K_NORM);
        let v = l.proj(w.get(ATTN_V), w.opt(ATTN_V_BIAS), cur);
        let mut out = l.attend(q, k, v);
        out.shared = Some(dense_or_shared_ffn(l, out.normed));
        out
    }

    fn gpt2_pre(&self) -> &'static str {
        "glm4"
    }

    fn chat_template(&self) -> &'static str {
        GLM4_TEMPLATE
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("glm-4.5", include_str!("../../configs/glm-4.5.config.json")),
            ("glm-4.5-air", include_str!("../../configs/glm-4.5-air.config.json")),
        ]
    }
}

/// `first_k_dense_replace` (`default` where absent, fewer than the layers), the dense FFN's
/// width (`intermediate_size`, needed only with dense layers), the experts' and the shared
/// experts' (`n_shared_experts` × `moe_intermediate_size`), from a config.json.
pub(crate) fn dense_lead_and_ffn_hf(c: &HfConfig, cfg: &mut ModelConfig, default: u32) -> Result<()> {
    let n_layer = cfg.n_layer;
    cfg.n_layer_dense_lead = c.get(&["first_k_dense_replace"]).map_or(Ok(default), |v| {
        v.as_u64()
            .filter(|&n| n < n_layer as u64)
            .map(|n| n as u32)
            .ok_or_else(|| c.err(&["first_k_dense_replace"], format!("expected 0 to {}, got {v}", n_layer - 1)))
    })?;
    cfg.n_ff = if cfg.n_layer_dense_lead > 0 {
        c.size("n_ff", &["intermediate_size"])?
    } else {
        c.get(&["intermediate_size"]).and_then(|v| v.as_u64()).unwrap_or(0)
    };
    cfg.n_ff_exp = c.size("n_ff_exp", &["moe_intermediate_size"])?;
    cfg.n_ff_shexp = cfg.n_ff_exp * c.size_or("n_ff_shexp", &["n_shared_experts"], 1)?;
    Ok(())
}

/// A layer's FFN tensors in the base: a dense layer's FFN, else the router (with its
/// correction bias where the model chooses with one) and the ungated shared experts.
pub(crate) fn ffn_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    if cfg.is_dense(il) {
        return dense_ffn_tensors(cfg, il);
    }
    let (e, f) = (cfg.n_embd, cfg.n_ff_shexp);
    let l = |suffix, ne: &[u64], hf: &str| TensorSpec::layer(il, suffix, ne, Role::Weight, &[hf]);
    let mut t = moe_router_tensors(cfg, il);
    t.extend([
        l(FFN_GATE_SHEXP, &[e, f], "layers.{il}.mlp.shared_experts.gate_proj.weight"),
        l(FFN_UP_SHEXP, &[e, f], "layers.{il}.mlp.shared_experts.up_proj.weight"),
        l(FFN_DOWN_SHEXP, &[f, e], "layers.{il}.mlp.shared_experts.down_proj.weight"),
    ]);
    t
}

/// A dense layer's SwiGLU FFN tensors (`mlp.{gate,up,down}_proj`, `intermediate_size` wide).
pub(crate) fn dense_ffn_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    let (e, f) = (cfg.n_embd, cfg.n_ff);
    vec![
        TensorSpec::layer(il, FFN_GATE, &[e, f], Role::Weight, &["layers.{il}.mlp.gate_proj.weight"]),
        TensorSpec::layer(il, FFN_UP, &[e, f], Role::Weight, &["layers.{il}.mlp.up_proj.weight"]),
        TensorSpec::layer(il, FFN_DOWN, &[f, e], Role::Weight, &["layers.{il}.mlp.down_proj.weight"]),
    ]
}

/// The router of a MoE layer (`mlp.gate`) and, where the model chooses with one, its
/// correction bias (`mlp.gate.e_score_correction_bias`).
pub(crate) fn moe_router_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    let (e, n) = (cfg.n_embd, cfg.n_expert as u64);
    let mut t = vec![TensorSpec::layer(il, FFN_GATE_INP, &[e, n], Role::Router, &["layers.{il}.mlp.gate.weight"])];
    if cfg.gating.selection_bias {
        t.push(TensorSpec::layer(
            il,
            FFN_EXP_PROBS_B,
            &[n],
            Role::Bias,
            &["layers.{il}.mlp.gate.e_score_correction_bias"],
        ));
    }
    t
}

/// Beside the routed experts: a dense layer's FFN (its whole FFN), else the ungated shared
/// expert, over what the experts see.
pub(crate) fn dense_or_shared_ffn<'a>(l: &LayerInput<'a>, x: crate::ggml::Tensor<'a>) -> crate::ggml::Tensor<'a> {
    let w = &l.w;
    if l.cfg.is_dense(w.il) {
        l.swiglu(x, w.get(FFN_GATE), w.get(FFN_UP), w.get(FFN_DOWN))
    } else {
        l.swiglu(x, w.get(FFN_GATE_SHEXP), w.get(FFN_UP_SHEXP), w.get(FFN_DOWN_SHEXP))
    }
}

/// The sigmoid router with correction bias and groups (DeepSeek-V3's and GLM-4.5's
/// `noaux_tc`) from a config.json: `n_group`, `topk_group`, `routed_scaling_factor`.
pub(crate) fn gating_hf(c: &HfConfig, n_expert: u32, k: u32) -> Result<Gating> {
    let n_group = c.size_or("n_expert", &["n_group"], 1)? as u32;
    let used = c.size_or("n_expert", &["topk_group"], 1)? as u32;
    let held = used as u64 * (n_expert / n_group) as u64;
    if !n_expert.is_multiple_of(n_group) || used > n_group || held < k as u64 {
        return Err(c.err(
            &["n_group", "topk_group"],
            format!("{n_expert} experts in {n_group} groups, {used} kept, must hold the {k} chosen per token"),
        ));
    }
    let scale = c.f64_or(&["routed_scaling_factor"], 1.0)? as f32;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(c.err(&["routed_scaling_factor"], format!("expected a positive number, got {scale}")));
    }
    // Keeping every group is no grouping (and llama.cpp refuses to keep every group).
    let (n_group, used) = if used == n_group { (1, 1) } else { (n_group, used) };
    Ok(Gating { func: GatingFunc::Sigmoid, selection_bias: true, n_group, n_group_used: used, scale })
}

/// The router's GGUF keys (`expert_gating_func`, `expert_weights_scale`, groups), with
/// `default` where the file names no gating function (llama.cpp's default per family).
pub(crate) fn gating_gguf(k: &GgufKeys, cfg: &ModelConfig, default: GatingFunc) -> Result<Gating> {
    let func = match k.opt_u64(K_EXPERT_GATING_FUNC)? {
        None | Some(0) => default,
        Some(1) => GatingFunc::Softmax,
        Some(2) => GatingFunc::Sigmoid,
        Some(n) => return Err(k.err(K_EXPERT_GATING_FUNC, "1 (softmax) or 2 (sigmoid)", &n.to_string())),
    };
    let n_group = k.opt_u64(K_EXPERT_GROUP_COUNT)?.unwrap_or(1).max(1) as u32;
    let used = k.opt_u64(K_EXPERT_GROUP_USED_COUNT)?.unwrap_or(1).max(1) as u32;
    let held = used as u64 * (cfg.n_expert / n_group) as u64;
    if n_group > 1 && (!cfg.n_expert.is_multiple_of(n_group) || used > n_group || held < cfg.n_expert_used as u64) {
        return Err(k.err(
            K_EXPERT_GROUP_COUNT,
            "groups that divide the experts and keep at least the experts used",
            &format!("{n_group} groups of {} experts, {used} kept", cfg.n_expert),
        ));
    }
    let scale = match k.f32_or(K_EXPERT_WEIGHTS_SCALE, Some(0.0))? {
        0.0 => 1.0,
        s if s.is_finite() && s > 0.0 => s,
        s => return Err(k.err(K_EXPERT_WEIGHTS_SCALE, "a positive number", &s.to_string())),
    };
    // llama.cpp takes the bias where the file has the tensors; sage's families declare it.
    Ok(Gating { func, selection_bias: true, n_group, n_group_used: used, scale })
}

/// The router's GGUF keys, as llama.cpp's converter writes them.
pub(crate) fn gating_kv(cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>, arch: &str) {
    let k = |s: &str| arch_key(arch, s);
    let g = cfg.gating;
    kv.push((k(K_EXPERT_GATING_FUNC), GgufValue::U32(g.func.llama())));
    kv.push((k(K_EXPERT_WEIGHTS_SCALE), GgufValue::F32(g.scale)));
    if g.grouped() {
        kv.push((k(K_EXPERT_GROUP_COUNT), GgufValue::U32(g.n_group)));
        kv.push((k(K_EXPERT_GROUP_USED_COUNT), GgufValue::U32(g.n_group_used)));
    }
}
