//! Qwen3.5-MoE (`Qwen3_5MoeForConditionalGeneration` → llama.cpp's `qwen35moe`): a hybrid of
//! Gated-DeltaNet linear-attention layers (a recurrent state, `engine::memory`) and gated full
//! attention, three to one (`layer_types`, or `full_attention_interval`). The full layers:
//! q projected with an output gate per head (sigmoid(gate) multiplies the heads' output), RMS
//! norms on q and k per head, interleaved M-RoPE on the first quarter of each head (text
//! positions are equal in every component). The linear layers: separate q/k/v, z, beta and
//! alpha projections (`graph::LayerInput::delta_net`). Every RMSNorm but the linear
//! attention's gated one is zero-centred (x · (1 + w)): llama.cpp's converter adds the 1, and
//! so does sage's. The router takes softmax, the top k and renormalizes them; a shared expert
//! scaled by sigmoid(`shared_expert_gate` · x) in every layer, always resident in the base.
//!
//! The published checkpoints are vision-language: the text model lies under
//! `model.language_model.`, its hyperparameters under `text_config`; the vision tower
//! (`model.visual.`) and the next-token-prediction layers (`mtp.`) are skipped. Value heads
//! are grouped by key head in the checkpoint and reordered to llama.cpp's tiled order
//! (`FromHf::VHeadRows`). Tokenizer: byte-level BPE with Qwen3.5's split (llama.cpp:
//! `qwen35`); the fixtures use Qwen2's.

use super::{Arch, FromHf, HfLayout, Role, TensorSpec, ValueMap};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig, Ssm};
use crate::error::Result;
use crate::ggml::{GgufArray, GgufValue, ROPE_TYPE_IMROPE};
use crate::graph::{Attention, LayerInput, PreMoe};
use crate::names::*;

pub struct Qwen35Moe;

/// The text model of the vision-language checkpoint.
const VL: HfLayout = HfLayout {
    model_prefix: "model.language_model.",
    lm_head: "lm_head.weight",
    config_path: &["text_config"],
    keep: &["model.language_model.", "lm_head."],
};

/// A text-only checkpoint: everything but the next-token-prediction layers.
const TEXT: HfLayout = HfLayout { keep: &["model.", "lm_head."], ..HfLayout::PLAIN };

/// Hugging Face names of a zero-centred norm, and how its weight becomes llama.cpp's.
pub(crate) const ADD_ONE: FromHf = FromHf::Values { map: ValueMap::AddOne, v_heads: None };

/// transformers' default M-RoPE sections of Qwen3.5 (`mrope_section`), as llama.cpp's
/// converter writes them when a checkpoint has none.
const DEFAULT_SECTIONS: [i32; 4] = [11, 11, 10, 0];

/// The hybrid families' hyperparameters beyond the common ones, read alike from a
/// `config.json` (Qwen3.5 and Qwen3-Next spell them the same): the layer pattern, the
/// linear attention's sizes, partial RoPE, the FFN widths.
pub(crate) fn hybrid_hparams(c: &HfConfig, cfg: &mut ModelConfig) -> Result<()> {
    if c.bool_or(&["attention_bias"], false)? {
        return Err(c.err(&["attention_bias"], "attention biases are not supported"));
    }
    let n_layer = cfg.n_layer;
    cfg.recurrent_layers = match c.layer_types(n_layer, "linear_attention")? {
        Some(types) => types,
        None => {
            let every = c.size_or("full_attention_interval", &["full_attention_interval"], 4)?;
            (0..n_layer as u64).map(|i| (i + 1) % every != 0).collect()
        }
    };
    let (hk, hv) = (c.size("d_state", &["linear_key_head_dim"])?, c.size("d_state", &["linear_value_head_dim"])?);
    if hk != hv {
        return Err(c.err(
            &["linear_value_head_dim"],
            format!("key heads of {hk} and value heads of {hv}: llama.cpp's gated delta rule needs them equal"),
        ));
    }
    let n_group = c.size_u32("n_head", &["linear_num_key_heads"])?;
    let dt_rank = c.size_u32("n_head", &["linear_num_value_heads"])?;
    if !dt_rank.is_multiple_of(n_group) {
        return Err(c.err(
            &["linear_num_value_heads"],
            format!("{dt_rank} value heads are not a multiple of {n_group} key heads"),
        ));
    }
    let d_conv = c.size("d_conv", &["linear_conv_kernel_dim"])?;
    if d_conv < 2 {
        return Err(c.err(&["linear_conv_kernel_dim"], format!("expected at least 2, got {d_conv}")));
    }
    cfg.ssm = Some(Ssm { d_conv, d_state: hk, n_group, dt_rank });
    cfg.n_rot = c.partial_rotary(cfg.head_dim, 0.25)?;
    cfg.n_ff = c.get(&["intermediate_size"]).and_then(|v| v.as_u64()).unwrap_or(0);
    cfg.n_ff_exp = c.size("n_ff_exp", &["moe_intermediate_size"])?;
    cfg.n_ff_shexp = c.size("n_ff_shexp", &["shared_expert_intermediate_size"])?;
    Ok(())
}

