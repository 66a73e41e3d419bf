//! Model families, one file each, as llama.cpp's `src/models/<arch>.cpp`. A family's file owns
//! what differs between families:
//!
//! - its hyperparameter keys: `config.json` in both transformers spellings, its GGUF
//!   `<arch>.*` keys, their defaults and checks (`hparams_hf`, `hparams_gguf`, `gguf_kv`);
//! - its tensors: the base tensors of a layer with their shapes and roles, their Hugging Face
//!   names and any reordering llama.cpp's layout needs (`layer_tensors`), the experts' names
//!   (`hf_expert`, `hf_fused_experts`);
//! - its layer graph up to the routed experts, attention variant included (`build_layer`),
//!   built from the pieces every family shares (`crate::graph`);
//! - its router's normalization (`ModelConfig::norm_topk_prob`, set by the family) and shared
//!   expert (`ModelConfig::n_ff_shexp`);
//! - its tokenizer's pre-tokenizer name for llama.cpp and its default chat template (for a model
//!   that brings none).
//!
//! What the families share (the routed experts over arena slots, attention over the KV cache,
//! norms, the output) is written once, in `crate::graph`; the runtime never names a family.
//! The implementation is chosen by Hugging Face `architectures` or GGUF
//! `general.architecture`.

use std::path::Path;

use crate::config::{GgufKeys, HfConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::ggml::{GgmlType, Gguf, GgufValue};
use crate::graph::{LayerInput, PreMoe};
use crate::names::*;
use crate::quant::fit;

/// `register!(file::Type, …)`: the module of each family's file, and `ARCHS`, in that order.
macro_rules! register {
    ($($file:ident :: $family:ident),* $(,)?) => {
        $(pub mod $file;)*
        /// Every architecture sage runs, in the order sage tries them.
        pub static ARCHS: &[&dyn Arch] = &[$(&$file::$family),*];
    };
}

// Adding a family: its file, and its entry in this line.
register!(
    qwen3moe::Qwen3Moe,
    mixtral::Mixtral,
    olmoe::Olmoe,
    qwen2moe::Qwen2Moe,
    gptoss::GptOss,
    qwen35moe::Qwen35Moe,
    qwen3next::Qwen3Next,
    glm4moe::Glm4Moe,
    deepseek2::Deepseek2
);

/// What a tensor is for, which decides the type sage-convert stores it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// 1-D norm weights: always f32, as llama.cpp keeps them.
    Norm,
    /// 1-D biases: always f32, as llama.cpp keeps them.
    Bias,
    /// A router (`ffn_gate_inp`, a shared expert's gate): always f32, as llama.cpp keeps it.
    Router,
    /// Matrices that take the requested type.
    Weight,
    /// Matrices llama.cpp's quantizer leaves in a float type (latent attention's
    /// `attn_kv_a_mqa`, `attn_k_b`, `attn_v_b`: `llama_tensor_quantize` skips them): f16 where a
    /// quantized type is asked for, else the type asked for.
    Float,
}

impl Role {
    /// The type sage-convert stores a tensor of this role with rows of `ne0` in when `wanted`
    /// is asked for: vectors and routers stay f32, matrices take `wanted` or the nearest type
    /// whose blocks fit the rows (`quant::fit`).
    pub fn target_type(self, wanted: GgmlType, ne0: u64) -> GgmlType {
        match self {
            Role::Norm | Role::Bias | Role::Router => GgmlType::F32,
            Role::Weight => fit(wanted, ne0),
            Role::Float if wanted.block_size() > 1 => GgmlType::F16,
            Role::Float => wanted,
        }
    }
}

