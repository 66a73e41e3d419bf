//! Model hyperparameters, named as llama.cpp names them, and the readers every architecture
//! shares: a Hugging Face `config.json` (transformers 4.x and 5.x spellings) and GGUF
//! `<arch>.*` keys. Which keys a family has beyond the common ones, and what they default to,
//! is its own file's business (`arch`).

use std::path::Path;

use serde_json::Value;

use crate::arch::{self, Arch, HfLayout};
use crate::error::{Error, IoContext, Result};
use crate::ggml::{Gguf, GgufValue};
use crate::names::*;

/// Hyperparameters of a Mixture-of-Experts text model, named as llama.cpp names them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// sage's name of the architecture (`arch::ARCHS`): `qwen3moe`, `mixtral`, …
    pub arch: &'static str,
    pub name: String,
    pub n_vocab: u64,
    pub n_embd: u64,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    /// Per-head dimension of queries, keys and values (`head_dim`).
    pub head_dim: u64,
    /// Width of a dense FFN (`intermediate_size`); recorded as llama.cpp records it, though
    /// every layer here is MoE.
    pub n_ff: u64,
    /// Width of one expert's FFN.
    pub n_ff_exp: u64,
    /// Width of the shared expert's FFN (always resident, part of the base); 0 when the model
    /// has none.
    pub n_ff_shexp: u64,
    pub n_expert: u32,
    pub n_expert_used: u32,
    /// Renormalize the chosen experts' weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub n_ctx_train: u64,
    pub tie_word_embeddings: bool,
    /// Sliding-window attention: how many positions a sliding layer's query sees (itself
    /// included, as transformers' `sliding_window` and llama.cpp's `n_swa`); 0 when no layer
    /// slides.
    pub n_swa: u64,
    /// Per layer, whether it attends over the sliding window only (empty: no layer does).
    pub swa_layers: Vec<bool>,
    /// YaRN RoPE scaling; None: plain RoPE.
    pub yarn: Option<Yarn>,
    /// Whether each expert has biases on its gate, up and down projections (stored in its
    /// record after the matrices).
    pub expert_bias: bool,
    /// The experts' gated activation.
    pub expert_act: ExpertAct,
    /// Dimensions of each head RoPE rotates, from the first (partial RoPE); `head_dim` for all.
    pub n_rot: u64,
    /// M-RoPE's sections (frequencies per position component, `ggml_rope_multi`); None: RoPE
    /// by `ggml_rope_ext`. Text positions are equal in every component.
    pub rope_sections: Option<[i32; 4]>,
    /// Per layer, whether it is a linear-attention layer with a recurrent state instead of a
    /// KV cache (empty: none is).
    pub recurrent_layers: Vec<bool>,
    /// The recurrent layers' sizes; None when the model has none.
    pub ssm: Option<Ssm>,
    /// Leading layers whose FFN is dense, not experts (`first_k_dense_replace`, llama.cpp's
    /// `leading_dense_block_count`): their FFN is part of the always-resident base and they
    /// have no experts.
    pub n_layer_dense_lead: u32,
    /// How the router scores and chooses experts beyond softmax → top-k.
    pub gating: Gating,
    /// Per-head q/k RMS norms, in a family where they are optional (GLM-4.5: `use_qk_norm`).
    pub qk_norm: bool,
    /// Multi-head latent attention (DeepSeek-V2 / V3); None: attention over cached K and V
    /// heads. With it `n_head_kv` is 1 and `head_dim` is a cached row (`Mla::k_row`), as
    /// llama.cpp's MLA cache.
    pub mla: Option<Mla>,
}

/// Multi-head latent attention's sizes (llama.cpp's `n_lora_q`, `n_lora_kv`,
/// `n_embd_head_k_mla`, `n_embd_head_v_mla`; the RoPE part is `ModelConfig::n_rot`). A token's
/// keys and values are up-projections of one compressed latent of `kv_lora_rank` values;
/// what is cached per token is that latent (normed) and the RoPE part of the key (shared by the
/// heads), and the up-projections are absorbed into the query and the output (`attn_k_b`,
/// `attn_v_b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mla {
    /// Rank of the query's low-rank projection (`q_lora_rank`); 0: a plain q projection
    /// (DeepSeek-V2-Lite).
    pub q_lora_rank: u64,
    pub kv_lora_rank: u64,
    /// Per-head query/key dimensions without RoPE (`qk_nope_head_dim`).
    pub qk_nope: u64,
    /// Per-head value dimension (`v_head_dim`).
    pub v_head_dim: u64,
}

impl Mla {
    /// Values cached per token and layer: the latent and the key's RoPE part.
    pub fn k_row(&self, n_rot: u64) -> u64 {
        self.kv_lora_rank + n_rot
    }
}

/// The router's scoring function (llama.cpp's `expert_gating_func`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum GatingFunc {
    /// softmax over the experts (llama.cpp 1).
    #[default]
    Softmax,
    /// sigmoid of each logit (llama.cpp 2): DeepSeek-V3, GLM-4.5.
    Sigmoid,
}

impl GatingFunc {
    /// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_*` value.
    pub fn llama(self) -> u32 {
        match self {
            GatingFunc::Softmax => 1,
            GatingFunc::Sigmoid => 2,
        }
    }
}

