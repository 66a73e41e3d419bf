//! GGUF key and tensor names every architecture shares, in one place: llama.cpp's
//! `<arch>.*` hyperparameter keys (the prefix is the architecture's, see `arch`), the
//! `tokenizer.ggml.*` keys, `blk.N.*` tensors, and sage's own manifest keys. A tensor or key
//! only one family has is named in that family's file under `src/arch/`.

pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
pub const GENERAL_ALIGNMENT: &str = "general.alignment";
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";

/// `{arch}.{suffix}`: a hyperparameter key of llama.cpp's architecture `arch`.
pub fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

pub const K_BLOCK_COUNT: &str = "block_count";
pub const K_CONTEXT_LENGTH: &str = "context_length";
pub const K_EMBEDDING_LENGTH: &str = "embedding_length";
pub const K_FEED_FORWARD_LENGTH: &str = "feed_forward_length";
pub const K_EXPERT_FEED_FORWARD_LENGTH: &str = "expert_feed_forward_length";
pub const K_EXPERT_SHARED_FEED_FORWARD_LENGTH: &str = "expert_shared_feed_forward_length";
pub const K_HEAD_COUNT: &str = "attention.head_count";
pub const K_HEAD_COUNT_KV: &str = "attention.head_count_kv";
pub const K_KEY_LENGTH: &str = "attention.key_length";
pub const K_VALUE_LENGTH: &str = "attention.value_length";
pub const K_RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
pub const K_ROPE_FREQ_BASE: &str = "rope.freq_base";
pub const K_ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
pub const K_ROPE_SCALING_TYPE: &str = "rope.scaling.type";
pub const K_ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
pub const K_ROPE_SCALING_ORIG_CTX: &str = "rope.scaling.original_context_length";
pub const K_ROPE_SCALING_BETA_FAST: &str = "rope.scaling.yarn_beta_fast";
pub const K_ROPE_SCALING_BETA_SLOW: &str = "rope.scaling.yarn_beta_slow";
pub const K_ROPE_SCALING_YARN_LOG_MUL: &str = "rope.scaling.yarn_log_multiplier";
pub const K_Q_LORA_RANK: &str = "attention.q_lora_rank";
pub const K_KV_LORA_RANK: &str = "attention.kv_lora_rank";
pub const K_KEY_LENGTH_MLA: &str = "attention.key_length_mla";
pub const K_VALUE_LENGTH_MLA: &str = "attention.value_length_mla";
pub const K_SLIDING_WINDOW: &str = "attention.sliding_window";
pub const K_ROPE_DIMENSION_SECTIONS: &str = "rope.dimension_sections";
pub const K_FULL_ATTENTION_INTERVAL: &str = "full_attention_interval";
pub const K_RECURRENT_LAYERS: &str = "attention.recurrent_layers";
pub const K_SSM_CONV_KERNEL: &str = "ssm.conv_kernel";
pub const K_SSM_INNER_SIZE: &str = "ssm.inner_size";
pub const K_SSM_STATE_SIZE: &str = "ssm.state_size";
pub const K_SSM_TIME_STEP_RANK: &str = "ssm.time_step_rank";
pub const K_SSM_GROUP_COUNT: &str = "ssm.group_count";
pub const K_EXPERT_COUNT: &str = "expert_count";
pub const K_EXPERT_USED_COUNT: &str = "expert_used_count";
pub const K_EXPERT_WEIGHTS_NORM: &str = "expert_weights_norm";
pub const K_VOCAB_SIZE: &str = "vocab_size";
pub const K_EXPERT_SHARED_COUNT: &str = "expert_shared_count";
pub const K_EXPERT_GATING_FUNC: &str = "expert_gating_func";
pub const K_EXPERT_WEIGHTS_SCALE: &str = "expert_weights_scale";
pub const K_EXPERT_GROUP_COUNT: &str = "expert_group_count";
pub const K_EXPERT_GROUP_USED_COUNT: &str = "expert_group_used_count";
pub const K_LEADING_DENSE_BLOCK_COUNT: &str = "leading_dense_block_count";
pub const K_NEXTN_PREDICT_LAYERS: &str = "nextn_predict_layers";

