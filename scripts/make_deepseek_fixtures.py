#!/usr/bin/env python3
"""Make sage's tiny DeepSeek-V3 and DeepSeek-V2 reference fixtures with Hugging Face transformers.

Both are llama.cpp's `deepseek2`: multi-head latent attention (a compressed latent of kv_lora_rank
values plus a shared RoPE key part per token, split up per head by kv_b_proj), YaRN RoPE whose
mscale_all_dim also scales the attention logits, a dense first layer (first_k_dense_replace 1) and
ungated shared experts.

  tiny-deepseek3/  DeepseekV3ForCausalLM: the query through a low-rank pair (q_lora_rank 48) with its
                   norm; a sigmoid router whose choice adds a non-zero e_score_correction_bias, 16
                   experts in 4 groups of which 2 are kept, top-4, renormalized weights times
                   routed_scaling_factor 2.5; YaRN factor 40, mscale = mscale_all_dim = 1 (as
                   DeepSeek-V3); one shared expert; a next-token-prediction layer in the checkpoint
                   (model.layers.3.*, as DeepSeek-V3 publishes layer 61) that sage must skip and name.
  tiny-deepseek2/  DeepseekV2ForCausalLM: a plain q projection (q_lora_rank null, as DeepSeek-V2-Lite);
                   a softmax router with greedy top-4 of 16, weights not renormalized, times
                   routed_scaling_factor 1.5; YaRN factor 40, mscale = mscale_all_dim = 0.707 (as
                   DeepSeek-V2-Lite); two shared experts.
  reference-deepseek3 / reference-deepseek2 .safetensors / .json: per prompt ids, logits, pool
                   logits; config, tokenizer (see scripts/make_arch_fixtures.py's `build`)

Both use the Qwen2 tokenizer of tiny-qwen3moe. Pool logits: the experts outside the pool are never
chosen. DeepSeek-V3: their biased scores are -inf and a group is what is left of it, scored by the sum
of its two highest present scores (by its one if only one is left; a group with none cannot be
chosen), and where the best topk_group groups keep fewer than num_experts_per_tok experts the next
best groups are added (sage's definition, engine::router::route_scores; with every expert present
this is transformers' router exactly). DeepSeek-V2: the softmax over the pool's logits only.

Usage (CPU torch; seconds), in the venv of make_arch_fixtures.py:
    /work/venv/bin/python scripts/make_deepseek_fixtures.py
Made with torch 2.15.0, transformers 5.25.0 (the last line printed names the versions).
Deterministic: fixed seeds. Weights as make_arch_fixtures.py randomizes them; the correction bias
N(0, 0.2^2), so it changes choices (sigmoid scores lie in (0, 1)).
"""

import os
import sys

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_arch_fixtures as base  # noqa: E402
import make_glm_fixtures as glm  # noqa: E402

COMMON = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
    num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
    attention_bias=False, tie_word_embeddings=False, bos_token_id=None, pad_token_id=None,
    attn_implementation="eager",
)


def yarn(mscale):
    return dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=256,
                beta_fast=32.0, beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale)


def v3_config(tok):
    return DeepseekV3Config(
        **COMMON, q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_interleave=True, rope_parameters=yarn(1.0), num_nextn_predict_layers=1,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )


def v2_config(tok):
    return DeepseekV2Config(
        **COMMON, q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1, topk_method="greedy",
        routed_scaling_factor=1.5, norm_topk_prob=False, rope_parameters=yarn(0.707),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )


def v2_pooled_logits(model, ids, pool, router_cls, n_experts, _renormalize):
    """DeepSeek-V2's router with the experts outside the pool masked before the softmax."""
    mask = torch.full((n_experts,), float("-inf"))
    mask[pool] = 0.0

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = (logits + mask).softmax(dim=-1, dtype=torch.float32)
        w, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return logits, w * self.routed_scaling_factor, idx

    orig = router_cls.forward
    router_cls.forward = forward
    try:
        return base.logits_for(model, ids)
    finally:
        router_cls.forward = orig


CONFIG_KEYS = base.CONFIG_KEYS + [
    "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "topk_method", "routed_scaling_factor",
    "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "rope_interleave", "num_nextn_predict_layers",
]

TOKENIZER_NOTE = "the Qwen2 tokenizer of tiny-qwen3moe; embedding rows past the tokenizer are padding."

ARCHES = [
    dict(arch="deepseek3", dir="tiny-deepseek3", model_cls=DeepseekV3ForCausalLM, config=v3_config,
         router_cls=modeling_deepseek_v3.DeepseekV3TopkRouter, renormalize=True,
         pool=[0, 1, 2, 5, 6, 9, 13, 14], seed=2301, randomize=glm.randomize, config_keys=CONFIG_KEYS,
         n_experts_key="n_routed_experts", pooled_logits=glm.pooled_logits, extra_tensors=glm.add_mtp_layer,
         tokenizer_note=TOKENIZER_NOTE,
         tolerance_note="transformers f32, eager attention, eager experts; pool logits: experts outside the "
                        "pool never chosen, groups scored over their present members (see the script)"),
    dict(arch="deepseek2", dir="tiny-deepseek2", model_cls=DeepseekV2ForCausalLM, config=v2_config,
         router_cls=modeling_deepseek_v2.DeepseekV2TopkRouter, renormalize=False,
         pool=[1, 2, 4, 5, 7, 10, 12, 15], seed=2302, config_keys=CONFIG_KEYS, n_experts_key="n_routed_experts",
         pooled_logits=v2_pooled_logits, tokenizer_note=TOKENIZER_NOTE,
         tolerance_note="transformers f32, eager attention, eager experts; pool logits: router logits outside "
                        "the pool -inf before the softmax"),
]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for spec in ARCHES:
        base.build(spec)
    v = base.versions()
    print("wrote", ", ".join(s["dir"] for s in ARCHES), "and their references;",
          " ".join(f"{k} {v[k]}" for k in v))


if __name__ == "__main__":
    main()
