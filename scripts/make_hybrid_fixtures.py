#!/usr/bin/env python3
"""Make sage's tiny Qwen3.5-MoE and Qwen3-Next reference fixtures with Hugging Face transformers.

The two hybrid families: three Gated-DeltaNet linear-attention layers to one gated full-attention
layer (`full_attention_interval` 4), MoE with a shared expert behind a sigmoid gate in every layer.
Writes, under tests/fixtures/, as scripts/make_arch_fixtures.py does for the other families (its
`build` makes the references; see there for the files' contents):

  tiny-qwen35moe/   a random-weight Qwen3_5MoeForConditionalGeneration as Qwen3.5 is published: the
                    text model under model.language_model., a (tiny) vision tower under model.visual.
                    that sage skips, its hyperparameters under text_config; 4 layers (3 linear, 1
                    full), 4 value heads over 2 key heads in the linear layers (so llama.cpp's V-head
                    reordering matters), partial RoPE (a quarter of each head) with M-RoPE sections
  tiny-qwen3next/   a random-weight Qwen3NextForCausalLM: the fused in_proj_qkvz / in_proj_ba layout
  reference-<arch>.safetensors / .json   per prompt ids, logits, pool logits; config and tokenizer

Both use the Qwen2 tokenizer and ChatML template of tiny-qwen3moe (copied).

Usage (CPU torch is enough; a few seconds on 2 cores), in the venv of make_arch_fixtures.py:
    /work/venv/bin/python scripts/make_hybrid_fixtures.py
Made with torch 2.15.0, transformers 5.25.0 (the last line printed names the versions of the run).
Deterministic: fixed seeds.

The references are computed in float64 (the stored bf16 weights, exactly): transformers' CPU
Gated DeltaNet is its chunked form (chunks of 64, a triangular inverse by forward substitution),
whose f32 rounding differs from ggml's token-by-token recurrence by up to 2e-3 on these random
weights; in f64 the reference carries only ggml's own f32 error.

Weights: norms whose module adds 1 to the weight (Qwen3.5's and Qwen3-Next's zero-centred RMSNorm:
input, post-attention, q/k and final norms) get 0.1 * N(0, 1); the gated RMSNorm of the linear
attention (a plain weight) 1 + 0.1 * N(0, 1); A_log and dt_bias N(0, 0.5^2); routers and the shared
expert's gate N(0, 0.5^2) so routing is spread out and the gate's sigmoid is not stuck at 0.5;
matrices N(0, 1/fan_in). Everything rounded through bf16 (what is stored).
"""

import os
import sys

import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig
from transformers.models.qwen3_next import modeling_qwen3_next

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_arch_fixtures as base  # noqa: E402

TEXT = dict(
    vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=8,
    num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
)


def qwen35moe_config(tok):
    eos = tok.token_to_id("<|im_end|>")
    text = dict(
        TEXT, model_type="qwen3_5_moe_text", full_attention_interval=4, eos_token_id=eos,
        bos_token_id=None, pad_token_id=None,
        # a quarter of 32 = 8 rotated dimensions: 4 frequencies in sections of 2, 1, 1
        rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25,
                             mrope_section=[2, 1, 1], mrope_interleaved=True),
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"],
                  num_position_embeddings=16)
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           image_token_id=508, video_token_id=509, vision_start_token_id=510,
                           vision_end_token_id=511)
    cfg._attn_implementation = "eager"
    return cfg


def qwen3next_config(tok):
    return Qwen3NextConfig(
        **TEXT, intermediate_size=256, full_attention_interval=4, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, eos_token_id=tok.token_to_id("<|im_end|>"),
        bos_token_id=None, pad_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25),
        attn_implementation="eager",
    )


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            rnd = torch.randn(p.shape, generator=g)
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * rnd)
            elif name.endswith("norm.weight") or "layernorm" in name:
                # Zero-centred in the text model (the module adds 1); the vision tower's
                # LayerNorms are plain, and random weights serve them as well.
                p.copy_(0.1 * rnd if "visual" not in name else 1.0 + 0.1 * rnd)
            elif name.endswith(".A_log") or name.endswith(".dt_bias"):
                p.copy_(0.5 * rnd)
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.copy_(0.5 * rnd)
            elif name.endswith(".bias"):
                p.copy_(0.1 * rnd)
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(rnd / fan_in ** 0.5)
    model.to(torch.bfloat16).to(torch.float32)


CONFIG_KEYS = base.CONFIG_KEYS + [
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "layer_types", "partial_rotary_factor",
]

NOTE = "the Qwen2 tokenizer of tiny-qwen3moe; embedding rows past the tokenizer are padding."

ARCHES = [
    dict(arch="qwen35moe", dir="tiny-qwen35moe", model_cls=modeling_qwen3_5_moe.Qwen3_5MoeForConditionalGeneration,
         config=qwen35moe_config, router_cls=modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter, renormalize=True,
         pool=[0, 2, 3, 5, 6], seed=2101, randomize=randomize, config_keys=CONFIG_KEYS,
         tokenizer_note=NOTE, layers_prefix="model.language_model.layers.", ref_dtype=torch.float64),
    dict(arch="qwen3next", dir="tiny-qwen3next", model_cls=Qwen3NextForCausalLM, config=qwen3next_config,
         router_cls=modeling_qwen3_next.Qwen3NextTopKRouter, renormalize=True, pool=[1, 2, 4, 5, 7],
         seed=2102, randomize=randomize, config_keys=CONFIG_KEYS, tokenizer_note=NOTE, ref_dtype=torch.float64),
]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    only = sys.argv[1:]
    for spec in ARCHES:
        if not only or spec["arch"] in only:
            base.build(spec)
    v = base.versions()
    print("wrote", ", ".join(s["dir"] for s in ARCHES if not only or s["arch"] in only),
          "and their references;", " ".join(f"{k} {v[k]}" for k in v))


if __name__ == "__main__":
    main()