/// How a router chooses (DeepSeek-V3's and GLM-4.5's `noaux_tc`, as llama.cpp's
/// `build_moe_ffn`): scores by `func`; a per-expert correction bias (`exp_probs_b`, where
/// `selection_bias`) added to the scores for choosing only; the experts split into `n_group`
/// groups of consecutive ids, each scored by the sum of its two highest biased scores, the
/// best `n_group_used` groups kept; the top `n_expert_used` of those; their unbiased scores
/// as weights, renormalized where `norm_topk_prob`, then multiplied by `scale`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Gating {
    pub func: GatingFunc,
    pub selection_bias: bool,
    /// 1: no groups.
    pub n_group: u32,
    pub n_group_used: u32,
    /// `routed_scaling_factor`; 1: none.
    pub scale: f32,
}

impl Default for Gating {
    fn default() -> Self {
        Gating { func: GatingFunc::Softmax, selection_bias: false, n_group: 1, n_group_used: 1, scale: 1.0 }
    }
}

impl Gating {
    /// Whether experts are chosen by groups.
    pub fn grouped(&self) -> bool {
        self.n_group > 1
    }
}

/// A Gated-DeltaNet layer's sizes, named as llama.cpp's `ssm.*` keys: `n_group` key heads and
/// `dt_rank` value heads of `d_state` values each (llama.cpp requires the key and value head
/// sizes equal), a causal convolution of `d_conv` taps over q, k and v.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ssm {
    pub d_conv: u64,
    pub d_state: u64,
    pub n_group: u32,
    pub dt_rank: u32,
}

impl Ssm {
    /// Width of the value heads together (`ssm.inner_size`).
    pub fn d_inner(&self) -> u64 {
        self.d_state * self.dt_rank as u64
    }
    /// Channels of the convolution: q, k and v.
    pub fn conv_channels(&self) -> u64 {
        2 * self.d_state * self.n_group as u64 + self.d_inner()
    }
    /// f32 values of one sequence's convolution window (the last `d_conv - 1` inputs).
    pub fn conv_state(&self) -> u64 {
        (self.d_conv - 1) * self.conv_channels()
    }
    /// f32 values of one sequence's delta-rule state: a `d_state` × `d_state` matrix per value
    /// head.
    pub fn delta_state(&self) -> u64 {
        self.d_state * self.d_state * self.dt_rank as u64
    }
}

/// YaRN's parameters (transformers' `rope_parameters` of type `yarn`; llama.cpp's
/// `rope.scaling.*` keys).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Yarn {
    pub factor: f32,
    /// The context the model was trained at before extension (`original_max_position_embeddings`).
    pub n_ctx_orig: u64,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// DeepSeek's attention-scale multiplier as llama.cpp stores it
    /// (`rope.scaling.yarn_log_multiplier`: 0.1 × `mscale_all_dim`); 0: none.
    pub log_mul: f32,
}

/// YaRN's magnitude scale (transformers' and llama.cpp's `get_mscale`).
fn get_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Yarn {
    /// `ggml_rope_ext`'s attention factor as llama.cpp's context computes it (`yarn_attn_factor`
    /// in llama-context.cpp): the ratio of the magnitude scales of `mscale` and
    /// `mscale_all_dim` (DeepSeek: `mscale` is taken equal to `mscale_all_dim` where that is
    /// not 1, else 1), divided by the scale ggml multiplies in itself; 1 over that without a
    /// log multiplier.
    pub fn attn_factor(&self) -> f32 {
        let factor = 1.0 / (1.0 / self.factor);
        let f = if self.log_mul != 0.0 {
            let all = self.log_mul / 0.1;
            let m = if all != 1.0 { all } else { 1.0 };
            get_mscale(factor, m) / get_mscale(factor, all)
        } else {
            get_mscale(factor, 1.0)
        };
        f * (1.0 / (1.0 + 0.1 * factor.ln()))
    }
}

/// The routed experts' activation of gate `g` and up `u`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub enum ExpertAct {
    /// silu(g) · u.
    #[default]
    SwiGlu,
    /// gpt-oss's: x = min(g, limit), y = clamp(u, ±limit), x · sigmoid(alpha · x) · (y + 1).
    SwiGluOai { alpha: f32, limit: f32 },
}

/// Largest sizes a model may declare. llama.cpp's own caps for layers and experts
/// (`LLAMA_MAX_LAYERS`, `LLAMA_MAX_EXPERTS`); generous bounds for the rest, far above any
/// published model, so that sizes computed from them (tensor bytes, footprints, per-layer
/// tables) cannot overflow or ask for memory a file's few bytes do not justify.
pub const LIMITS: [(&str, u64); 9] = [
    ("n_layer", 512),
    ("n_expert", 512),
    ("n_embd", 1 << 20),
    ("n_head", 1 << 16),
    ("head_dim", 1 << 16),
    ("n_ff", 1 << 22),
    ("n_ff_exp", 1 << 22),
    ("n_ff_shexp", 1 << 22),
    ("n_vocab", 1 << 24),
];

fn limit_of(field: &str) -> u64 {
    LIMITS.iter().find(|(n, _)| *n == field).map_or(u64::MAX, |(_, l)| *l)
}