/// The same from llama.cpp's `<arch>.*` keys.
pub(crate) fn hybrid_gguf(k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
    cfg.n_ff_exp = k.u64(K_EXPERT_FEED_FORWARD_LENGTH)?;
    cfg.n_ff_shexp = k.opt_u64(K_EXPERT_SHARED_FEED_FORWARD_LENGTH)?.unwrap_or(cfg.n_ff);
    let d_state = k.u64(K_SSM_STATE_SIZE)?;
    let ssm = Ssm {
        d_conv: k.u64(K_SSM_CONV_KERNEL)?,
        d_state,
        n_group: k.u32(K_SSM_GROUP_COUNT)?,
        dt_rank: k.u32(K_SSM_TIME_STEP_RANK)?,
    };
    let inner = k.u64(K_SSM_INNER_SIZE)?;
    if ssm.d_conv < 2 || ssm.n_group == 0 || !ssm.dt_rank.is_multiple_of(ssm.n_group) || inner != ssm.d_inner() || d_state == 0
    {
        return Err(k.err(
            K_SSM_INNER_SIZE,
            "a convolution of 2 or more, value heads a multiple of key heads, inner size = state size x value heads",
            &format!("{ssm:?}, inner size {inner}"),
        ));
    }
    if d_state > 1 << 12 || ssm.dt_rank > 1 << 12 || ssm.d_conv > 64 {
        return Err(k.err(K_SSM_STATE_SIZE, "a state size and value heads <= 4096, a convolution <= 64", &format!("{ssm:?}")));
    }
    cfg.ssm = Some(ssm);
    cfg.recurrent_layers = match k.g.get(&k.key(K_RECURRENT_LAYERS)) {
        Some(GgufValue::Array(GgufArray::Bool(a))) if a.len() == cfg.n_layer as usize => a,
        Some(v) => return Err(k.err(K_RECURRENT_LAYERS, &format!("{} booleans", cfg.n_layer), &format!("{v:?}"))),
        None => {
            let every = k.opt_u64(K_FULL_ATTENTION_INTERVAL)?.unwrap_or(4);
            if every == 0 {
                return Err(k.err(K_FULL_ATTENTION_INTERVAL, "a positive interval", "0"));
            }
            (0..cfg.n_layer as u64).map(|i| (i + 1) % every != 0).collect()
        }
    };
    // llama.cpp's qwen35moe and qwen3next graphs always renormalize the top k.
    cfg.norm_topk_prob = true;
    Ok(())
}

/// The families' own keys: FFN widths, the linear attention's sizes, the layer pattern.
pub(crate) fn hybrid_kv(arch: &str, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
    let k = |s: &str| arch_key(arch, s);
    let s = cfg.ssm.expect("a hybrid model has linear-attention sizes");
    if cfg.n_ff > 0 {
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
    }
    kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
    kv.push((k(K_EXPERT_SHARED_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_shexp as u32)));
    kv.push((k(K_SSM_CONV_KERNEL), GgufValue::U32(s.d_conv as u32)));
    kv.push((k(K_SSM_STATE_SIZE), GgufValue::U32(s.d_state as u32)));
    kv.push((k(K_SSM_GROUP_COUNT), GgufValue::U32(s.n_group)));
    kv.push((k(K_SSM_TIME_STEP_RANK), GgufValue::U32(s.dt_rank)));
    kv.push((k(K_SSM_INNER_SIZE), GgufValue::U32(s.d_inner() as u32)));
    // An interval where the layers follow one (llama.cpp's converter writes one), else the
    // flags.
    let n = cfg.recurrent_layers.len() as u64;
    match (1..=n + 1).find(|&every| (0..n).all(|i| cfg.recurrent_layers[i as usize] == ((i + 1) % every != 0))) {
        Some(every) => kv.push((k(K_FULL_ATTENTION_INTERVAL), GgufValue::U32(every as u32))),
        None => kv.push((k(K_RECURRENT_LAYERS), GgufValue::Array(GgufArray::Bool(cfg.recurrent_layers.clone())))),
    }
}

