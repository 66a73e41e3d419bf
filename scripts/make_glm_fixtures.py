#!/usr/bin/env python3
"""Make sage's tiny GLM-4.5 (Glm4MoeForCausalLM) reference fixture with Hugging Face transformers.

What the family adds over the others, all exercised: a dense first layer (first_k_dense_replace 1),
a sigmoid router whose choice adds a non-zero e_score_correction_bias, 16 experts in 4 groups of
which 2 are kept (n_group, topk_group), renormalized weights scaled by routed_scaling_factor 2.5,
an ungated shared expert, q/k/v biases, per-head q/k norms (use_qk_norm), NEOX RoPE on half of each
head (partial_rotary_factor 0.5). The checkpoint also carries a next-token-prediction layer
(model.layers.3.*, as GLM-4.5 publishes its layer 92 / 46) that sage must skip and name.

Writes, under tests/fixtures/ (see scripts/make_arch_fixtures.py's `build` for the files):
  tiny-glm4moe/                          the checkpoint, with the Qwen2 tokenizer of tiny-qwen3moe
  reference-glm4moe.safetensors / .json  per prompt ids, logits, pool logits; config, tokenizer

Pool logits: the experts outside the pool can never be chosen: their biased scores are -inf; a
group is what is left of it, scored by the sum of its two highest present scores (by its one if only
one is left; a group with none cannot be chosen), and where the best topk_group groups keep fewer
than num_experts_per_tok experts the next best groups are added (sage's definition,
engine::router::route_scores). With every expert present this is transformers' router exactly.

Usage (CPU torch; seconds), in the venv of make_arch_fixtures.py:
    /work/venv/bin/python scripts/make_glm_fixtures.py
Made with torch 2.15.0, transformers 5.25.0 (the last line printed names the versions).
Deterministic: fixed seeds. Weights as make_arch_fixtures.py randomizes them; the correction
bias N(0, 0.2^2), so it changes choices (sigmoid scores lie in (0, 1)).
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM
from transformers.models.glm4_moe import modeling_glm4_moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_arch_fixtures as base  # noqa: E402


def glm4moe_config(tok):
    return Glm4MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, use_qk_norm=True,
        attention_bias=True, partial_rotary_factor=0.5, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                                partial_rotary_factor=0.5),
        tie_word_embeddings=False, num_nextn_predict_layers=1, bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=None, attn_implementation="eager",
    )


def randomize(model, seed):
    base.randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    model.to(torch.bfloat16).to(torch.float32)


def pool_router(pool, n_experts):
    present = torch.zeros(n_experts, dtype=torch.bool)
    present[pool] = True

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.sigmoid()
        choice = (scores + self.e_score_correction_bias).masked_fill(~present, float("-inf"))
        per = n_experts // self.num_group
        idx = []
        for row in choice:
            groups = []
            for gi in range(self.num_group):
                v = row[gi * per:(gi + 1) * per]
                v = v[v > float("-inf")].sort(descending=True).values
                if len(v):
                    groups.append((-(v[:2].sum().item()), gi))
            kept, have = [], 0
            for _, gi in sorted(groups):
                if len(kept) >= self.topk_group and have >= self.top_k:
                    break
                kept.append(gi)
                have += int(present[gi * per:(gi + 1) * per].sum())
            mask = torch.zeros(n_experts, dtype=torch.bool)
            for gi in kept:
                mask[gi * per:(gi + 1) * per] = True
            idx.append(torch.topk(row.masked_fill(~mask, float("-inf")), self.top_k).indices)
        topk_indices = torch.stack(idx)
        w = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, w * self.routed_scaling_factor, topk_indices

    return forward


def pooled_logits(model, ids, pool, router_cls, n_experts, _renormalize):
    orig = router_cls.forward
    router_cls.forward = pool_router(pool, n_experts)
    try:
        return base.logits_for(model, ids)
    finally:
        router_cls.forward = orig


def add_mtp_layer(out_dir):
    """A next-token-prediction layer after the last, as GLM-4.5 publishes one (model.layers.46 in
    GLM-4.5-Air): its own projection and norms beside a copy of a decoder layer."""
    path = os.path.join(out_dir, "model.safetensors")
    t = load_file(path)
    n = 3
    for k in [k for k in t if k.startswith(f"model.layers.{n - 1}.")]:
        t[k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = t[k].clone()
    e = t["model.embed_tokens.weight"].shape[1]
    t[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(e, 2 * e, dtype=torch.bfloat16)
    t[f"model.layers.{n}.enorm.weight"] = torch.ones(e, dtype=torch.bfloat16)
    t[f"model.layers.{n}.hnorm.weight"] = torch.ones(e, dtype=torch.bfloat16)
    t[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(e, dtype=torch.bfloat16)
    save_file(t, path, metadata={"format": "pt"})


CONFIG_KEYS = base.CONFIG_KEYS + [
    "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
    "first_k_dense_replace", "use_qk_norm", "partial_rotary_factor", "num_nextn_predict_layers",
]

ARCHES = [
    dict(arch="glm4moe", dir="tiny-glm4moe", model_cls=Glm4MoeForCausalLM, config=glm4moe_config,
         router_cls=modeling_glm4_moe.Glm4MoeTopkRouter, renormalize=True, pool=[0, 1, 2, 5, 6, 9, 13, 14],
         seed=2201, randomize=randomize, config_keys=CONFIG_KEYS, n_experts_key="n_routed_experts",
         pooled_logits=pooled_logits, extra_tensors=add_mtp_layer,
         tokenizer_note="the Qwen2 tokenizer of tiny-qwen3moe; embedding rows past the tokenizer are padding.",
         tolerance_note="transformers f32, eager attention, eager experts; pool logits: experts outside the "
                        "pool never chosen, groups scored over their present members (see the script)"),
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