impl ModelConfig {
    /// The architecture's implementation.
    pub fn arch(&self) -> &'static dyn Arch {
        arch::by_name(self.arch).expect("a ModelConfig is made by a registered architecture")
    }

    /// Shape (ggml order) of one expert's projection `p`.
    pub fn expert_shape(&self, p: Proj) -> [u64; 2] {
        match p {
            Proj::Gate | Proj::Up => [self.n_embd, self.n_ff_exp],
            Proj::Down => [self.n_ff_exp, self.n_embd],
        }
    }

    /// Whether layer `il` has a dense FFN instead of experts.
    pub fn is_dense(&self, il: u32) -> bool {
        il < self.n_layer_dense_lead
    }

    /// Experts of each layer (0 in a dense one).
    pub fn experts_per_layer(&self) -> Vec<u64> {
        (0..self.n_layer).map(|il| if self.is_dense(il) { 0 } else { self.n_expert as u64 }).collect()
    }

    /// Layers with experts.
    pub fn n_moe_layers(&self) -> u32 {
        self.n_layer.saturating_sub(self.n_layer_dense_lead)
    }

    /// Whether layer `il` is a linear-attention layer with a recurrent state.
    pub fn is_recurrent(&self, il: u32) -> bool {
        self.recurrent_layers.get(il as usize) == Some(&true)
    }

    /// Whether layer `il` attends over the sliding window only.
    pub fn is_swa(&self, il: u32) -> bool {
        self.n_swa > 0 && self.swa_layers.get(il as usize) == Some(&true)
    }

    /// `ggml_rope_ext`'s parameters for heads of this model in `mode`, as llama.cpp computes
    /// them: with YaRN, frequency scale 1/factor, extrapolation mix 1, and the attention factor
    /// of `Yarn::attn_factor` (ggml multiplies in YaRN's magnitude scale 0.1 ln(factor) + 1
    /// itself).
    pub fn rope_params(&self, mode: i32) -> crate::ggml::RopeParams {
        let plain = crate::ggml::RopeParams {
            n_dims: self.n_rot as i32,
            mode,
            n_ctx_orig: self.n_ctx_train.min(i32::MAX as u64) as i32,
            freq_base: self.rope_theta,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        match self.yarn {
            None => plain,
            Some(y) => crate::ggml::RopeParams {
                n_ctx_orig: y.n_ctx_orig.min(i32::MAX as u64) as i32,
                freq_scale: 1.0 / y.factor,
                ext_factor: 1.0,
                attn_factor: y.attn_factor(),
                beta_fast: y.beta_fast,
                beta_slow: y.beta_slow,
                ..plain
            },
        }
    }

    /// The scale of attention logits in latent attention, as llama.cpp's deepseek2 graph
    /// computes it: 1/√(qk_nope + n_rot), times the square of YaRN's magnitude scale of
    /// `mscale_all_dim` where the model has one (transformers' `softmax_scale`).
    pub fn mla_kq_scale(&self) -> f32 {
        let mla = self.mla.expect("a latent-attention model");
        let d = (mla.qk_nope + self.n_rot) as f32;
        let (fs, af, log_mul) = match self.yarn {
            Some(y) => (1.0 / y.factor, y.attn_factor(), y.log_mul / 0.1),
            None => (1.0, 1.0, 0.0),
        };
        let org = af * (1.0 + 0.1 * (1.0 / fs).ln());
        let mscale = org * (1.0 + 0.1 * log_mul * (1.0 / fs).ln());
        mscale * mscale / d.sqrt()
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

/// A `config.json`'s text model (the whole file, or the object the layout nests it in), with
/// the file it came from for error messages. Every read names the key in its error.
pub struct HfConfig<'a> {
    pub path: &'a Path,
    prefix: &'a str,
    v: &'a Value,
}

/// What the common reader defaults to where a family's config class has other defaults.
#[derive(Clone, Copy, Debug)]
pub struct HfDefaults {
    pub rms_eps: f64,
    pub rope_theta: f64,
    /// Whether the family runs YaRN RoPE (others refuse a `yarn` rope type).
    pub yarn: bool,
}

impl HfConfig<'_> {
    /// The first of `keys` present and not null.
    pub fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|v| !v.is_null()))
    }

    /// `keys` as an error names them (`'num_experts' or 'num_local_experts'`, with the nesting).
    pub fn key(&self, keys: &[&str]) -> String {
        format!("{}{}", self.prefix, keys.join("' or '"))
    }

    pub fn err(&self, keys: &[&str], reason: impl Into<String>) -> Error {
        cfg_err(self.path, &self.key(keys), reason)
    }

    /// A positive integer under `field`'s limit (`LIMITS`).
    pub fn size(&self, field: &str, keys: &[&str]) -> Result<u64> {
        let v = self.get(keys).ok_or_else(|| self.err(keys, "missing"))?;
        let n = v
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.err(keys, format!("expected a positive integer, got {v}")))?;
        let lim = limit_of(field);
        if n > lim {
            return Err(self.err(keys, format!("{n} is above the largest supported ({field} <= {lim})")));
        }
        Ok(n)
    }

    pub fn size_u32(&self, field: &str, keys: &[&str]) -> Result<u32> {
        Ok(self.size(field, keys)? as u32)
    }

    /// `size`, or `default` when absent.
    pub fn size_or(&self, field: &str, keys: &[&str], default: u64) -> Result<u64> {
        match self.get(keys) {
            None => Ok(default),
            Some(_) => self.size(field, keys),
        }
    }

    pub fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(keys, format!("expected a number, got {v}"))),
        }
    }

    pub fn bool_or(&self, keys: &[&str], default: bool) -> Result<bool> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(keys, format!("expected true or false, got {v}"))),
        }
    }

    /// Refuse a key that is present with a value other than `ok` allows: `what` says what
    /// sage supports.
    pub fn only(&self, key: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<()> {
        match self.get(&[key]) {
            Some(v) if !ok(v) => Err(self.err(&[key], format!("{what}, got {v}"))),
            _ => Ok(()),
        }
    }

    /// The hyperparameters every family spells alike, with the checks they share; the
    /// family fills the FFN widths, the router's normalization and its own keys. `arch` is
    /// the family's name.
    pub fn common(&self, arch: &'static str, name: String, d: HfDefaults) -> Result<ModelConfig> {
        self.only("hidden_act", |v| v.as_str() == Some("silu"), "only silu is supported")?;
        // RoPE: transformers 4.x writes rope_theta (+ rope_scaling); 5.x writes rope_parameters.
        let rope = self.get(&["rope_parameters", "rope_scaling"]);
        let mut yarn = None;
        if let Some(r) = rope {
            let ty = r.get("rope_type").or_else(|| r.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            // Qwen3-Omni's interleaved M-RoPE is plain RoPE when all position components are
            // equal, as they are for text-only input.
            match ty {
                "default" => {}
                "yarn" if d.yarn => yarn = Some(self.yarn(r)?),
                _ => return Err(self.err(&["rope_scaling"], format!("rope type '{ty}' is not supported"))),
            }
        }
        let rope_theta = match (self.get(&["rope_theta"]), rope.and_then(|r| r.get("rope_theta"))) {
            (Some(v), _) | (None, Some(v)) => {
                v.as_f64().ok_or_else(|| self.err(&["rope_theta"], format!("expected a number, got {v}")))?
            }
            (None, None) => d.rope_theta,
        };
        let n_embd = self.size("n_embd", &["hidden_size"])?;
        let n_head = self.size_u32("n_head", &["num_attention_heads"])?;
        let head_dim = self.size_or("head_dim", &["head_dim"], n_embd / n_head as u64)?;
        let n_expert = self.size_u32("n_expert", &["num_experts", "num_local_experts", "n_routed_experts"])?;
        let n_expert_used = self.size_u32("n_expert", &["num_experts_per_tok"])?;
        if n_expert_used > n_expert {
            return Err(self.err(
                &["num_experts_per_tok"],
                format!("{n_expert_used} experts per token but only {n_expert} experts"),
            ));
        }
        let n_head_kv = self.size_or("n_head", &["num_key_value_heads"], n_head as u64)? as u32;
        if n_head % n_head_kv != 0 {
            return Err(self.err(&["num_key_value_heads"], format!("{n_head} heads are not a multiple of {n_head_kv}")));
        }
        let cfg = ModelConfig {
            arch,
            name,
            n_vocab: self.size("n_vocab", &["vocab_size"])?,
            n_embd,
            n_layer: self.size_u32("n_layer", &["num_hidden_layers"])?,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: 0,
            n_ff_exp: 0,
            n_ff_shexp: 0,
            n_expert,
            n_expert_used,
            norm_topk_prob: false,
            rms_eps: self.f64_or(&["rms_norm_eps"], d.rms_eps)? as f32,
            rope_theta: rope_theta as f32,
            n_ctx_train: self.get(&["max_position_embeddings"]).and_then(|v| v.as_u64()).unwrap_or(4096),
            tie_word_embeddings: self.bool_or(&["tie_word_embeddings"], false)?,
            n_swa: 0,
            swa_layers: Vec::new(),
            yarn,
            expert_bias: false,
            expert_act: ExpertAct::SwiGlu,
            n_rot: head_dim,
            rope_sections: None,
            recurrent_layers: Vec::new(),
            ssm: None,
            n_layer_dense_lead: 0,
            gating: Gating::default(),
            qk_norm: false,
            mla: None,
        };
        if let Some((name, x)) = cfg.bad_float() {
            let keys: &[&str] = if name == "rms_eps" { &["rms_norm_eps"] } else { &["rope_theta"] };
            return Err(self.err(keys, format!("expected a positive number, got {x}")));
        }
        Ok(cfg)
    }
}

impl HfConfig<'_> {
    /// YaRN's parameters from a `rope_parameters` / `rope_scaling` object `r` of type yarn.
    /// `truncate: false` (gpt-oss) cannot be honoured exactly: ggml always rounds YaRN's
    /// correction range to whole dimensions, as llama.cpp does for the same model.
    fn yarn(&self, r: &Value) -> Result<Yarn> {
        let key = |k: &str| format!("rope_parameters.{k}");
        let num = |k: &str, default: Option<f64>| -> Result<f64> {
            match (r.get(k).filter(|v| !v.is_null()), default) {
                (Some(v), _) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| self.err(&[&key(k)], format!("expected a positive number, got {v}"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(self.err(&[&key(k)], "missing")),
            }
        };
        let factor = num("factor", None)?;
        let n_ctx_orig = num("original_max_position_embeddings", None)? as u64;
        // DeepSeek's `mscale_all_dim` (its attention scale, and with `mscale` YaRN's attention
        // factor). llama.cpp stores only it and takes `mscale` to equal it where it is not 1,
        // else 1: another `mscale` would compute another model there.
        let all = r.get("mscale_all_dim").and_then(|v| v.as_f64()).unwrap_or(0.0);
        if all != 0.0 {
            let m = r.get("mscale").and_then(|v| v.as_f64()).unwrap_or(1.0);
            let want = if all != 1.0 { all } else { 1.0 };
            if m != want {
                return Err(self.err(
                    &[&key("mscale")],
                    format!(
                        "expected {want} with mscale_all_dim {all} (llama.cpp's GGUF cannot express another), got {m}"
                    ),
                ));
            }
        }
        Ok(Yarn {
            factor: factor as f32,
            n_ctx_orig,
            beta_fast: num("beta_fast", Some(32.0))? as f32,
            beta_slow: num("beta_slow", Some(1.0))? as f32,
            log_mul: (0.1 * all) as f32,
        })
    }

    /// Dimensions of each head RoPE rotates: `head_dim` × `partial_rotary_factor` (at the top
    /// level, or in `rope_parameters` as transformers 5 writes it; `default` where absent),
    /// an even number.
    pub fn partial_rotary(&self, head_dim: u64, default: f64) -> Result<u64> {
        let key = ["partial_rotary_factor"];
        let factor = match self.get(&["rope_parameters"]).and_then(|r| r.get("partial_rotary_factor")) {
            Some(v) => v.as_f64(),
            None => Some(self.f64_or(&key, default)?),
        };
        let factor =
            factor.filter(|f| *f > 0.0 && *f <= 1.0).ok_or_else(|| self.err(&key, "expected a number in (0, 1]"))?;
        let n_rot = (head_dim as f64 * factor) as u64;
        if !n_rot.is_multiple_of(2) || n_rot == 0 {
            return Err(self.err(&key, format!("{n_rot} rotated dimensions: expected an even number")));
        }
        Ok(n_rot)
    }

    /// `layer_types` (one of `other` / `full_attention` per layer) as per-layer
    /// flags, or None when the config has none; `other` names the kind that is not full
    /// attention (`sliding_attention`, `linear_attention`).
    pub fn layer_types(&self, n_layer: u32, other: &str) -> Result<Option<Vec<bool>>> {
        let Some(v) = self.get(&["layer_types"]) else { return Ok(None) };
        let a = v.as_array().ok_or_else(|| self.err(&["layer_types"], format!("expected a list, got {v}")))?;
        if a.len() != n_layer as usize {
            return Err(
                self.err(&["layer_types"], format!("expected {n_layer} entries (one per layer), got {}", a.len()))
            );
        }
        a.iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some(k) if k == other => Ok(true),
                Some("full_attention") => Ok(false),
                _ => {
                    Err(self
                        .err(&["layer_types"], format!("entry {i}: expected '{other}' or 'full_attention', got {t}")))
                }
            })
            .collect::<Result<Vec<bool>>>()
            .map(Some)
    }
}

