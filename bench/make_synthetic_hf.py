#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint with Qwen3-30B-A3B's real shapes and a chosen
number of layers (bf16 safetensors in 2 GiB shards with an index), for conversion benchmarks.

  python3 bench/make_synthetic_hf.py OUT_DIR [--layers 4]

4 layers make ~6.2 GB. Needs numpy only; streams one tensor at a time.
"""
import argparse
import json
import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "tests", "fixtures", "configs", "qwen3-30b-a3b.config.json")
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tiny-qwen3moe")
SHARD = 2 << 30


def tensors(c):
    e, v, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv, ff, n = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["moe_intermediate_size"], c["num_experts"]
    yield "model.embed_tokens.weight", (v, e)
    for il in range(c["num_hidden_layers"]):
        p = f"model.layers.{il}."
        yield p + "input_layernorm.weight", (e,)
        yield p + "self_attn.q_proj.weight", (q, e)
        yield p + "self_attn.k_proj.weight", (kv, e)
        yield p + "self_attn.v_proj.weight", (kv, e)
        yield p + "self_attn.o_proj.weight", (e, q)
        yield p + "self_attn.q_norm.weight", (hd,)
        yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "post_attention_layernorm.weight", (e,)
        yield p + "mlp.gate.weight", (n, e)
        for x in range(n):
            yield p + f"mlp.experts.{x}.gate_proj.weight", (ff, e)
            yield p + f"mlp.experts.{x}.up_proj.weight", (ff, e)
            yield p + f"mlp.experts.{x}.down_proj.weight", (e, ff)
    yield "model.norm.weight", (e,)
    yield "lm_head.weight", (v, e)


def bf16_random(rng, shape):
    x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    c = json.load(open(CONFIG))
    c["num_hidden_layers"] = a.layers
    os.makedirs(a.out, exist_ok=True)
    json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), a.out)
    # Group tensors into shards of about 2 GiB.
    shards, cur, size = [], [], 0
    for name, shape in tensors(c):
        n = int(np.prod(shape)) * 2
        if cur and size + n > SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    total = 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in group:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(a.out, fname), "wb") as f:
            f.write(len(h).to_bytes(8, "little"))
            f.write(h)
            for name, shape in group:
                f.write(bf16_random(rng, shape))
        total += off
        print(f"{fname}: {off / 2**30:.2f} GiB", flush=True)
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    print(f"wrote {a.out}: {a.layers} layers, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
