//! GGUF key and tensor names in one place: llama.cpp's `qwen3moe.*` hyperparameters and
//! `blk.N.*` tensors, the tokenizer keys, and sage's own manifest keys.

pub const ARCH: &str = "qwen3moe";

pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";

/// `qwen3moe.{suffix}`.
pub fn arch_key(suffix: &str) -> String {
    format!("{ARCH}.{suffix}")
}

pub const K_BLOCK_COUNT: &str = "block_count";
pub const K_CONTEXT_LENGTH: &str = "context_length";
pub const K_EMBEDDING_LENGTH: &str = "embedding_length";
pub const K_FEED_FORWARD_LENGTH: &str = "feed_forward_length";
pub const K_EXPERT_FEED_FORWARD_LENGTH: &str = "expert_feed_forward_length";
pub const K_HEAD_COUNT: &str = "attention.head_count";
pub const K_HEAD_COUNT_KV: &str = "attention.head_count_kv";
pub const K_KEY_LENGTH: &str = "attention.key_length";
pub const K_VALUE_LENGTH: &str = "attention.value_length";
pub const K_RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
pub const K_ROPE_FREQ_BASE: &str = "rope.freq_base";
pub const K_EXPERT_COUNT: &str = "expert_count";
pub const K_EXPERT_USED_COUNT: &str = "expert_used_count";
pub const K_EXPERT_WEIGHTS_NORM: &str = "expert_weights_norm";
pub const K_VOCAB_SIZE: &str = "vocab_size";

pub const TOK_MODEL: &str = "tokenizer.ggml.model";
pub const TOK_PRE: &str = "tokenizer.ggml.pre";
pub const TOK_TOKENS: &str = "tokenizer.ggml.tokens";
pub const TOK_TYPES: &str = "tokenizer.ggml.token_type";
pub const TOK_MERGES: &str = "tokenizer.ggml.merges";
pub const TOK_BOS: &str = "tokenizer.ggml.bos_token_id";
pub const TOK_EOS: &str = "tokenizer.ggml.eos_token_id";
pub const TOK_PAD: &str = "tokenizer.ggml.padding_token_id";
pub const TOK_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
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

/// `sage.experts.blk.{il}.{field}`: `file`, `ids`, `offsets`, `types`.
pub fn sage_layer_key(il: u32, field: &str) -> String {
    format!("sage.experts.blk.{il}.{field}")
}

pub const SAGE_PREFIX: &str = "sage.";

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";

/// `blk.{il}.{suffix}.weight`.
pub fn blk(il: u32, suffix: &str) -> String {
    format!("blk.{il}.{suffix}.weight")
}

pub const ATTN_NORM: &str = "attn_norm";
pub const ATTN_Q: &str = "attn_q";
pub const ATTN_K: &str = "attn_k";
pub const ATTN_V: &str = "attn_v";
pub const ATTN_OUT: &str = "attn_output";
pub const ATTN_Q_NORM: &str = "attn_q_norm";
pub const ATTN_K_NORM: &str = "attn_k_norm";
pub const FFN_NORM: &str = "ffn_norm";
pub const FFN_GATE_INP: &str = "ffn_gate_inp";

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

    /// Hugging Face's per-expert name: `gate_proj` etc.
    pub fn hf(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