/// Read `config.json` of a Hugging Face checkpoint.
pub fn read_hf_config(path: &Path) -> Result<(HfLayout, ModelConfig)> {
    let text = std::fs::read_to_string(path).at(path)?;
    parse_hf_config(&text, path)
}

/// Parse the text of a `config.json`; `path` names it in errors (and gives the model's name
/// when the file has no `_name_or_path`). The architecture is chosen by `architectures` (or
/// `model_type`) among `arch::ARCHS`.
pub fn parse_hf_config(text: &str, path: &Path) -> Result<(HfLayout, ModelConfig)> {
    let root: Value = serde_json::from_str(text).map_err(|e| cfg_err(path, "(json)", e.to_string()))?;
    let hf_arch = root
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| root.get("model_type").and_then(|m| m.as_str()))
        .unwrap_or("(none)")
        .to_string();
    let arch = arch::by_hf(&hf_arch).ok_or_else(|| Error::UnknownArchitecture {
        path: path.to_path_buf(),
        got: format!("'{hf_arch}'"),
        expected: arch::supported_hf(),
    })?;
    let layout = arch.hf_layout(&hf_arch);
    let mut text_cfg = &root;
    let mut prefix = String::new();
    for part in layout.config_path {
        text_cfg = text_cfg.get(*part).ok_or_else(|| cfg_err(path, &format!("{prefix}{part}"), "missing"))?;
        prefix.push_str(part);
        prefix.push('.');
    }
    let name = match root.get("_name_or_path").and_then(|n| n.as_str()) {
        Some(n) if !n.is_empty() => n.to_string(),
        // The checkpoint's directory name, as llama.cpp's converter does.
        _ => path
            .parent()
            .and_then(|d| d.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or(hf_arch.clone()),
    };
    let c = HfConfig { path, prefix: &prefix, v: text_cfg };
    let cfg = arch.hparams_hf(&c, name)?;
    Ok((layout, cfg))
}