/// How a Hugging Face tensor's data becomes llama.cpp's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromHf {
    AsIs,
    /// llama.cpp's `llama` architecture rotates adjacent pairs (RoPE "normal" mode) where
    /// transformers rotates the two halves of each head: llama.cpp's converter reorders the
    /// rows of q and k within each of the `n_head` heads, output row `2j + i` of a head taking
    /// input row `i * head_dim / 2 + j`.
    RopePairs {
        n_head: u32,
    },
    /// Qwen3.5's linear attention keeps its value heads grouped by key head (`per_k` value
    /// heads after each of the `n_k` key heads); ggml's gated delta rule broadcasts the key
    /// heads tiled (value head h uses key head h mod n_k), so llama.cpp's converter reorders
    /// the value heads: output head v·n_k + k is input head k·per_k + v. Rows from `skip` on
    /// (the value part of the q/k/v projection and of the convolution), in heads of `head`
    /// rows.
    VHeadRows {
        n_k: u32,
        per_k: u32,
        head: u64,
        skip: u64,
    },
    /// Qwen3-Next's fused `in_proj_qkvz`: per key head, q (`hk` rows), k (`hk`), v and z
    /// (`vpk` each: its value heads); llama.cpp's converter splits it into the q/k/v projection
    /// (every head's q, then every k, then every v) and the output gate z (`z: true`).
    QkvzSplit {
        n_k: u32,
        hk: u64,
        vpk: u64,
        z: bool,
    },
    /// The same reorder along the columns (the linear attention's output projection).
    VHeadCols {
        n_k: u32,
        per_k: u32,
        head: u64,
    },
    /// DeepSeek's `kv_b_proj` ([n_head · (nope + v) rows of kv_lora_rank]: per head, `nope`
    /// key rows then `v` value rows) split as llama.cpp's converter splits it for latent
    /// attention: the value rows as they are (`attn_v_b`, [kv_lora_rank, v, n_head]), or, with
    /// `key`, each head's key rows transposed (`attn_k_b`, [nope, kv_lora_rank, n_head]: row
    /// h · kv_lora_rank + r holds column r of head h's key rows).
    KvB {
        n_head: u32,
        nope: u64,
        v: u64,
        key: bool,
    },
    /// A vector whose values llama.cpp's converter maps (`map`), its elements first reordered
    /// by value head (`v_heads`: `n_k`, `per_k`, one element per head); computed in f32 and
    /// stored f32.
    Values {
        map: ValueMap,
        v_heads: Option<(u32, u32)>,
    },
}

/// A value transform of `FromHf::Values`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueMap {
    Same,
    /// w + 1: a zero-centred RMSNorm weight (Qwen3.5, Qwen3-Next compute x · (1 + w)).
    AddOne,
    /// −exp(w): a Gated-DeltaNet's decay rate from `A_log`.
    NegExp,
}

impl ValueMap {
    pub fn apply(self, x: f32) -> f32 {
        match self {
            ValueMap::Same => x,
            ValueMap::AddOne => x + 1.0,
            ValueMap::NegExp => -x.exp(),
        }
    }
}

/// Index in a grouped layout of index `i` of the tiled one (`FromHf::VHeadRows`).
pub fn v_head_source(i: u64, n_k: u32, per_k: u32, head: u64) -> u64 {
    let (h, w) = (i / head, i % head);
    let (n_k, per_k) = (n_k as u64, per_k as u64);
    if h >= n_k * per_k {
        return i;
    }
    let (v, k) = (h / n_k, h % n_k);
    (k * per_k + v) * head + w
}

impl FromHf {
    /// The source row that output row `r` of a tensor of `n_rows` rows comes from.
    pub fn source_row(self, r: u64, n_rows: u64) -> u64 {
        match self {
            FromHf::AsIs | FromHf::VHeadCols { .. } | FromHf::Values { .. } => r,
            // The key part is a transpose, read by `source::HfSource` itself.
            FromHf::KvB { key: true, .. } => r,
            FromHf::KvB { nope, v, key: false, .. } => (r / v) * (nope + v) + nope + r % v,
            FromHf::VHeadRows { n_k, per_k, head, skip } => {
                if r < skip {
                    r
                } else {
                    skip + v_head_source(r - skip, n_k, per_k, head)
                }
            }
            FromHf::QkvzSplit { n_k, hk, vpk, z } => {
                let (kd, group) = (n_k as u64 * hk, 2 * hk + 2 * vpk);
                let (head, at) = if z {
                    (r / vpk, 2 * hk + vpk + r % vpk)
                } else if r < kd {
                    (r / hk, r % hk)
                } else if r < 2 * kd {
                    ((r - kd) / hk, hk + (r - kd) % hk)
                } else {
                    ((r - 2 * kd) / vpk, 2 * hk + (r - 2 * kd) % vpk)
                };
                head * group + at
            }
            FromHf::RopePairs { n_head } => {
                let d = n_rows / n_head as u64;
                let (head, w) = (r / d, r % d);
                head * d + (w % 2) * (d / 2) + w / 2
            }
        }
    }
}

/// One base tensor of a model: llama.cpp's name, its shape (ggml order), role, the names it
/// has in a Hugging Face checkpoint (relative to the text model's prefix; the first present
/// is read) and how its data is rearranged.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub role: Role,
    pub hf: Vec<String>,
    pub from_hf: FromHf,
}