impl Arch for Qwen35Moe {
    fn name(&self) -> &'static str {
        "qwen35moe"
    }

    fn family(&self) -> &'static str {
        "Qwen3.5-MoE"
    }

    fn gguf_arch(&self) -> &'static str {
        "qwen35moe"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM", "qwen3_5_moe", "qwen3_5_moe_text"]
    }

    fn hf_layout(&self, hf_arch: &str) -> HfLayout {
        if hf_arch == "Qwen3_5MoeForConditionalGeneration" || hf_arch == "qwen3_5_moe" {
            VL
        } else {
            TEXT
        }
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-6, rope_theta: 10000000.0, yarn: false })?;
        hybrid_hparams(c, &mut cfg)?;
        let sections = match c.get(&["rope_parameters"]).and_then(|r| r.get("mrope_section")) {
            None => DEFAULT_SECTIONS,
            Some(v) => {
                let a: Option<Vec<i32>> =
                    v.as_array().and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as i32)).collect());
                match a {
                    Some(a) if (1..=4).contains(&a.len()) => {
                        let mut s = [0i32; 4];
                        s[..a.len()].copy_from_slice(&a);
                        s
                    }
                    _ => return Err(c.err(&["rope_parameters.mrope_section"], format!("expected 3 sizes, got {v}"))),
                }
            }
        };
        if sections.iter().sum::<i32>() as u64 * 2 != cfg.n_rot {
            return Err(c.err(
                &["rope_parameters.mrope_section"],
                format!("{sections:?} cover {} rotated dimensions, RoPE rotates {}", 2 * sections.iter().sum::<i32>(), cfg.n_rot),
            ));
        }
        cfg.rope_sections = Some(sections);
        // Qwen3.5's router always renormalizes the chosen experts' weights.
        cfg.norm_topk_prob = true;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        hybrid_gguf(k, cfg)?;
        let sections = match k.g.get(&k.key(K_ROPE_DIMENSION_SECTIONS)) {
            Some(GgufValue::Array(GgufArray::I32(a))) if a.len() == 4 => [a[0], a[1], a[2], a[3]],
            Some(GgufValue::Array(GgufArray::U32(a))) if a.len() == 4 => [a[0] as i32, a[1] as i32, a[2] as i32, a[3] as i32],
            Some(v) => return Err(k.err(K_ROPE_DIMENSION_SECTIONS, "4 section sizes", &format!("{v:?}"))),
            None => return Err(k.err(K_ROPE_DIMENSION_SECTIONS, "4 section sizes", "nothing")),
        };
        if sections.iter().any(|&s| s < 0) || sections.iter().sum::<i32>() as u64 * 2 > cfg.n_rot.max(1) * 2 {
            return Err(k.err(K_ROPE_DIMENSION_SECTIONS, "sizes that fit the rotated dimensions", &format!("{sections:?}")));
        }
        cfg.rope_sections = Some(sections);
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        hybrid_kv(self.gguf_arch(), cfg, kv);
        let s = cfg.rope_sections.unwrap_or(DEFAULT_SECTIONS);
        kv.push((arch_key(self.gguf_arch(), K_ROPE_DIMENSION_SECTIONS), GgufValue::Array(GgufArray::I32(s.to_vec()))));
        // llama.cpp's converter always writes the rotated dimensions.
        kv.push((arch_key(self.gguf_arch(), K_ROPE_DIMENSION_COUNT), GgufValue::U32(cfg.n_rot as u32)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        hybrid_layer_tensors(cfg, il, linear_attention_tensors)
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let (w, ctx, cfg) = (&l.w, l.ctx, l.cfg);
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let mut out = if cfg.is_recurrent(l.w.il) {
            let qkv = ctx.mul_mat(w.get(ATTN_QKV), cur);
            let z = ctx.mul_mat(w.get(ATTN_GATE), cur);
            let beta = ctx.mul_mat(w.get(SSM_BETA), cur);
            let alpha = ctx.mul_mat(w.get(SSM_ALPHA), cur);
            l.delta_net(qkv, z, beta, alpha, false)
        } else {
            gated_attention(l, cur, |t| l.rope_multi(t, ROPE_TYPE_IMROPE))
        };
        out.shared = Some(shared_expert(l, out.normed));
        out
    }

    fn output_norm_from_hf(&self) -> FromHf {
        ADD_ONE
    }

    fn gpt2_pre(&self) -> &'static str {
        "qwen35"
    }

    fn chat_template(&self) -> &'static str {
        super::qwen3moe::CHATML
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("qwen3.5-35b-a3b", include_str!("../../configs/qwen3.5-35b-a3b.config.json")),
            ("qwen3.5-122b-a10b", include_str!("../../configs/qwen3.5-122b-a10b.config.json")),
            ("qwen3.5-397b-a17b", include_str!("../../configs/qwen3.5-397b-a17b.config.json")),
        ]
    }
}