/// A GGUF's `<arch>.*` keys, read with the file named in errors.
pub struct GgufKeys<'a> {
    pub g: &'a Gguf,
    pub path: &'a Path,
    /// llama.cpp's architecture: the keys' prefix.
    pub prefix: &'static str,
}

impl GgufKeys<'_> {
    pub fn key(&self, suffix: &str) -> String {
        arch_key(self.prefix, suffix)
    }

    pub fn err(&self, suffix: &str, expected: &str, got: &str) -> Error {
        meta_err(self.path, &self.key(suffix), expected, got)
    }

    /// An unsigned integer, None when absent.
    pub fn opt_u64(&self, suffix: &str) -> Result<Option<u64>> {
        match self.g.get(&self.key(suffix)) {
            Some(GgufValue::U32(n)) => Ok(Some(n as u64)),
            Some(GgufValue::U64(n)) => Ok(Some(n)),
            Some(GgufValue::I32(n)) if n >= 0 => Ok(Some(n as u64)),
            Some(GgufValue::I64(n)) if n >= 0 => Ok(Some(n as u64)),
            Some(v) => Err(self.err(suffix, "an unsigned integer", &format!("{v:?}"))),
            None => Ok(None),
        }
    }

    pub fn u64(&self, suffix: &str) -> Result<u64> {
        self.opt_u64(suffix)?.ok_or_else(|| self.err(suffix, "an unsigned integer", "nothing"))
    }

    pub fn u32(&self, suffix: &str) -> Result<u32> {
        let n = self.u64(suffix)?;
        u32::try_from(n).map_err(|_| self.err(suffix, "a 32-bit count", &n.to_string()))
    }

    pub fn f32_or(&self, suffix: &str, default: Option<f32>) -> Result<f32> {
        match (self.g.get(&self.key(suffix)), default) {
            (Some(GgufValue::F32(x)), _) => Ok(x),
            (Some(GgufValue::F64(x)), _) => Ok(x as f32),
            (None, Some(d)) => Ok(d),
            (v, _) => Err(self.err(suffix, "a float", &format!("{v:?}"))),
        }
    }

    pub fn opt_bool(&self, suffix: &str) -> Option<bool> {
        match self.g.get(&self.key(suffix)) {
            Some(GgufValue::Bool(b)) => Some(b),
            _ => None,
        }
    }
}