impl TensorSpec {
    /// Tensor `suffix` of layer `il`, named `hf` (with `{il}` for the layer) in a checkpoint.
    pub fn layer(il: u32, suffix: &str, ne: &[u64], role: Role, hf: &[&str]) -> TensorSpec {
        TensorSpec {
            name: blk(il, suffix),
            ne: ne.to_vec(),
            role,
            hf: hf.iter().map(|h| h.replace("{il}", &il.to_string())).collect(),
            from_hf: FromHf::AsIs,
        }
    }

    pub fn with(mut self, from_hf: FromHf) -> TensorSpec {
        self.from_hf = from_hf;
        self
    }
}

/// Where the text model lies in a Hugging Face checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HfLayout {
    /// Prefix of the text model's tensors: `model.`, `thinker.model.`.
    pub model_prefix: &'static str,
    /// The lm head's full name.
    pub lm_head: &'static str,
    /// The objects of `config.json` that hold the text model's hyperparameters (empty: the
    /// top level).
    pub config_path: &'static [&'static str],
    /// Prefixes of the tensors that belong to the text model; empty: all of them.
    pub keep: &'static [&'static str],
}

impl HfLayout {
    pub const PLAIN: HfLayout =
        HfLayout { model_prefix: "model.", lm_head: "lm_head.weight", config_path: &[], keep: &[] };

    /// Whether a safetensors name belongs to the text model.
    pub fn keeps(&self, name: &str) -> bool {
        self.keep.is_empty() || self.keep.iter().any(|p| name.starts_with(p))
    }
}

/// A model family. See the module documentation for what its file owns.
pub trait Arch: Sync {
    /// sage's name of the family (`ModelConfig::arch`): `qwen3moe`, `mixtral`, …
    fn name(&self) -> &'static str;
    /// How people call it: `Qwen3-MoE`.
    fn family(&self) -> &'static str;
    /// llama.cpp's architecture: GGUF `general.architecture` and the prefix of its keys.
    fn gguf_arch(&self) -> &'static str;
    /// Whether a GGUF of architecture `gguf_arch()` is this family (llama.cpp writes Mixtral
    /// as `llama`, which is also every dense Llama).
    fn accepts_gguf(&self, _keys: &GgufKeys) -> bool {
        true
    }
    /// Hugging Face `architectures` (and `model_type`) values of this family.
    fn hf_names(&self) -> &'static [&'static str];
    /// Where the text model lies in a checkpoint of Hugging Face architecture `hf_arch`.
    fn hf_layout(&self, _hf_arch: &str) -> HfLayout {
        HfLayout::PLAIN
    }
    /// Hyperparameters from a `config.json` (the text model's object); `name` is the model's.
    fn hparams_hf(&self, c: &HfConfig, name: String) -> Result<ModelConfig>;
    /// The family's own GGUF keys, over what `ModelConfig::read_gguf` read in common: the
    /// FFN widths, the router's normalization.
    fn hparams_gguf(&self, k: &GgufKeys, cfg: &mut ModelConfig) -> Result<()>;
    /// The family's own GGUF keys, written after the common ones.
    fn gguf_kv(&self, cfg: &ModelConfig, kv: &mut Vec<(String, GgufValue)>);
    /// The base tensors of layer `il` (attention, norms, router, shared expert).
    fn layer_tensors(&self, cfg: &ModelConfig, il: u32) -> Vec<TensorSpec>;
    /// Hugging Face name (relative to the model prefix) of projection `p` of expert `e` in
    /// layer `il`, in the per-expert layout published checkpoints use.
    fn hf_expert(&self, il: u32, e: u32, p: Proj) -> String {
        let hf = match p {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        };
        format!("layers.{il}.mlp.experts.{e}.{hf}.weight")
    }
    /// transformers 5's fused layout of layer `il`'s experts (relative to the model prefix):
    /// `gate_up_proj` [E, 2F, D] with the gate rows first, and `down_proj` [E, D, F].
    fn hf_fused_experts(&self, il: u32) -> [String; 2] {
        [format!("layers.{il}.mlp.experts.gate_up_proj"), format!("layers.{il}.mlp.experts.down_proj")]
    }
    /// gpt-oss's layout of layer `il`'s experts, the prefix (relative to the model prefix) of
    /// `gate_up_proj` [E, D, 2F] (x @ W, gate and up interleaved along 2F), `down_proj`
    /// [E, F, D], their biases `gate_up_proj_bias` [E, 2F] and `down_proj_bias` [E, D], or
    /// MXFP4 `gate_up_proj_blocks` / `_scales` ([E, 2F, D/32, 16] / [E, 2F, D/32], rows
    /// interleaved alike) and `down_proj_blocks` / `_scales`; None: the layouts above.
    fn hf_interleaved_experts(&self, _il: u32) -> Option<String> {
        None
    }
    /// The layer's graph up to the routed experts: attention over the cache, the residual,
    /// the FFN norm (what the router and the experts see), and anything added beside the
    /// routed experts (a shared expert).
    fn build_layer<'a>(&self, l: &LayerInput<'a>) -> PreMoe<'a>;
    /// llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer with GPT-2's split
    /// (llama.cpp tells them apart by a hash of the tokenizer; each family that uses one
    /// has its name).
    fn gpt2_pre(&self) -> &'static str {
        "gpt-2"
    }
    /// The family's default chat template (Jinja, as tokenizer_config.json writes one), for a
    /// model that brings none.
    fn chat_template(&self) -> &'static str;
    /// How the output norm's weight becomes llama.cpp's (`FromHf::Values` with `AddOne` for a
    /// zero-centred norm).
    fn output_norm_from_hf(&self) -> FromHf {
        FromHf::AsIs
    }
    /// Published models of the family, by the names `sage-convert synth --like` takes, with
    /// their config.json (configs/).
    fn published(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// `ARCHS` by sage's name.
pub fn by_name(name: &str) -> Option<&'static dyn Arch> {
    ARCHS.iter().copied().find(|a| a.name() == name)
}