/// A hybrid layer's base tensors (Qwen3.5 and Qwen3-Next name them alike): the input norm;
/// for a linear-attention layer the family's own (`linear`), for a full one the gated
/// attention's (q with its output gate, k, v, o, q/k norms); the post-attention norm, the
/// router and the shared expert. Every norm but the linear attention's is zero-centred.
pub(crate) fn hybrid_layer_tensors(
    cfg: &ModelConfig,
    il: u32,
    linear: fn(&ModelConfig, u32) -> Vec<TensorSpec>,
) -> Vec<TensorSpec> {
    let e = cfg.n_embd;
    let hf = |s: &str| format!("layers.{{il}}.{s}");
    let mut t = vec![TensorSpec::layer(il, ATTN_NORM, &[e], Role::Norm, &[&hf("input_layernorm.weight")]).with(ADD_ONE)];
    if cfg.is_recurrent(il) {
        t.extend(linear(cfg, il));
    } else {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head as u64, cfg.n_head_kv as u64);
        t.extend([
            // q and its output gate, per head: [q (hd), gate (hd)] × heads.
            TensorSpec::layer(il, ATTN_Q, &[e, 2 * hd * nh], Role::Weight, &[&hf("self_attn.q_proj.weight")]),
            TensorSpec::layer(il, ATTN_K, &[e, hd * nkv], Role::Weight, &[&hf("self_attn.k_proj.weight")]),
            TensorSpec::layer(il, ATTN_V, &[e, hd * nkv], Role::Weight, &[&hf("self_attn.v_proj.weight")]),
            TensorSpec::layer(il, ATTN_OUT, &[hd * nh, e], Role::Weight, &[&hf("self_attn.o_proj.weight")]),
            TensorSpec::layer(il, ATTN_Q_NORM, &[hd], Role::Norm, &[&hf("self_attn.q_norm.weight")]).with(ADD_ONE),
            TensorSpec::layer(il, ATTN_K_NORM, &[hd], Role::Norm, &[&hf("self_attn.k_norm.weight")]).with(ADD_ONE),
        ]);
    }
    t.push(
        TensorSpec::layer(il, ATTN_POST_NORM, &[e], Role::Norm, &[&hf("post_attention_layernorm.weight")]).with(ADD_ONE),
    );
    t.extend(shared_expert_tensors(cfg, il));
    t
}

/// A hybrid's gated full attention over `cur` (the normed input), as llama.cpp's qwen35moe and
/// qwen3next graphs compute it: q and its per-head output gate from one projection, RMS norms
/// on q and k per head, `rope` on both, sigmoid(gate) on the heads' output.
pub(crate) fn gated_attention<'a>(
    l: &LayerInput<'a>,
    cur: crate::ggml::Tensor<'a>,
    rope: impl Fn(crate::ggml::Tensor<'a>) -> crate::ggml::Tensor<'a>,
) -> PreMoe<'a> {
    let (w, ctx, cfg) = (&l.w, l.ctx, l.cfg);
    let (hd, nh) = (cfg.head_dim as i64, cfg.n_head as i64);
    let qg = ctx.mul_mat(w.get(ATTN_Q), cur); // [2 hd nh, n]
    let n = qg.ne()[1];
    let es = qg.nb()[0];
    let per_head = (2 * hd) as usize * es;
    let q = ctx.view_3d(qg, [hd, nh, n], per_head, per_head * nh as usize, 0);
    let gate = ctx.cont_2d(ctx.view_3d(qg, [hd, nh, n], per_head, per_head * nh as usize, hd as usize * es), hd * nh, n);
    let q = l.norm(q, w.get(ATTN_Q_NORM));
    let k = l.norm(l.heads(ctx.mul_mat(w.get(ATTN_K), cur)), w.get(ATTN_K_NORM));
    let v = ctx.mul_mat(w.get(ATTN_V), cur);
    l.attend_with(rope(q), rope(k), v, Attention { o_gate: Some(gate), ..Default::default() })
}

