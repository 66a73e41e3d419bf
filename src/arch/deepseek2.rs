//! DeepSeek-V3 / V3.1 / R1 (`DeepseekV3ForCausalLM`) and DeepSeek-V2 / V2-Lite
//! (`DeepseekV2ForCausalLM`), both llama.cpp's `deepseek2`: multi-head latent attention and
//! DeepSeekMoE.
//!
//! Attention (MLA): the query from a low-rank pair with a norm between (`q_lora_rank`; V2-Lite:
//! a plain projection); one compressed latent per token (`kv_a_proj_with_mqa`: `kv_lora_rank`
//! values, normed, and the key's RoPE part of `qk_rope_head_dim`, shared by every head). As
//! llama.cpp computes it, the latent's up-projection to each head's key (`kv_b_proj`'s key rows,
//! `attn_k_b`) is absorbed into the query and its up-projection to each head's value
//! (`attn_v_b`) applied after attention, so what is cached per token and layer is the latent and
//! the RoPE part: one row of `kv_lora_rank + qk_rope_head_dim` values (`StateKind::Latent`;
//! DeepSeek-V3: 576). RoPE rotates adjacent pairs (llama.cpp's "normal" mode; transformers'
//! complex rotation in V2, `rope_interleave` in V3) and YaRN's `mscale_all_dim` scales the
//! attention logits (`ModelConfig::mla_kq_scale`).
//!
//! Experts: the first `first_k_dense_replace` layers have a dense SwiGLU FFN, the others routed
//! experts beside ungated shared experts (`n_shared_experts` × `moe_intermediate_size`), both in
//! the base. V3's router is GLM-4.5's (`noaux_tc`: sigmoid, correction bias, groups by their two
//! best, renormalized, `routed_scaling_factor`); V2's a softmax with greedy top-k, weights not
//! renormalized, times `routed_scaling_factor`. V2's `group_limited_greedy` (groups scored by
//! their best expert) is refused: llama.cpp's deepseek2 scores groups by their two best, so a GGUF
//! of it would compute another model. The next-token-prediction layer is skipped and named.

use super::glm4moe::{dense_lead_and_ffn_hf, dense_or_shared_ffn, ffn_tensors, gating_gguf, gating_hf, gating_kv};
use super::{Arch, FromHf, Role, TensorSpec};
use crate::config::{Gating, GatingFunc, GgufKeys, HfConfig, HfDefaults, Mla, ModelConfig};
use crate::error::Result;
use crate::ggml::GgufValue;
use crate::graph::{LayerInput, PreMoe, ROPE_NORMAL};
use crate::names::*;

pub struct Deepseek2;

/// DeepSeek-V3's chat template, reduced to messages (tools and thinking come with the model's
/// own template, in its tokenizer_config.json).
const DEEPSEEK_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

/// Whether a config.json is DeepSeek-V3's (`model_type` or `architectures`), else V2's.
fn is_v3(c: &HfConfig) -> bool {
    let named = |v: Option<&serde_json::Value>| v.is_some_and(|v| v.to_string().contains("eepseek_v3") || v.to_string().contains("DeepseekV3"));
    named(c.get(&["model_type"])) || named(c.get(&["architectures"]))
}