/// `ARCHS` by a Hugging Face `architectures` or `model_type` value.
pub fn by_hf(hf_arch: &str) -> Option<&'static dyn Arch> {
    ARCHS.iter().copied().find(|a| a.hf_names().contains(&hf_arch))
}

/// The Hugging Face architectures sage converts, for error messages.
pub fn supported_hf() -> String {
    let names: Vec<&str> =
        ARCHS.iter().flat_map(|a| a.hf_names().iter().copied().filter(|n| n.contains("For"))).collect();
    names.join(", ")
}

/// The family of a GGUF, by `general.architecture` (and what the family checks beyond it).
pub fn by_gguf(g: &Gguf, path: &Path) -> Result<&'static dyn Arch> {
    let got = match g.get(GENERAL_ARCHITECTURE) {
        Some(GgufValue::Str(s)) => s,
        Some(v) => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                key: GENERAL_ARCHITECTURE.into(),
                reason: format!("expected a string, got {}", v.type_name()),
            })
        }
        None => "(none)".into(),
    };
    let found = ARCHS
        .iter()
        .copied()
        .find(|a| a.gguf_arch() == got && a.accepts_gguf(&GgufKeys { g, path, prefix: a.gguf_arch() }));
    found.ok_or_else(|| {
        let mut expected: Vec<String> = ARCHS.iter().map(|a| format!("'{}' ({})", a.gguf_arch(), a.family())).collect();
        expected.dedup();
        let why = if ARCHS.iter().any(|a| a.gguf_arch() == got) { " without experts" } else { "" };
        Error::UnknownArchitecture {
            path: path.to_path_buf(),
            got: format!("'{got}'{why}"),
            expected: expected.join(", "),
        }
    })
}

/// Every non-expert tensor of a model with `cfg`, in file order: the token embedding, each
/// layer's, the output norm and the output (absent when tied to the token embedding).
pub fn base_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (e, v) = (cfg.n_embd, cfg.n_vocab);
    let plain = |name: &str, ne: Vec<u64>, role, hf: &str| TensorSpec {
        name: name.into(),
        ne,
        role,
        hf: vec![hf.into()],
        from_hf: FromHf::AsIs,
    };
    let mut t = vec![plain(TOKEN_EMBD, vec![e, v], Role::Weight, "embed_tokens.weight")];
    for il in 0..cfg.n_layer {
        t.extend(cfg.arch().layer_tensors(cfg, il));
    }
    t.push(plain(OUTPUT_NORM, vec![e], Role::Norm, "norm.weight").with(cfg.arch().output_norm_from_hf()));
    if !cfg.tie_word_embeddings {
        // The lm head lies outside the text model's prefix: `HfSource` names it by its layout.
        t.push(plain(OUTPUT, vec![e, v], Role::Weight, ""));
    }
    t
}