pub const TOK_MODEL: &str = "tokenizer.ggml.model";
pub const TOK_PRE: &str = "tokenizer.ggml.pre";
pub const TOK_TOKENS: &str = "tokenizer.ggml.tokens";
pub const TOK_SCORES: &str = "tokenizer.ggml.scores";
pub const TOK_TYPES: &str = "tokenizer.ggml.token_type";
pub const TOK_MERGES: &str = "tokenizer.ggml.merges";
pub const TOK_BOS: &str = "tokenizer.ggml.bos_token_id";
pub const TOK_EOS: &str = "tokenizer.ggml.eos_token_id";
pub const TOK_UNK: &str = "tokenizer.ggml.unknown_token_id";
pub const TOK_EOT: &str = "tokenizer.ggml.eot_token_id";
pub const TOK_PAD: &str = "tokenizer.ggml.padding_token_id";
pub const TOK_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const TOK_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const TOK_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const TOK_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.cpp's token types (`llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

// sage's manifest, stored in base.gguf.
pub const SAGE_FORMAT_VERSION: &str = "sage.format_version";
pub const SAGE_CONVERSION_ID: &str = "sage.conversion_id";
pub const SAGE_SOURCE: &str = "sage.source";
pub const SAGE_EXPERT_ALIGNMENT: &str = "sage.experts.alignment";

/// Fields of a layer's cold copies (`sage-convert --cold-quant`): their shard, offsets and
/// types (the ids and shapes are the layer's).
/// Per layer (format 2): whether the records end with the experts' biases.
pub const BIASES: &str = "biases";
pub const COLD_FILE: &str = "cold.file";
pub const COLD_OFFSETS: &str = "cold.offsets";
pub const COLD_TYPES: &str = "cold.types";

/// `sage.experts.blk.{il}.{field}`: `file`, `ids`, `offsets`, `types`, `shapes`, `cold.file`,
/// `cold.offsets`, `cold.types`.
pub fn sage_layer_key(il: u32, field: &str) -> String {
    format!("sage.experts.blk.{il}.{field}")
}

pub const SAGE_PREFIX: &str = "sage.";

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";

/// `blk.{il}.{suffix}`: a tensor of layer `il` (`suffix` is `attn_q.weight`, `attn_q.bias`, …).
pub fn blk(il: u32, suffix: &str) -> String {
    format!("blk.{il}.{suffix}")
}

/// Layer `il` and suffix of a `blk.N.*` name.
pub fn split_blk(name: &str) -> Option<(u32, &str)> {
    let (il, suffix) = name.strip_prefix("blk.")?.split_once('.')?;
    Some((il.parse().ok()?, suffix))
}

