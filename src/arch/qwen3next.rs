//! Qwen3-Next (`Qwen3NextForCausalLM` → llama.cpp's `qwen3next`): the hybrid of Qwen3.5-MoE
//! (`qwen35moe`, whose module has what the two share) with the linear attention's projections
//! fused: `in_proj_qkvz` (q, k, v and z per key head; llama.cpp's converter splits it into the
//! q/k/v projection and the gate, `FromHf::QkvzSplit`) and `in_proj_ba` (beta and alpha per
//! key head, kept whole and split in the graph). Value heads stay grouped by key head, so q
//! and k are repeated per key head before the delta rule. Full attention: gated as Qwen3.5's,
//! NEOX RoPE on the first quarter of each head (`partial_rotary_factor`). Text only; the
//! next-token-prediction layers (`mtp.`) are skipped.

use super::qwen35moe::{gated_attention, ADD_ONE, hybrid_gguf, hybrid_hparams, hybrid_kv, hybrid_layer_tensors, shared_expert};
use super::{Arch, FromHf, HfLayout, Role, TensorSpec, ValueMap};
use crate::config::{GgufKeys, HfConfig, HfDefaults, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NEOX};
use crate::names::*;

pub struct Qwen3Next;

impl Arch for Qwen3Next {
    fn name(&self) -> &'static str {
        "qwen3next"
    }

    fn family(&self) -> &'static str {
        "Qwen3-Next"
    }

    fn gguf_arch(&self) -> &'static str {
        "qwen3next"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["Qwen3NextForCausalLM", "qwen3_next"]
    }

    fn hf_layout(&self, _hf_arch: &str) -> HfLayout {
        HfLayout { keep: &["model.", "lm_head."], ..HfLayout::PLAIN }
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        c.only("decoder_sparse_step", |v| v.as_u64() == Some(1), "only 1 (every layer MoE) is supported")?;
        c.only("mlp_only_layers", |v| v.as_array().is_some_and(|a| a.is_empty()), "dense layers are not supported")?;
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-6, rope_theta: 10000.0, yarn: false })?;
        hybrid_hparams(c, &mut cfg)?;
        // llama.cpp's qwen3next graph always renormalizes the top k.
        if !c.bool_or(&["norm_topk_prob"], true)? {
            return Err(c.err(&["norm_topk_prob"], "false is not supported: llama.cpp's qwen3next always renormalizes"));
        }
        cfg.norm_topk_prob = true;
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        hybrid_gguf(k, cfg)
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        hybrid_kv(self.gguf_arch(), cfg, kv);
        kv.push((arch_key(self.gguf_arch(), K_ROPE_DIMENSION_COUNT), GgufValue::U32(cfg.n_rot as u32)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        hybrid_layer_tensors(cfg, il, linear_attention_tensors)
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let (w, ctx, cfg) = (&l.w, l.ctx, l.cfg);
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let mut out = if cfg.is_recurrent(l.w.il) {
            let s = cfg.ssm.expect("a hybrid model has linear-attention sizes");
            let (nk, nv) = (s.n_group as i64, s.dt_rank as i64);
            let qkv = ctx.mul_mat(w.get(ATTN_QKV), cur);
            let z = ctx.mul_mat(w.get(ATTN_GATE), cur);
            // beta and alpha per key head: [b (nv / nk), a (nv / nk)] × key heads.
            let ba = ctx.mul_mat(w.get(SSM_BA), cur);
            let n = ba.ne()[1];
            let per = nv / nk;
            let ba = ctx.reshape_3d(ba, 2 * per, nk, n);
            let half = |at: i64| {
                let v = ctx.view_3d(ba, [per, nk, n], ba.nb()[1], ba.nb()[2], at as usize * ba.nb()[0]);
                ctx.reshape_2d(ctx.cont(v), nv, n)
            };
            l.delta_net(qkv, z, half(0), half(per), true)
        } else {
            gated_attention(l, cur, |t| l.rope(t, ROPE_NEOX))
        };
        out.shared = Some(shared_expert(l, out.normed));
        out
    }

    fn output_norm_from_hf(&self) -> FromHf {
        ADD_ONE
    }

    fn chat_template(&self) -> &'static str {
        super::qwen3moe::CHATML
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[("qwen3-next-80b-a3b", include_str!("../../configs/qwen3-next-80b-a3b.config.json"))]
    }
}

/// Qwen3-Next's linear-attention tensors of layer `il`: the fused projections split or kept
/// as llama.cpp's converter writes them.
fn linear_attention_tensors(cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
    let e = cfg.n_embd;
    let la = |p: &str| format!("layers.{{il}}.linear_attn.{p}");
        let s = cfg.ssm.expect("a hybrid model has linear-attention sizes");
        let (kd, vd, nv) = (s.d_state * s.n_group as u64, s.d_inner(), s.dt_rank as u64);
        let vpk = vd / s.n_group as u64;
        let qkvz = |z| FromHf::QkvzSplit { n_k: s.n_group, hk: s.d_state, vpk, z };
        vec![
            TensorSpec::layer(il, ATTN_QKV, &[e, 2 * kd + vd], Role::Weight, &[&la("in_proj_qkvz.weight")])
                .with(qkvz(false)),
            TensorSpec::layer(il, ATTN_GATE, &[e, vd], Role::Weight, &[&la("in_proj_qkvz.weight")]).with(qkvz(true)),
            TensorSpec::layer(il, SSM_CONV1D, &[s.d_conv, 2 * kd + vd], Role::Norm, &[&la("conv1d.weight")]),
            TensorSpec::layer(il, SSM_DT, &[nv], Role::Bias, &[&la("dt_bias")]),
            TensorSpec::layer(il, SSM_A, &[nv], Role::Norm, &[&la("A_log")])
                .with(FromHf::Values { map: ValueMap::NegExp, v_heads: None }),
            TensorSpec::layer(il, SSM_BA, &[e, 2 * nv], Role::Weight, &[&la("in_proj_ba.weight")]),
            TensorSpec::layer(il, SSM_NORM, &[s.d_state], Role::Norm, &[&la("norm.weight")]),
            TensorSpec::layer(il, SSM_OUT, &[vd, e], Role::Weight, &[&la("out_proj.weight")]),
        ]
}