/// The shared expert and its gate (Qwen3.5 and Qwen3-Next name them alike).
pub(crate) fn shared_expert_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    let (e, f) = (cfg.n_embd, cfg.n_ff_shexp);
    vec![
        TensorSpec::layer(il, FFN_GATE_INP, &[e, cfg.n_expert as u64], Role::Router, &["layers.{il}.mlp.gate.weight"]),
        TensorSpec::layer(il, FFN_GATE_INP_SHEXP, &[e], Role::Router, &["layers.{il}.mlp.shared_expert_gate.weight"]),
        TensorSpec::layer(il, FFN_GATE_SHEXP, &[e, f], Role::Weight, &["layers.{il}.mlp.shared_expert.gate_proj.weight"]),
        TensorSpec::layer(il, FFN_UP_SHEXP, &[e, f], Role::Weight, &["layers.{il}.mlp.shared_expert.up_proj.weight"]),
        TensorSpec::layer(il, FFN_DOWN_SHEXP, &[f, e], Role::Weight, &["layers.{il}.mlp.shared_expert.down_proj.weight"]),
    ]
}

/// The shared expert over what the routed experts see, scaled by sigmoid(its gate · x), as
/// llama.cpp's qwen35moe and qwen3next graphs compute it.
pub(crate) fn shared_expert<'a>(l: &LayerInput<'a>, x: crate::ggml::Tensor<'a>) -> crate::ggml::Tensor<'a> {
    let (w, ctx) = (&l.w, l.ctx);
    let ffn = l.swiglu(x, w.get(FFN_GATE_SHEXP), w.get(FFN_UP_SHEXP), w.get(FFN_DOWN_SHEXP));
    let gate = ctx.sigmoid(ctx.mul_mat(w.get(FFN_GATE_INP_SHEXP), x));
    ctx.mul(ffn, gate)
}

/// Qwen3.5's linear-attention tensors of layer `il`, value heads reordered to tiled.
fn linear_attention_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    let s = cfg.ssm.expect("a hybrid model has linear-attention sizes");
    let e = cfg.n_embd;
    let (n_k, per_k) = (s.n_group, s.dt_rank / s.n_group);
    let key_dim = s.d_state * s.n_group as u64;
    let (vd, nv) = (s.d_inner(), s.dt_rank as u64);
    let hf = |p: &str| format!("layers.{{il}}.linear_attn.{p}");
    let rows = |head: u64, skip: u64| FromHf::VHeadRows { n_k, per_k, head, skip };
    let per_head = FromHf::Values { map: ValueMap::Same, v_heads: Some((n_k, per_k)) };
    vec![
        TensorSpec::layer(il, ATTN_QKV, &[e, 2 * key_dim + vd], Role::Weight, &[&hf("in_proj_qkv.weight")])
            .with(rows(s.d_state, 2 * key_dim)),
        TensorSpec::layer(il, ATTN_GATE, &[e, vd], Role::Weight, &[&hf("in_proj_z.weight")]).with(rows(s.d_state, 0)),
        TensorSpec::layer(il, SSM_CONV1D, &[s.d_conv, 2 * key_dim + vd], Role::Norm, &[&hf("conv1d.weight")])
            .with(rows(s.d_state, 2 * key_dim)),
        TensorSpec::layer(il, SSM_DT, &[nv], Role::Bias, &[&hf("dt_bias")]).with(per_head),
        TensorSpec::layer(il, SSM_A, &[nv], Role::Norm, &[&hf("A_log")])
            .with(FromHf::Values { map: ValueMap::NegExp, v_heads: Some((n_k, per_k)) }),
        TensorSpec::layer(il, SSM_BETA, &[e, nv], Role::Weight, &[&hf("in_proj_b.weight")]).with(rows(1, 0)),
        TensorSpec::layer(il, SSM_ALPHA, &[e, nv], Role::Weight, &[&hf("in_proj_a.weight")]).with(rows(1, 0)),
        TensorSpec::layer(il, SSM_NORM, &[s.d_state], Role::Norm, &[&hf("norm.weight")]),
        TensorSpec::layer(il, SSM_OUT, &[vd, e], Role::Weight, &[&hf("out_proj.weight")])
            .with(FromHf::VHeadCols { n_k, per_k, head: s.d_state }),
    ]
}