impl Arch for Deepseek2 {
    fn name(&self) -> &'static str {
        "deepseek2"
    }

    fn family(&self) -> &'static str {
        "DeepSeek-V2/V3"
    }

    fn gguf_arch(&self) -> &'static str {
        "deepseek2"
    }

    fn hf_names(&self) -> &'static [&'static str] {
        &["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "deepseek_v3", "deepseek_v2"]
    }

    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig> {
        let mut cfg = c.common(self.name(), name, HfDefaults { rms_eps: 1e-6, rope_theta: 10000.0, yarn: true })?;
        let v3 = is_v3(c);
        if c.bool_or(&["attention_bias"], false)? {
            return Err(c.err(&["attention_bias"], "llama.cpp's deepseek2 has no attention biases"));
        }
        c.only("moe_layer_freq", |v| v.as_u64() == Some(1), "only MoE in every layer after the dense ones (1)")?;
        if v3 && !c.bool_or(&["rope_interleave"], true)? {
            return Err(c.err(&["rope_interleave"], "only interleaved RoPE (true), as llama.cpp's deepseek2 rotates"));
        }
        let q_lora_rank = c.size_or("n_embd", &["q_lora_rank"], 0)?;
        let mla = Mla {
            q_lora_rank,
            kv_lora_rank: c.size("n_embd", &["kv_lora_rank"])?,
            qk_nope: c.size("head_dim", &["qk_nope_head_dim"])?,
            v_head_dim: c.size("head_dim", &["v_head_dim"])?,
        };
        cfg.n_rot = c.size("head_dim", &["qk_rope_head_dim"])?;
        if cfg.n_rot % 2 != 0 {
            return Err(c.err(&["qk_rope_head_dim"], format!("expected an even number, got {}", cfg.n_rot)));
        }
        cfg.head_dim = mla.k_row(cfg.n_rot);
        cfg.n_head_kv = 1;
        cfg.mla = Some(mla);
        dense_lead_and_ffn_hf(c, &mut cfg, 0)?;
        let scoring = c.get(&["scoring_func"]).and_then(|v| v.as_str()).unwrap_or(if v3 { "sigmoid" } else { "softmax" });
        let method = c.get(&["topk_method"]).and_then(|v| v.as_str()).unwrap_or(if v3 { "noaux_tc" } else { "greedy" });
        match (v3, scoring, method) {
            (true, "sigmoid", "noaux_tc") => {
                cfg.norm_topk_prob = c.bool_or(&["norm_topk_prob"], true)?;
                cfg.gating = gating_hf(c, cfg.n_expert, cfg.n_expert_used)?;
            }
            (false, "softmax", "greedy") | (false, "softmax", "group_limited_greedy") => {
                let n_group = c.size_or("n_expert", &["n_group"], 1)?;
                if method == "group_limited_greedy" && n_group > 1 {
                    return Err(c.err(
                        &["topk_method"],
                        "group_limited_greedy over several groups scores each group by its best expert; llama.cpp's \
                         deepseek2 scores groups by their two best, so its GGUF would compute another model: not supported",
                    ));
                }
                // transformers' DeepseekV2TopkRouter never renormalizes.
                cfg.norm_topk_prob = false;
                let scale = c.f64_or(&["routed_scaling_factor"], 1.0)? as f32;
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(c.err(&["routed_scaling_factor"], format!("expected a positive number, got {scale}")));
                }
                cfg.gating = Gating { scale, ..Gating::default() };
            }
            _ => {
                return Err(c.err(
                    &["scoring_func", "topk_method"],
                    format!(
                        "DeepSeek-{} routes with {}, got {scoring} with {method}",
                        if v3 { "V3" } else { "V2" },
                        if v3 { "sigmoid with noaux_tc" } else { "softmax with greedy" }
                    ),
                ))
            }
        }
        Ok(cfg)
    }

    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()> {
        let nextn = k.opt_u64(K_NEXTN_PREDICT_LAYERS)?.unwrap_or(0) as u32;
        if nextn >= cfg.n_layer {
            return Err(k.err(K_NEXTN_PREDICT_LAYERS, "fewer than block_count", &nextn.to_string()));
        }
        cfg.n_layer -= nextn;
        let (Some(k_mla), Some(v_mla)) = (k.opt_u64(K_KEY_LENGTH_MLA)?, k.opt_u64(K_VALUE_LENGTH_MLA)?) else {
            return Err(k.err(
                K_KEY_LENGTH_MLA,
                "a GGUF with latent attention's split attn_k_b / attn_v_b (llama.cpp's converter since 2025)",
                "no key_length_mla / value_length_mla (a legacy GGUF with attn_kv_b)",
            ));
        };
        let kv_lora_rank = k.u64(K_KV_LORA_RANK)?;
        if k_mla <= cfg.n_rot || cfg.head_dim != kv_lora_rank + cfg.n_rot || cfg.n_head_kv != 1 {
            return Err(k.err(
                K_KEY_LENGTH,
                "key_length = kv_lora_rank + rope dimensions, one KV head, key_length_mla above the rope dimensions",
                &format!(
                    "key_length {}, kv_lora_rank {kv_lora_rank}, rope {}, head_count_kv {}, key_length_mla {k_mla}",
                    cfg.head_dim, cfg.n_rot, cfg.n_head_kv
                ),
            ));
        }
        cfg.mla = Some(Mla {
            q_lora_rank: k.opt_u64(K_Q_LORA_RANK)?.unwrap_or(0),
            kv_lora_rank,
            qk_nope: k_mla - cfg.n_rot,
            v_head_dim: v_mla,
        });
        cfg.n_ff_exp = k.u64(K_EXPERT_FEED_FORWARD_LENGTH)?;
        cfg.n_ff_shexp = cfg.n_ff_exp * k.opt_u64(K_EXPERT_SHARED_COUNT)?.unwrap_or(1);
        cfg.n_layer_dense_lead = k.opt_u64(K_LEADING_DENSE_BLOCK_COUNT)?.unwrap_or(0) as u32;
        if cfg.n_layer_dense_lead >= cfg.n_layer {
            return Err(k.err(K_LEADING_DENSE_BLOCK_COUNT, "fewer than the layers", &cfg.n_layer_dense_lead.to_string()));
        }
        cfg.norm_topk_prob = k.opt_bool(K_EXPERT_WEIGHTS_NORM) == Some(true);
        // llama.cpp: DeepSeek-V2 GGUFs without a gating function are softmax.
        cfg.gating = gating_gguf(k, cfg, GatingFunc::Softmax)?;
        cfg.gating.selection_bias = k.g.find_tensor(&blk(cfg.n_layer_dense_lead, FFN_EXP_PROBS_B)).is_some();
        Ok(())
    }

    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>) {
        let k = |s: &str| arch_key(self.gguf_arch(), s);
        let mla = cfg.mla.expect("a DeepSeek model has latent attention");
        // llama.cpp's MLA layout: one KV head of the cached row, values the latent.
        kv.push((k(K_HEAD_COUNT_KV), GgufValue::U32(1)));
        kv.push((k(K_KEY_LENGTH), GgufValue::U32(mla.k_row(cfg.n_rot) as u32)));
        kv.push((k(K_VALUE_LENGTH), GgufValue::U32(mla.kv_lora_rank as u32)));
        kv.push((k(K_KEY_LENGTH_MLA), GgufValue::U32((mla.qk_nope + cfg.n_rot) as u32)));
        kv.push((k(K_VALUE_LENGTH_MLA), GgufValue::U32(mla.v_head_dim as u32)));
        kv.push((k(K_Q_LORA_RANK), GgufValue::U32(mla.q_lora_rank as u32)));
        kv.push((k(K_KV_LORA_RANK), GgufValue::U32(mla.kv_lora_rank as u32)));
        kv.push((k(K_ROPE_DIMENSION_COUNT), GgufValue::U32(cfg.n_rot as u32)));
        kv.push((k(K_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff as u32)));
        kv.push((k(K_EXPERT_FEED_FORWARD_LENGTH), GgufValue::U32(cfg.n_ff_exp as u32)));
        kv.push((k(K_EXPERT_SHARED_COUNT), GgufValue::U32((cfg.n_ff_shexp / cfg.n_ff_exp.max(1)) as u32)));
        kv.push((k(K_LEADING_DENSE_BLOCK_COUNT), GgufValue::U32(cfg.n_layer_dense_lead)));
        kv.push((k(K_EXPERT_WEIGHTS_NORM), GgufValue::Bool(cfg.norm_topk_prob)));
        gating_kv(cfg, kv, self.gguf_arch());
        kv.push((k(K_NEXTN_PREDICT_LAYERS), GgufValue::U32(0)));
    }

    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec> {
        let mla = cfg.mla.expect("a DeepSeek model has latent attention");
        let (e, nh) = (cfg.n_embd, cfg.n_head as u64);
        let (rope, nope, vd, kvr) = (cfg.n_rot, mla.qk_nope, mla.v_head_dim, mla.kv_lora_rank);
        let q = nh * (nope + rope);
        let l = |suffix, ne: &[u64], role, hf: &str| TensorSpec::layer(il, suffix, ne, role, &[hf]);
        let mut t = vec![l(ATTN_NORM, &[e], Role::Norm, "layers.{il}.input_layernorm.weight")];
        if mla.q_lora_rank > 0 {
            let r = mla.q_lora_rank;
            t.push(l(ATTN_Q_A, &[e, r], Role::Weight, "layers.{il}.self_attn.q_a_proj.weight"));
            t.push(l(ATTN_Q_A_NORM, &[r], Role::Norm, "layers.{il}.self_attn.q_a_layernorm.weight"));
            t.push(l(ATTN_Q_B, &[r, q], Role::Weight, "layers.{il}.self_attn.q_b_proj.weight"));
        } else {
            t.push(l(ATTN_Q, &[e, q], Role::Weight, "layers.{il}.self_attn.q_proj.weight"));
        }
        let kv_b = "layers.{il}.self_attn.kv_b_proj.weight";
        t.extend([
            l(ATTN_KV_A_MQA, &[e, kvr + rope], Role::Float, "layers.{il}.self_attn.kv_a_proj_with_mqa.weight"),
            l(ATTN_KV_A_NORM, &[kvr], Role::Norm, "layers.{il}.self_attn.kv_a_layernorm.weight"),
            l(ATTN_K_B, &[nope, kvr, nh], Role::Float, kv_b).with(FromHf::KvB {
                n_head: cfg.n_head,
                nope,
                v: vd,
                key: true,
            }),
            l(ATTN_V_B, &[kvr, vd, nh], Role::Float, kv_b).with(FromHf::KvB {
                n_head: cfg.n_head,
                nope,
                v: vd,
                key: false,
            }),
            l(ATTN_OUT, &[nh * vd, e], Role::Weight, "layers.{il}.self_attn.o_proj.weight"),
            l(FFN_NORM, &[e], Role::Norm, "layers.{il}.post_attention_layernorm.weight"),
        ]);
        t.extend(ffn_tensors(cfg, il));
        t
    }

    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a> {
        let (ctx, w, cfg) = (l.ctx, &l.w, l.cfg);
        let mla = cfg.mla.expect("a DeepSeek model has latent attention");
        let n = l.x.ne()[1];
        let (nh, rope, nope, kvr) = (cfg.n_head as i64, cfg.n_rot as i64, mla.qk_nope as i64, mla.kv_lora_rank as i64);
        let f32 = 4usize;
        let cur = l.norm(l.x, w.get(ATTN_NORM));
        let q = match w.opt(ATTN_Q_A) {
            Some(qa) => ctx.mul_mat(w.get(ATTN_Q_B), l.norm(ctx.mul_mat(qa, cur), w.get(ATTN_Q_A_NORM))),
            None => ctx.mul_mat(w.get(ATTN_Q), cur),
        };
        let q = ctx.reshape_3d(q, nope + rope, nh, n);
        let kv = ctx.mul_mat(w.get(ATTN_KV_A_MQA), cur); // [kv_lora_rank + rope, n]
        let row = kv.nb()[1];
        let latent = l.norm(ctx.view_2d(kv, kvr, n, row, 0), w.get(ATTN_KV_A_NORM));
        let k_pe = l.rope(ctx.view_3d(kv, [rope, 1, n], row, row, kvr as usize * f32), ROPE_NORMAL);
        let q_nope = ctx.view_3d(q, [nope, nh, n], q.nb()[1], q.nb()[2], 0);
        let q_pe = l.rope(ctx.view_3d(q, [rope, nh, n], q.nb()[1], q.nb()[2], nope as usize * f32), ROPE_NORMAL);
        // Each head's query through its key up-projection: [kv_lora_rank, n_head, n].
        let absorbed = ctx.mul_mat(w.get(ATTN_K_B), ctx.permute(q_nope, [0, 2, 1, 3]));
        let q = ctx.concat(ctx.permute(absorbed, [0, 2, 1, 3]), q_pe, 0);
        let k = ctx.concat(ctx.reshape_3d(latent, kvr, 1, n), k_pe, 0);
        let mut out = l.attend_latent(q, k, w.get(ATTN_V_B), cfg.mla_kq_scale());
        out.shared = Some(dense_or_shared_ffn(l, out.normed));
        out
    }

    fn chat_template(&self) -> &'static str {
        DEEPSEEK_TEMPLATE
    }

    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("deepseek-v3", include_str!("../../configs/deepseek-v3.config.json")),
            ("deepseek-v2-lite", include_str!("../../configs/deepseek-v2-lite.config.json")),
        ]
    }
}