/// The tensors of a standard attention block: norm, q/k/v/o (q/k/v with biases when `bias`),
/// the FFN norm and the router, named as transformers names them in Qwen, OLMoE and
/// Mixtral checkpoints (`router` gives the router's Hugging Face names).
pub(crate) fn attention_tensors(cfg: &ModelConfig, il: u32, bias: bool, router: &[&str]) -> Vec<TensorSpec> {
    let e = cfg.n_embd;
    let q = cfg.n_head as u64 * cfg.head_dim;
    let kv = cfg.n_head_kv as u64 * cfg.head_dim;
    let mut t = vec![
        TensorSpec::layer(il, ATTN_NORM, &[e], Role::Norm, &["layers.{il}.input_layernorm.weight"]),
        TensorSpec::layer(il, ATTN_Q, &[e, q], Role::Weight, &["layers.{il}.self_attn.q_proj.weight"]),
        TensorSpec::layer(il, ATTN_K, &[e, kv], Role::Weight, &["layers.{il}.self_attn.k_proj.weight"]),
        TensorSpec::layer(il, ATTN_V, &[e, kv], Role::Weight, &["layers.{il}.self_attn.v_proj.weight"]),
    ];
    if bias {
        t.push(TensorSpec::layer(il, ATTN_Q_BIAS, &[q], Role::Bias, &["layers.{il}.self_attn.q_proj.bias"]));
        t.push(TensorSpec::layer(il, ATTN_K_BIAS, &[kv], Role::Bias, &["layers.{il}.self_attn.k_proj.bias"]));
        t.push(TensorSpec::layer(il, ATTN_V_BIAS, &[kv], Role::Bias, &["layers.{il}.self_attn.v_proj.bias"]));
    }
    t.push(TensorSpec::layer(il, ATTN_OUT, &[q, e], Role::Weight, &["layers.{il}.self_attn.o_proj.weight"]));
    t.push(TensorSpec::layer(il, FFN_NORM, &[e], Role::Norm, &["layers.{il}.post_attention_layernorm.weight"]));
    t.push(TensorSpec::layer(il, FFN_GATE_INP, &[e, cfg.n_expert as u64], Role::Router, router));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_family_is_found_by_its_names() {
        for a in ARCHS {
            assert_eq!(by_name(a.name()).map(|b| b.name()), Some(a.name()));
            for hf in a.hf_names() {
                assert_eq!(by_hf(hf).map(|b| b.name()), Some(a.name()), "{hf}");
            }
        }
        let mut names: Vec<&str> = ARCHS.iter().map(|a| a.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ARCHS.len());
    }

    #[test]
    fn rope_pairs_interleave_the_halves_of_each_head() {
        // Two heads of 4 rows: output rows (0 1 2 3) of a head take input rows (0 2 1 3).
        let p = FromHf::RopePairs { n_head: 2 };
        let rows: Vec<u64> = (0..8).map(|r| p.source_row(r, 8)).collect();
        assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(FromHf::AsIs.source_row(5, 8), 5);
    }

    #[test]
    fn value_heads_go_from_grouped_to_tiled() {
        // 2 key heads with 2 value heads each, heads of 3 rows, after 4 rows of q and k:
        // grouped (k0v0 k0v1 k1v0 k1v1) becomes tiled (k0v0 k1v0 k0v1 k1v1).
        let p = FromHf::VHeadRows { n_k: 2, per_k: 2, head: 3, skip: 4 };
        let rows: Vec<u64> = (0..16).map(|r| p.source_row(r, 16)).collect();
        assert_eq!(rows, vec![0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9, 13, 14, 15]);
        // 2 key heads of 1 row, one value head of 2 rows each: (q k v v z z) per key head.
        let qkv = FromHf::QkvzSplit { n_k: 2, hk: 1, vpk: 2, z: false };
        assert_eq!((0..8).map(|r| qkv.source_row(r, 12)).collect::<Vec<_>>(), vec![0, 6, 1, 7, 2, 3, 8, 9]);
        let z = FromHf::QkvzSplit { n_k: 2, hk: 1, vpk: 2, z: true };
        assert_eq!((0..4).map(|r| z.source_row(r, 12)).collect::<Vec<_>>(), vec![4, 5, 10, 11]);
        assert_eq!(ValueMap::NegExp.apply(0.0), -1.0);
        assert_eq!(ValueMap::AddOne.apply(0.5), 1.5);
    }

    #[test]
    fn vectors_and_routers_stay_f32() {
        assert_eq!(Role::Bias.target_type(GgmlType::Q4_K, 256), GgmlType::F32);
        assert_eq!(Role::Router.target_type(GgmlType::Q8_0, 256), GgmlType::F32);
        assert_eq!(Role::Weight.target_type(GgmlType::Q4_K, 96), GgmlType::Q5_0);
        assert_eq!(Role::Float.target_type(GgmlType::Q4_K, 512), GgmlType::F16);
        assert_eq!(Role::Float.target_type(GgmlType::BF16, 512), GgmlType::BF16);
    }
}