fn meta_err(path: &Path, key: &str, expected: &str, got: &str) -> Error {
    Error::Config { path: path.to_path_buf(), key: key.to_string(), reason: format!("expected {expected}, got {got}") }
}

impl ModelConfig {
    /// Write the hyperparameters as llama.cpp's `<arch>.*` keys.
    pub fn write_gguf(&self, g: &mut Gguf) -> Result<()> {
        let arch = self.arch();
        let k = |s: &str| arch_key(arch.gguf_arch(), s);
        let u32v = |n: u64| GgufValue::U32(n.min(u32::MAX as u64) as u32);
        let mut kv: Vec<(String, GgufValue)> = vec![
            (GENERAL_ARCHITECTURE.into(), GgufValue::Str(arch.gguf_arch().into())),
            (GENERAL_NAME.into(), GgufValue::Str(self.name.clone())),
            (k(K_VOCAB_SIZE), u32v(self.n_vocab)),
            (k(K_BLOCK_COUNT), GgufValue::U32(self.n_layer)),
            (k(K_CONTEXT_LENGTH), u32v(self.n_ctx_train)),
            (k(K_EMBEDDING_LENGTH), u32v(self.n_embd)),
            (k(K_HEAD_COUNT), GgufValue::U32(self.n_head)),
            (k(K_HEAD_COUNT_KV), GgufValue::U32(self.n_head_kv)),
            (k(K_KEY_LENGTH), u32v(self.head_dim)),
            (k(K_VALUE_LENGTH), u32v(self.head_dim)),
            (k(K_RMS_EPS), GgufValue::F32(self.rms_eps)),
            (k(K_ROPE_FREQ_BASE), GgufValue::F32(self.rope_theta)),
            (k(K_EXPERT_COUNT), GgufValue::U32(self.n_expert)),
            (k(K_EXPERT_USED_COUNT), GgufValue::U32(self.n_expert_used)),
        ];
        if let Some(y) = self.yarn {
            kv.push((k(K_ROPE_SCALING_TYPE), GgufValue::Str("yarn".into())));
            kv.push((k(K_ROPE_SCALING_FACTOR), GgufValue::F32(y.factor)));
            kv.push((k(K_ROPE_SCALING_ORIG_CTX), u32v(y.n_ctx_orig)));
            kv.push((k(K_ROPE_SCALING_BETA_FAST), GgufValue::F32(y.beta_fast)));
            kv.push((k(K_ROPE_SCALING_BETA_SLOW), GgufValue::F32(y.beta_slow)));
            if y.log_mul != 0.0 {
                kv.push((k(K_ROPE_SCALING_YARN_LOG_MUL), GgufValue::F32(y.log_mul)));
            }
        }
        if self.n_swa > 0 {
            kv.push((k(K_SLIDING_WINDOW), u32v(self.n_swa)));
        }
        if self.n_rot != self.head_dim {
            kv.push((k(K_ROPE_DIMENSION_COUNT), u32v(self.n_rot)));
        }
        arch.gguf_kv(self, &mut kv);
        for (key, v) in &kv {
            g.set(key, v).map_err(|e| Error::Usage(e.to_string()))?;
        }
        Ok(())
    }

