#!/usr/bin/env python3
"""Make sage's tiny reference fixtures with Hugging Face transformers.

Writes, under tests/fixtures/:
  tiny-qwen3moe/        a random-weight Qwen3MoeForCausalLM (bf16 safetensors, config.json,
                        tokenizer.json, tokenizer_config.json) as transformers saves it
  tiny-qwen3-omni/      the same weights shaped like Qwen3-Omni-30B-A3B: thinker-prefixed
                        names, one tensor per expert, config nested under
                        thinker_config.text_config (transformers 4.x key spelling), two
                        safetensors shards with an index, and small audio/vision/talker
                        tensors that a converter must skip
  reference.safetensors token ids and full f32 logits of transformers for each prompt, and the
                        same with routing restricted to a pool of experts
  reference.json        the prompts, their names and the pool

Usage (CPU torch is enough):  python3 scripts/make_fixtures.py
Deterministic: fixed seeds; the tokenizer is trained on text generated below.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
PLAIN = os.path.join(ROOT, "tiny-qwen3moe")
OMNI = os.path.join(ROOT, "tiny-qwen3-omni")

# Qwen2/Qwen3's pre-tokenizer split (llama.cpp calls it "qwen2").
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINED_VOCAB = 500
VOCAB_SIZE = 512  # embedding rows; larger than the tokenizer, as in the real Qwen3 checkpoints

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PROMPTS = [
    ("fox", "The quick brown fox jumps over the lazy dog."),
    ("code", "def main():\n    return 42  # the answer\n"),
    ("mixed", "Hello, world! 12345 caf\u00e9 na\u00efve \u00fcber \u2014 done.  Two  spaces\n\nend"),
    ("chat", "<|im_start|>user\nWhat is a mixture of experts?<|im_end|>\n<|im_start|>assistant\n"),
]
POOL = [0, 1, 2, 3]


def corpus():
    """Deterministic English-ish and code-ish text for the tiny BPE."""
    words = ("the quick brown fox jumps over lazy dog model expert router layer token weight "
             "attention memory device stream arena cache hello world answer return main value "
             "mixture small large run test file read write cafe naive uber done spaces end").split()
    g = torch.Generator().manual_seed(7)
    lines = []
    for i in range(4000):
        n = int(torch.randint(3, 12, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        s = " ".join(words[j] for j in idx)
        if i % 5 == 0:
            s = s.capitalize() + "."
        if i % 7 == 0:
            s = f"def {words[idx[0]]}():\n    return {i}\n"
        if i % 11 == 0:
            s += f" {i * 37} caf\u00e9 na\u00efve \u00fcber \u2014, !?"
        lines.append(s)
    return lines


def make_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    return tok


def config(n_vocab):
    return Qwen3MoeConfig(
        vocab_size=n_vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=n_vocab_special("<|im_end|>"), attn_implementation="eager",
    )


_TOK = None


def n_vocab_special(s):
    return _TOK.token_to_id(s)


def randomize(model):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                # A spread-out router, so top-k choices are well separated.
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    # Round to bf16 (what is stored) so the f32 reference sees exactly the stored weights.
    model.to(torch.bfloat16).to(torch.float32)


def logits_for(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().contiguous()


def pooled_logits(model, ids, pool):
    """Reference for a pool: router logits of experts outside the pool are -inf before softmax."""
    orig = modeling_qwen3_moe.Qwen3MoeTopKRouter.forward
    mask = torch.full((model.config.num_experts,), float("-inf"))
    mask[pool] = 0.0

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = torch.nn.functional.linear(hidden_states, self.weight) + mask
        probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top_v, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_v /= top_v.sum(dim=-1, keepdim=True)
        return router_logits, top_v.to(router_logits.dtype), top_i

    modeling_qwen3_moe.Qwen3MoeTopKRouter.forward = forward
    try:
        return logits_for(model, ids)
    finally:
        modeling_qwen3_moe.Qwen3MoeTopKRouter.forward = orig


def hf_state_per_expert(model):
    """State dict with one tensor per expert projection, as published checkpoints store it."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.to(torch.bfloat16).contiguous()
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            n_ff = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :n_ff].clone()
                out[f"{pre}{e}.up_proj.weight"] = v[e, n_ff:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def write_omni(model, cfg):
    os.makedirs(OMNI, exist_ok=True)
    state = hf_state_per_expert(model)
    thinker = {}
    for k, v in state.items():
        thinker["thinker." + k] = v  # model.* -> thinker.model.*, lm_head.* -> thinker.lm_head.*
    g = torch.Generator().manual_seed(99)
    extra = {  # parts sage-convert must skip
        "thinker.audio_tower.conv1.weight": torch.randn(8, 4, 3, generator=g).to(torch.bfloat16),
        "thinker.visual.patch_embed.proj.weight": torch.randn(8, 3, 2, 2, generator=g).to(torch.bfloat16),
        "talker.model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "code2wav.decoder.0.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
    }
    names = sorted(thinker)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": {n: thinker[n] for n in names[:half]},
        "model-00002-of-00002.safetensors": {**{n: thinker[n] for n in names[half:]}, **extra},
    }
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(OMNI, fname), metadata={"format": "pt"})
        for n in tensors:
            weight_map[n] = fname
    with open(os.path.join(OMNI, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    text = {
        "model_type": "qwen3_omni_moe_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": 1000000, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_scaling": {"interleaved": True, "mrope_section": [12, 10, 10], "rope_type": "default"},
    }
    omni_cfg = {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": True,
        "thinker_config": {
            "model_type": "qwen3_omni_moe_thinker",
            "audio_config": {"model_type": "qwen3_omni_moe_audio_encoder", "d_model": 8},
            "vision_config": {"model_type": "qwen3_omni_moe_vision_encoder", "hidden_size": 8},
            "text_config": text,
        },
        "talker_config": {"model_type": "qwen3_omni_moe_talker", "text_config": {"hidden_size": 8}},
        "code2wav_config": {"model_type": "qwen3_omni_moe_code2wav"},
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(OMNI, "config.json"), "w") as f:
        json.dump(omni_cfg, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(PLAIN, name), os.path.join(OMNI, name))


def main():
    global _TOK
    torch.manual_seed(0)
    for d in (PLAIN, OMNI):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(PLAIN)
    _TOK = make_tokenizer()
    _TOK.save(os.path.join(PLAIN, "tokenizer.json"))
    with open(os.path.join(PLAIN, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }, f, indent=2)

    cfg = config(VOCAB_SIZE)
    model = Qwen3MoeForCausalLM(cfg)
    randomize(model)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(PLAIN, safe_serialization=True)
    model.to(torch.float32)
    write_omni(model, cfg)

    # The reference comes from the committed files, loaded fresh in f32: casting the in-memory
    # model to bf16 and back would also have rounded RoPE's inv_freq buffer.
    model = Qwen3MoeForCausalLM.from_pretrained(
        PLAIN, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    model.eval()

    ref = {}
    meta = {"prompts": [], "pool": POOL, "tolerance_note": "transformers f32 eager attention"}
    for name, text in PROMPTS:
        ids = _TOK.encode(text).ids
        ref[f"{name}.ids"] = torch.tensor(ids, dtype=torch.int32)
        ref[f"{name}.logits"] = logits_for(model, ids)
        ref[f"{name}.pool_logits"] = pooled_logits(model, ids, POOL)
        meta["prompts"].append({"name": name, "text": text, "n_tokens": len(ids)})
    save_file(ref, os.path.join(ROOT, "reference.safetensors"))
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    print("wrote", PLAIN, OMNI, "and the reference;", "torch", torch.__version__,
          "transformers", sys.modules["transformers"].__version__)


if __name__ == "__main__":
    main()