pub const ATTN_NORM: &str = "attn_norm.weight";
pub const ATTN_Q: &str = "attn_q.weight";
pub const ATTN_K: &str = "attn_k.weight";
pub const ATTN_V: &str = "attn_v.weight";
pub const ATTN_Q_BIAS: &str = "attn_q.bias";
pub const ATTN_K_BIAS: &str = "attn_k.bias";
pub const ATTN_V_BIAS: &str = "attn_v.bias";
pub const ATTN_OUT: &str = "attn_output.weight";
pub const ATTN_OUT_BIAS: &str = "attn_output.bias";
pub const ATTN_SINKS: &str = "attn_sinks.weight";
pub const ATTN_POST_NORM: &str = "post_attention_norm.weight";
pub const ATTN_Q_NORM: &str = "attn_q_norm.weight";
pub const ATTN_K_NORM: &str = "attn_k_norm.weight";
/// Latent attention (llama.cpp's deepseek2): the query's low-rank pair and its norm, the
/// compressed latent with the key's RoPE part (`kv_a_mqa`) and its norm, and the latent's
/// up-projections to each head's key (`k_b`, applied to the query) and value (`v_b`).
pub const ATTN_Q_A: &str = "attn_q_a.weight";
pub const ATTN_Q_B: &str = "attn_q_b.weight";
pub const ATTN_Q_A_NORM: &str = "attn_q_a_norm.weight";
pub const ATTN_KV_A_MQA: &str = "attn_kv_a_mqa.weight";
pub const ATTN_KV_A_NORM: &str = "attn_kv_a_norm.weight";
pub const ATTN_K_B: &str = "attn_k_b.weight";
pub const ATTN_V_B: &str = "attn_v_b.weight";
pub const FFN_NORM: &str = "ffn_norm.weight";
/// The router.
pub const FFN_GATE_INP: &str = "ffn_gate_inp.weight";
pub const FFN_GATE_INP_BIAS: &str = "ffn_gate_inp.bias";
/// The router's correction bias, added to its scores for choosing experts only (DeepSeek-V3's
/// and GLM-4.5's `e_score_correction_bias`).
pub const FFN_EXP_PROBS_B: &str = "exp_probs_b.bias";
/// A dense layer's FFN.
pub const FFN_GATE: &str = "ffn_gate.weight";
pub const FFN_UP: &str = "ffn_up.weight";
pub const FFN_DOWN: &str = "ffn_down.weight";
/// A shared expert (always resident, part of the base) and its gate.
pub const FFN_GATE_SHEXP: &str = "ffn_gate_shexp.weight";
pub const FFN_UP_SHEXP: &str = "ffn_up_shexp.weight";
pub const FFN_DOWN_SHEXP: &str = "ffn_down_shexp.weight";
pub const FFN_GATE_INP_SHEXP: &str = "ffn_gate_inp_shexp.weight";

/// A Gated-DeltaNet linear-attention layer (Qwen3.5, Qwen3-Next): the q/k/v projection (its
/// rows q, k, v) and the output gate z, the causal convolution's kernels, the gate's bias and
/// decay (−exp(A_log)), beta and alpha (or both in one, Qwen3-Next's `ssm_ba`), the gated
/// norm and the output projection.
pub const ATTN_QKV: &str = "attn_qkv.weight";
pub const ATTN_GATE: &str = "attn_gate.weight";
pub const SSM_CONV1D: &str = "ssm_conv1d.weight";
pub const SSM_DT: &str = "ssm_dt.bias";
pub const SSM_A: &str = "ssm_a";
pub const SSM_BETA: &str = "ssm_beta.weight";
pub const SSM_ALPHA: &str = "ssm_alpha.weight";
pub const SSM_BA: &str = "ssm_ba.weight";
pub const SSM_NORM: &str = "ssm_norm.weight";
pub const SSM_OUT: &str = "ssm_out.weight";

/// The three projections of an expert, in the order they are laid out in a shard record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// llama.cpp's stacked tensor suffix: `ffn_gate_exps` etc.
    pub fn exps(self) -> &'static str {
        match self {
            Proj::Gate => "ffn_gate_exps",
            Proj::Up => "ffn_up_exps",
            Proj::Down => "ffn_down_exps",
        }
    }

    /// llama.cpp's name of layer `il`'s stacked tensor: `blk.{il}.ffn_gate_exps.weight`.
    pub fn stacked(self, il: u32) -> String {
        format!("blk.{il}.{}.weight", self.exps())
    }

    /// llama.cpp's name of layer `il`'s stacked expert biases: `blk.{il}.ffn_gate_exps.bias`.
    pub fn stacked_bias(self, il: u32) -> String {
        format!("blk.{il}.{}.bias", self.exps())
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_round_trip() {
        assert_eq!(blk(3, ATTN_Q_BIAS), "blk.3.attn_q.bias");
        assert_eq!(split_blk("blk.12.ffn_gate_inp.weight"), Some((12, FFN_GATE_INP)));
        assert_eq!(split_blk("output.weight"), None);
        assert_eq!(Proj::Down.stacked(7), "blk.7.ffn_down_exps.weight");
    }
}