    /// Read llama.cpp's `<arch>.*` keys; the architecture is chosen by
    /// `general.architecture` among `arch::ARCHS`; `n_vocab` comes from the token
    /// embedding's shape.
    pub fn read_gguf(g: &Gguf, path: &Path) -> Result<ModelConfig> {
        let arch = arch::by_gguf(g, path)?;
        let k = GgufKeys { g, path, prefix: arch.gguf_arch() };
        let n_embd = k.u64(K_EMBEDDING_LENGTH)?;
        let n_head = k.u32(K_HEAD_COUNT)?;
        let tok = g
            .find_tensor(TOKEN_EMBD)
            .map(|i| g.tensor(i))
            .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), tensor: TOKEN_EMBD.into() })?;
        let mut cfg = ModelConfig {
            arch: arch.name(),
            name: match g.get(GENERAL_NAME) {
                Some(GgufValue::Str(s)) => s,
                _ => arch.gguf_arch().into(),
            },
            n_vocab: tok.ne.get(1).copied().unwrap_or(1),
            n_embd,
            n_layer: k.u32(K_BLOCK_COUNT)?,
            n_head,
            n_head_kv: k.u32(K_HEAD_COUNT_KV).unwrap_or(n_head),
            head_dim: k.u64(K_KEY_LENGTH).unwrap_or(n_embd / n_head.max(1) as u64),
            n_ff: k.opt_u64(K_FEED_FORWARD_LENGTH)?.unwrap_or(0),
            n_ff_exp: 0,
            n_ff_shexp: 0,
            n_expert: k.u32(K_EXPERT_COUNT)?,
            n_expert_used: k.u32(K_EXPERT_USED_COUNT)?,
            norm_topk_prob: false,
            rms_eps: k.f32_or(K_RMS_EPS, None)?,
            rope_theta: k.f32_or(K_ROPE_FREQ_BASE, Some(10000.0))?,
            n_ctx_train: k.u64(K_CONTEXT_LENGTH).unwrap_or(4096),
            tie_word_embeddings: g.find_tensor(OUTPUT).is_none(),
            n_swa: k.opt_u64(K_SLIDING_WINDOW)?.unwrap_or(0),
            swa_layers: Vec::new(),
            yarn: None,
            expert_bias: false,
            expert_act: ExpertAct::SwiGlu,
            n_rot: 0,
            rope_sections: None,
            recurrent_layers: Vec::new(),
            ssm: None,
            n_layer_dense_lead: 0,
            gating: Gating::default(),
            qk_norm: false,
            mla: None,
        };
        cfg.n_rot = k.opt_u64(K_ROPE_DIMENSION_COUNT)?.unwrap_or(cfg.head_dim);
        cfg.yarn = match g.get(&k.key(K_ROPE_SCALING_TYPE)) {
            None => None,
            Some(GgufValue::Str(t))
                if t == "none" || t == "linear" && k.f32_or(K_ROPE_SCALING_FACTOR, Some(1.0))? == 1.0 =>
            {
                None
            }
            Some(GgufValue::Str(t)) if t == "yarn" => Some(Yarn {
                factor: k.f32_or(K_ROPE_SCALING_FACTOR, None)?,
                n_ctx_orig: k.u64(K_ROPE_SCALING_ORIG_CTX)?,
                // llama.cpp's defaults (it reads no beta keys).
                beta_fast: k.f32_or(K_ROPE_SCALING_BETA_FAST, Some(32.0))?,
                beta_slow: k.f32_or(K_ROPE_SCALING_BETA_SLOW, Some(1.0))?,
                log_mul: k.f32_or(K_ROPE_SCALING_YARN_LOG_MUL, Some(0.0))?,
            }),
            Some(v) => return Err(k.err(K_ROPE_SCALING_TYPE, "'yarn' or 'none'", &format!("{v:?}"))),
        };
        if let Some(y) = cfg.yarn {
            if !(y.factor.is_finite() && y.factor > 0.0) || y.n_ctx_orig == 0 {
                return Err(k.err(K_ROPE_SCALING_FACTOR, "a positive factor and original context", &format!("{y:?}")));
            }
        }
        arch.hparams_gguf(&k, &mut cfg)?;
        if cfg.n_head == 0
            || cfg.n_head_kv == 0
            || !cfg.n_head.is_multiple_of(cfg.n_head_kv)
            || cfg.n_expert == 0
            || cfg.n_expert_used == 0
            || cfg.n_expert_used > cfg.n_expert
        {
            return Err(k.err(
                K_HEAD_COUNT,
                "heads a multiple of KV heads and 0 < experts used <= experts",
                &format!(
                    "{} heads, {} KV heads, {} of {} experts",
                    cfg.n_head, cfg.n_head_kv, cfg.n_expert_used, cfg.n_expert
                ),
            ));
        }
        let values = [
            ("n_layer", cfg.n_layer as u64, k.key(K_BLOCK_COUNT)),
            ("n_expert", cfg.n_expert as u64, k.key(K_EXPERT_COUNT)),
            ("n_embd", cfg.n_embd, k.key(K_EMBEDDING_LENGTH)),
            ("n_head", cfg.n_head as u64, k.key(K_HEAD_COUNT)),
            ("head_dim", cfg.head_dim, k.key(K_KEY_LENGTH)),
            ("n_ff", cfg.n_ff, k.key(K_FEED_FORWARD_LENGTH)),
            ("n_ff_exp", cfg.n_ff_exp, k.key(K_EXPERT_FEED_FORWARD_LENGTH)),
            ("n_ff_shexp", cfg.n_ff_shexp, k.key(K_EXPERT_SHARED_FEED_FORWARD_LENGTH)),
            ("n_vocab", cfg.n_vocab, format!("{TOKEN_EMBD} rows")),
        ];
        for (name, v, key) in values {
            let lim = limit_of(name);
            if v > lim {
                return Err(meta_err(path, &key, &format!("{name} <= {lim}"), &v.to_string()));
            }
        }
        if cfg.n_ff_exp == 0 {
            return Err(k.err(K_EXPERT_FEED_FORWARD_LENGTH, "a positive expert FFN width", "0"));
        }
        if let Some((name, x)) = cfg.bad_float() {
            return Err(k.err(
                if name == "rms_eps" { K_RMS_EPS } else { K_ROPE_FREQ_BASE },
                "a positive number",
                &x.to_string(),
            ));
        }
        // A count of layers the file's tensors cannot hold is a lie.
        // (The fewest a layer of the model has: a hybrid's kinds of layer differ.)
        let per_layer = (0..cfg.n_layer).map(|il| arch.layer_tensors(&cfg, il).len()).min().unwrap_or(1).max(1);
        if cfg.n_layer as usize * per_layer > g.n_tensors() {
            return Err(k.err(
                K_BLOCK_COUNT,
                &format!(
                    "at most {} layers (the file has {} tensors, {per_layer} or more per layer)",
                    g.n_tensors() / per_layer,
                    g.n_tensors()
                ),
                &cfg.n_layer.to_string(),
            ));
        }
        Ok(cfg)
    }
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let (l, q) = read_hf_config(&dir.join("qwen3-30b-a3b.config.json")).unwrap();
        let (lo, o) = read_hf_config(&dir.join("qwen3-omni-30b-a3b-instruct.config.json")).unwrap();
        assert_eq!((l.model_prefix, lo.model_prefix), ("model.", "thinker.model."));
        for c in [&q, &o] {
            assert_eq!(c.arch, "qwen3moe");
            assert_eq!((c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim), (48, 2048, 32, 4, 128));
            assert_eq!((c.n_expert, c.n_expert_used, c.n_ff_exp, c.norm_topk_prob), (128, 8, 768, true));
            assert_eq!((c.rope_theta, c.rms_eps), (1e6, 1e-6));
        }
        assert_eq!((q.n_vocab, o.n_vocab), (151936, 152064));
    }

    #[test]
    fn published_hybrid_configs_read_as_the_real_models() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        // (file, n_layer, n_embd, heads, experts, used, FFN, shared FFN, key heads, value heads)
        let want = [
            ("qwen3.5-35b-a3b", 40, 2048, 16, 256, 8, 512, 512, 16, 32),
            ("qwen3.5-122b-a10b", 48, 3072, 32, 256, 8, 1024, 1024, 16, 64),
            ("qwen3.5-397b-a17b", 60, 4096, 32, 512, 10, 1024, 1024, 16, 64),
            ("qwen3-next-80b-a3b", 48, 2048, 16, 512, 10, 512, 512, 16, 32),
        ];
        for (name, n_layer, n_embd, n_head, n_expert, used, ff, sh, nk, nv) in want {
            let (l, c) = read_hf_config(&dir.join(format!("{name}.config.json"))).unwrap();
            let next = name.starts_with("qwen3-next");
            assert_eq!(c.arch, if next { "qwen3next" } else { "qwen35moe" }, "{name}");
            assert_eq!(l.model_prefix, if next { "model." } else { "model.language_model." }, "{name}");
            assert_eq!(
                (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim),
                (n_layer, n_embd, n_head, 2, 256),
                "{name}"
            );
            assert_eq!((c.n_expert, c.n_expert_used, c.n_ff_exp, c.n_ff_shexp), (n_expert, used, ff, sh), "{name}");
            assert_eq!(c.ssm, Some(Ssm { d_conv: 4, d_state: 128, n_group: nk, dt_rank: nv }), "{name}");
            // Three linear layers to one full one; RoPE on a quarter of each head.
            let full: Vec<u32> = (0..c.n_layer).filter(|&il| !c.is_recurrent(il)).collect();
            assert_eq!(full, (0..c.n_layer / 4).map(|i| 4 * i + 3).collect::<Vec<_>>(), "{name}");
            assert_eq!((c.n_rot, c.rope_theta, c.norm_topk_prob), (64, 1e7, true), "{name}");
            assert_eq!(c.rope_sections, if next { None } else { Some([11, 11, 10, 0]) }, "{name}");
            assert_eq!(c.n_vocab, if next { 151936 } else { 248320 }, "{name}");
        }
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
