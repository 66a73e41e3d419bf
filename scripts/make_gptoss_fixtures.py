#!/usr/bin/env python3
"""Make sage's tiny gpt-oss reference fixtures (bf16 and MXFP4 experts) with Hugging Face transformers.

Writes, under tests/fixtures/:
  tiny-gptoss/      a random-weight GptOssForCausalLM saved by save_pretrained in bf16: config.json,
                    model.safetensors (the unquantized layout transformers 5 writes: mlp.experts.gate_up_proj
                    [E, D, 2F] with gate/up interleaved on the last axis, gate_up_proj_bias [E, 2F],
                    down_proj [E, F, D], down_proj_bias [E, D], mlp.router.{weight,bias}, self_attn.sinks,
                    q/k/v/o biases), generation_config.json (eos = <|return|>, <|endoftext|>, <|call|>),
                    an o200k-style byte-level BPE: tokenizer.json (no normalizer; pre-tokenizer
                    Sequence[Split(o200k regex, isolated), ByteLevel(use_regex=false)], the pipeline
                    transformers' TikTokenConverter writes for openai/gpt-oss-*), tokenizer_config.json
                    (bos <|startoftext|>, eos <|return|>, pad <|endoftext|>, no BOS added), and
                    chat_template.jinja, the harmony template published with openai/gpt-oss-*
  tiny-gptoss-mxfp4/  the same weights with the experts stored as the published checkpoints store them:
                    mlp.experts.{gate_up,down}_proj_blocks [E, out_rows, in/32, 16] uint8 and
                    _scales [E, out_rows, in/32] uint8 (E8M0), biases bf16, everything else bf16, and
                    quantization_config {quant_method: mxfp4, modules_to_not_convert: [...]} in config.json;
                    quantized by quantize_mxfp4() below (per 32 inputs: e = floor(log2(amax)) - 2, codes the
                    nearest FP4 (E2M1) value, element 2j in the low nibble and 2j+1 in the high one, scale
                    byte e + 127)
  reference-gptoss.safetensors        per prompt <name>.ids (int32), <name>.logits (f32 [n_tokens, n_vocab]),
                    <name>.pool_logits (router logits outside the pool are -inf before the top-k),
                    <name>.logits_rounded and <name>.pool_logits_rounded (the same model with YaRN's
                    correction range floored/ceiled, rope_parameters.truncate = true, which is what ggml
                    computes), and <name>.greedy (int32, 32 greedy next tokens of the rounded model)
  reference-gptoss.json               prompts, pool, config values, versions, the rendered chat prompt and the
                    arguments it was rendered with, YaRN correction ranges, clamp statistics and tokenizer
                    references: ids of AutoTokenizer.from_pretrained(dir) (no special tokens added) for a list
                    of strings, their decode, and the ids of tokenizer.json as the `tokenizers` library runs it
  reference-gptoss-mxfp4.{safetensors,json}   the same for tiny-gptoss-mxfp4 (ids, logits, logits_rounded,
                    greedy; no pool), computed by loading the MXFP4 directory with
                    quantization_config=Mxfp4Config(dequantize=True); the safetensors also holds, per layer N,
                    blk.N.ffn_gate_exps.mxfp4, blk.N.ffn_up_exps.mxfp4, blk.N.ffn_down_exps.mxfp4 (uint8
                    [E, out_rows, in/32 * 17]): the expert bytes llama.cpp's converter writes in ggml's
                    block_mxfp4 layout (GptOssModel.transform_nibble_layout + repack_mxfp4, reimplemented
                    below: gate = even rows of gate_up's blocks and scales, up = odd rows, down = down_proj; per
                    block the scale byte then 16 bytes holding element k low, k+16 high), checked to decode with
                    ggml's dequantize_row_mxfp4 rule to exactly transformers' dequantized expert weights

Usage (CPU torch is enough, accelerate is not needed; under a minute on 2 idle cores; the venv of
make_arch_fixtures.py, whose helpers this script imports, sentencepiece included):
    python3 -m venv /work/venv
    /work/venv/bin/pip install torch 'transformers>=5' safetensors tokenizers numpy sentencepiece protobuf
    /work/venv/bin/python scripts/make_gptoss_fixtures.py
Made with torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3 (the last line printed names the versions of
the run; the reference JSON files record them too).
Deterministic: fixed seeds; the tokenizer is trained single-threaded on the text of make_fixtures.py's
corpus(), make_arch_fixtures.py's non_ascii_lines() and harmony_lines() below.

All references are transformers in f32 with eager attention and eager experts, computed from the committed
files loaded fresh. The model is tiny on purpose but exercises what gpt-oss adds: q width (6 x 16) != hidden
(64), attention sinks, biases on q/k/v/o, the router and the experts, sliding-window layers (window 4,
shorter than every prompt) alternating with full ones, YaRN, and the clamped SwiGLU (some experts are
scaled so that gate > 7 and |up| > 7 happen; checked below).

YaRN rounding: transformers with truncate = false (the published config and the transformers default) uses
the unrounded correction range; ggml's ggml_rope_yarn_corr_dims always floors low and ceils high. The
*_rounded references are transformers with truncate = true, i.e. what llama.cpp/ggml computes; the JSON
records both ranges and the max |difference| per prompt.

The chat template is openai/gpt-oss's chat_template.jinja as llama.cpp vendors it,
models/templates/openai-gpt-oss-120b.jinja (ggml-org/llama.cpp b204a5a2, 2025-08-14, "gpt-oss : update
openai-gpt-oss template"; 16738 bytes, sha256 a4c9919c...). It calls strftime_now("%Y-%m-%d"); the references
render it with strftime_now replaced by a fixed date (CHAT_DATE), passed as a keyword argument of
apply_chat_template, and the JSON records that.
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import unicodedata

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded tokenizer training (before `tokenizers`)

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers,
)
from transformers import AutoTokenizer, GenerationConfig, GptOssConfig, GptOssForCausalLM, Mxfp4Config  # noqa: E402
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_arch_fixtures import (  # noqa: E402
    CHAT_MESSAGES, PLAIN_PROMPTS, TOKENIZE_COMMON, expert_counts, logits_for, non_ascii_lines,
)
from make_fixtures import corpus  # noqa: E402  (the training text of the other fixtures)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
BF16_DIR, MXFP4_DIR = "tiny-gptoss", "tiny-gptoss-mxfp4"

# o200k's split as tiktoken, the gpt-oss tokenizer.json and llama.cpp's "gpt-4o" pre-tokenizer spell it.
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# gpt-oss's named special tokens in id order (199998, 199999, 200002, 200003, 200005-200008, 200012 there).
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                  "<|start|>", "<|end|>", "<|message|>", "<|call|>"]
VOCAB_SIZE = 640  # trained tokens + the specials; also the embedding rows
CHAT_DATE = datetime.date(2025, 8, 5)  # gpt-oss's release date; what strftime_now returns in the references

CONFIG = dict(
    num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
    head_dim=16, num_attention_heads=6, num_key_value_heads=2, sliding_window=4,
    layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False, "rope_theta": 150000.0},
    rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False, swiglu_alpha=1.702, swiglu_limit=7.0,
)
# As the published config.json lists them.
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
POOL = [0, 2, 5, 7]
# expert -> gain on its gate_up weights (its down_proj is divided by it), so that the SwiGLU clamp triggers
HOT_EXPERTS = {1: 3.0, 4: 3.0, 6: 2.5}
N_GREEDY = 32
SEED = 2004

# Strings for the tokenizer references beyond make_arch_fixtures.TOKENIZE_COMMON: o200k's case-aware word
# split, contractions after capitals, digit triples, "/" after punctuation, and the harmony special tokens.
EXTRA_STRINGS = [
    "ChatGPT OpenAI HTTPServer getHTTPResponse camelCaseWord",
    "DON'T SHOUT'S We'LL they'D",
    "1234567 89 0.5/2 path/to/file.txt\n",
    "<|start|>user<|message|>hi<|end|><|start|>assistant",
    "<|channel|>final<|message|>done<|return|>",
    "a <|call|> b<|constrain|>json",
    "text<|endoftext|><|startoftext|>",
]


def harmony_lines():
    """The text of harmony prompts without their special tokens (system messages with random dates and
    reasoning levels, short user questions, role names), so that the tokenizer has pieces for them and the
    chat prompt is tens of tokens, not the 200 the other fixtures' corpus alone gives. The o200k split cuts
    "ChatGPT" into "Chat" + "GPT" and "OpenAI" into "Open" + "AI"."""
    words = "what is a mixture of experts how does the router pick an expert why model layer token".split()
    g = torch.Generator().manual_seed(13)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))
    lines = []
    for _ in range(300):
        effort = ["low", "medium", "high"][draw(0, 3)]
        date = f"{draw(2024, 2027)}-{draw(1, 13):02d}-{draw(1, 29):02d}"
        question = " ".join(words[draw(0, len(words))] for _ in range(draw(3, 8))).capitalize() + "?"
        lines += ["system", "You are ChatGPT, a large language model trained by OpenAI.", "Knowledge cutoff: 2024-06",
                  f"Current date: {date}", "", f"Reasoning: {effort}", "",
                  "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
                  "user", question, "assistant"]
    return lines


# ---------------------------------------------------------------------------------------------
# Tokenizer

def make_tokenizer(out_dir):
    """A byte-level BPE with gpt-oss's pipeline (transformers' TikTokenConverter: Split + ByteLevel without
    its regex, ByteLevel decoder, ByteLevel post-processor that only touches offsets, ignore_merges) and
    gpt-oss's named special tokens after the trained ones."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus() + non_ascii_lines() + harmony_lines(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - len(SPECIAL_TOKENS), tok.get_vocab_size()
    tok.model.ignore_merges = True  # as TikTokenConverter sets it (a whole pre-token in the vocab wins)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == VOCAB_SIZE
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
            "eos_token": "<|return|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 256,
        }, f, indent=2)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8", newline="") as f:
        f.write(HARMONY_TEMPLATE)
    return tok


def render_chat(tok):
    """The chat prompt through AutoTokenizer.apply_chat_template. The template calls strftime_now("%Y-%m-%d"),
    transformers' own global (datetime.now().strftime); template kwargs cannot replace it (apply_chat_template
    turns non-JSON values into strings), so its clock is fixed to CHAT_DATE while rendering."""
    from transformers.utils import chat_template_utils

    class FixedClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(CHAT_DATE.year, CHAT_DATE.month, CHAT_DATE.day, 12, 0, 0)

    orig = chat_template_utils.datetime
    chat_template_utils.datetime = FixedClock
    try:
        text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    finally:
        chat_template_utils.datetime = orig
    assert f"Current date: {CHAT_DATE:%Y-%m-%d}\n" in text, text
    return text, {"add_generation_prompt": True, "kwargs": {},
                  "strftime_now": f"transformers' strftime_now with its clock fixed to {CHAT_DATE:%Y-%m-%d} "
                                  f"(renders 'Current date: {CHAT_DATE:%Y-%m-%d}')",
                  "defaults_taken": "reasoning_effort 'medium', model_identity (the template's), no builtin_tools, "
                                    "no tools"}


# ---------------------------------------------------------------------------------------------
# Model

def gptoss_config(tok):
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return GptOssConfig(
        vocab_size=tok.get_vocab_size(), bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|return|>"],
        pad_token_id=ids["<|endoftext|>"], attn_implementation="eager", **CONFIG,
    )


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            def rn(std):
                return torch.randn(p.shape, generator=g) * std
            if name.endswith("norm.weight"):
                p.copy_(1.0 + rn(0.1))
            elif name.endswith("self_attn.sinks"):
                p.copy_(rn(0.5))  # one logit per q head, in units of the scaled q.k scores
            elif name.endswith("mlp.router.weight"):
                p.copy_(rn(0.5))  # a spread-out router, so top-k choices are well separated
            elif name.endswith("mlp.router.bias"):
                p.copy_(rn(0.5))
            elif name.endswith("mlp.experts.gate_up_proj"):  # [E, D, 2F], used as x @ W
                w = rn(1.0 / cfg.hidden_size ** 0.5)
                for e, gain in HOT_EXPERTS.items():
                    w[e] *= gain
                p.copy_(w)
            elif name.endswith("mlp.experts.down_proj"):  # [E, F, D]
                w = rn(1.0 / cfg.intermediate_size ** 0.5)
                for e, gain in HOT_EXPERTS.items():
                    w[e] /= gain
                p.copy_(w)
            elif name.endswith("mlp.experts.gate_up_proj_bias"):
                p.copy_(rn(0.3))
            elif name.endswith("mlp.experts.down_proj_bias"):
                p.copy_(rn(0.1))
            elif name.endswith(".bias"):  # q/k/v/o: transformers starts them at zero
                p.copy_(rn(0.2))
            else:  # Linear [out, in] and the embedding [V, D]
                p.copy_(rn(1.0 / p.shape[-1] ** 0.5))
    for name, p in model.named_parameters():
        assert p.abs().max() > 0 and p.std() > 0.05, (name, "left at its initial value?")
    # Round to bf16 (what is stored) so the f32 references see exactly the stored weights.
    model.to(torch.bfloat16).to(torch.float32)


def load(model_dir, truncate, mxfp4=False, **overrides):
    """The committed checkpoint in f32 with eager attention and experts; truncate sets YaRN's rounding,
    overrides replace other config values."""
    cfg = GptOssConfig.from_pretrained(model_dir)
    cfg.rope_parameters = dict(cfg.rope_parameters, truncate=truncate)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    model = GptOssForCausalLM.from_pretrained(
        model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        **extra)
    return model.eval()


def pooled_logits(model, ids, pool):
    """Reference for a pool: gpt-oss's router (F.linear with bias, top-k, softmax over the k values) with the
    router logits of experts outside the pool set to -inf before the top-k."""
    cls = modeling_gpt_oss.GptOssTopKRouter
    orig = cls.forward
    mask = torch.full((model.config.num_local_experts,), float("-inf"))
    mask[pool] = 0.0

    def forward(self, hidden_states):
        router_logits = torch.nn.functional.linear(hidden_states, self.weight, self.bias) + mask
        top_v, top_i = torch.topk(router_logits, self.top_k, dim=-1)
        scores = torch.nn.functional.softmax(top_v, dim=1, dtype=top_v.dtype)
        return router_logits, scores, top_i

    cls.forward = forward
    try:
        return logits_for(model, ids)
    finally:
        cls.forward = orig


@contextlib.contextmanager
def clamp_stats(stats):
    """Counts, during the forward passes inside, the SwiGLU inputs the clamp changes: gate > limit (the gate is
    clamped from above only) and |up| > limit."""
    cls = modeling_gpt_oss.GptOssExperts
    orig = cls._apply_gate

    def apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        stats["gate_above_limit"] += int((gate > self.limit).sum())
        stats["gate_below_minus_limit_unclamped"] += int((gate < -self.limit).sum())
        stats["up_abs_above_limit"] += int((up.abs() > self.limit).sum())
        stats["gate_elements"] += gate.numel()
        stats["max_gate"] = max(stats["max_gate"], float(gate.max()))
        stats["max_abs_up"] = max(stats["max_abs_up"], float(up.abs().max()))
        return orig(self, gate_up)

    cls._apply_gate = apply_gate
    try:
        yield stats
    finally:
        cls._apply_gate = orig


def new_clamp_stats():
    return {"gate_above_limit": 0, "gate_below_minus_limit_unclamped": 0, "up_abs_above_limit": 0,
            "gate_elements": 0, "max_gate": -math.inf, "max_abs_up": 0.0}


def greedy(model, ids, n):
    """n greedy next tokens, one full forward pass per step (no cache, no EOS stop), and at each step the gap
    between the best and the second-best logit (a small gap is a step where rounding may pick another token)."""
    ids, out, gaps = list(ids), [], []
    for _ in range(n):
        top = torch.topk(logits_for(model, ids)[-1], 2)
        gaps.append(round(float(top.values[0] - top.values[1]), 6))
        out.append(int(top.indices[0]))
        ids.append(out[-1])
    return out, gaps


def yarn_ranges(cfg):
    """YaRN's correction range as transformers' _compute_yarn_parameters computes it, unrounded and
    floored/ceiled (= ggml_rope_yarn_corr_dims), for this config and for the published head_dim 64."""
    rp = cfg.rope_parameters

    def corr_dim(n_rot, dim):
        return dim * math.log(rp["original_max_position_embeddings"] / (n_rot * 2 * math.pi)) / (
            2 * math.log(rp["rope_theta"]))

    def ranges(dim):
        low, high = corr_dim(rp["beta_fast"], dim), corr_dim(rp["beta_slow"], dim)
        return {"head_dim": dim, "low": max(low, 0), "high": min(high, dim - 1),
                "low_truncated": max(math.floor(low), 0), "high_truncated": min(math.ceil(high), dim - 1)}
    return {"this_model": ranges(cfg.head_dim), "published_gpt_oss_head_dim_64": ranges(64),
            "attention_factor": 0.1 * math.log(rp["factor"]) + 1.0}


# ---------------------------------------------------------------------------------------------
# MXFP4

def quantize_mxfp4(w):
    """w [..., rows, n_in] (n_in % 32 == 0) -> (blocks uint8 [..., rows, n_in/32, 16], scales uint8
    [..., rows, n_in/32], dequantized f32 [..., rows, n_in]).

    Per 32 consecutive inputs: e = floor(log2(max |w|)) - 2 (so max |w| / 2^e is in [4, 8); FP4's largest
    value is 6), every weight becomes the code of the nearest FP4_VALUES entry to w / 2^e (ties to the lower
    code), element 2j goes to the low nibble of byte j and element 2j+1 to its high nibble, and the scale
    byte is e + 127 (E8M0). An all-zero block gets scale byte 0."""
    *prefix, rows, n_in = w.shape
    assert n_in % 32 == 0, w.shape
    blk = w.float().reshape(*prefix, rows, n_in // 32, 32)
    amax = blk.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2, torch.full_like(amax, -127.0))
    e = e.clamp(-127, 127)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    q = blk / torch.exp2(e)[..., None]
    codes = (q[..., None] - lut).abs().argmin(-1)  # first minimum: ties go to the lower code
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (e + 127).to(torch.uint8)
    deq = (lut[codes] * torch.exp2(e)[..., None]).reshape(*prefix, rows, n_in)
    return blocks.contiguous(), scales.contiguous(), deq


def write_mxfp4_checkpoint(src_dir, out_dir):
    """tiny-gptoss with its experts in the published MXFP4 layout; returns the dequantized expert weights in
    transformers' parameter layout ([E, D, 2F] / [E, F, D]) by name."""
    state = load_file(os.path.join(src_dir, "model.safetensors"))
    out, deq_params, quant_err = {}, {}, 0.0
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            rows = t.float().transpose(1, 2).contiguous()  # nn.Linear-like [E, out_rows, in]
            blocks, scales, deq = quantize_mxfp4(rows)
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
            # transformers' own decoder must give exactly our dequantized values (transposed back).
            theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert torch.equal(theirs, deq.transpose(1, 2)), name
            deq_params[name] = deq.transpose(1, 2).contiguous()
            quant_err = max(quant_err, (deq - rows).abs().max().item() / rows.abs().max().item())
        else:
            out[name] = t
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src_dir, "config.json")) as f:
        conf = json.load(f)
    conf["quantization_config"] = {"modules_to_not_convert": MODULES_TO_NOT_CONVERT, "quant_method": "mxfp4"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    for n in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(src_dir, n), os.path.join(out_dir, n))
    return deq_params, state, quant_err


# llama.cpp's kvalues_mxfp4 (ggml-common.h): twice FP4_VALUES, so 2^(e-128) and not 2^(e-127) is the scale.
GGML_KVALUES_MXFP4 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]


def transform_nibble_layout(blocks):
    """HF MXFP4 blocks [..., 16] (element 2j in the low nibble of byte j, 2j+1 in its high nibble) -> ggml's qs
    (element k in the low nibble of byte k, k+16 in its high nibble), step for step as llama.cpp's converter
    does it (GptOssModel.transform_nibble_layout): swap the nibbles of every byte, split the 16 bytes into
    halves a (elements 0..15) and b (16..31), spread each half's nibbles so that byte k holds element k of a in
    its high nibble and element k of b in its low one, or the two, and swap the nibbles once more."""
    assert blocks.dtype == torch.uint8 and blocks.shape[-1] == 16, (blocks.dtype, blocks.shape)
    t = blocks.contiguous()
    t = ((t & 0x0F) << 4) | ((t & 0xF0) >> 4)
    blk_a, blk_b = t.chunk(2, dim=-1)
    blk_a = torch.stack(((blk_a & 0xF0).reshape(-1, 1), (blk_a << 4).reshape(-1, 1)), dim=2).reshape(t.shape)
    blk_b = torch.stack(((blk_b >> 4).reshape(-1, 1), (blk_b & 0x0F).reshape(-1, 1)), dim=2).reshape(t.shape)
    out = blk_a | blk_b
    return ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)


def repack_mxfp4(blocks, scales):
    """(blocks [E, rows, nb, 16], scales [E, rows, nb]) -> ggml block_mxfp4 bytes [E, rows, nb * 17]: per block
    the scale byte (copied) then the 16 transformed bytes, as llama.cpp's GptOssModel.repack_mxfp4 writes them
    (concat((scales[..., None], transform_nibble_layout(blocks)), -1), last two axes flattened)."""
    assert blocks.dim() == 4 and scales.dim() == 3 and blocks.shape[:3] == scales.shape, (blocks.shape, scales.shape)
    data = torch.cat((scales.unsqueeze(-1), transform_nibble_layout(blocks)), dim=-1)
    return data.reshape(data.shape[0], data.shape[1], data.shape[2] * 17).contiguous()


def ggml_mxfp4_tensors(mx_dir):
    """What llama.cpp's converter (GptOssModel.generate_extra_tensors) writes for the experts of the MXFP4
    checkpoint in mx_dir, read back from its model.safetensors: gate_up's blocks and scales split into even
    rows (ffn_gate_exps) and odd rows (ffn_up_exps), down_proj as it is (ffn_down_exps), each repacked."""
    state = load_file(os.path.join(mx_dir, "model.safetensors"))
    out = {}
    for name in sorted(state):
        if not name.endswith("mlp.experts.gate_up_proj_blocks"):
            continue
        layer = int(name.split(".")[2])
        pre = name[: -len("gate_up_proj_blocks")]
        gu_b, gu_s = state[name], state[pre + "gate_up_proj_scales"]
        out[f"blk.{layer}.ffn_gate_exps.mxfp4"] = repack_mxfp4(gu_b[:, ::2], gu_s[:, ::2])
        out[f"blk.{layer}.ffn_up_exps.mxfp4"] = repack_mxfp4(gu_b[:, 1::2], gu_s[:, 1::2])
        out[f"blk.{layer}.ffn_down_exps.mxfp4"] = repack_mxfp4(state[pre + "down_proj_blocks"],
                                                                state[pre + "down_proj_scales"])
        # The nibble transform is the direct rule qs[k] = el[k] | el[k+16] << 4 (el = HF element order).
        el = torch.stack((gu_b & 15, gu_b >> 4), dim=-1).reshape(*gu_b.shape[:-1], 32)
        direct = el[..., :16] | (el[..., 16:] << 4)
        assert torch.equal(transform_nibble_layout(gu_b), direct), (name, "nibble transform")
    return out


def decode_ggml_mxfp4(data):
    """ggml's dequantize_row_mxfp4 in numpy: bytes [E, rows, nb * 17] -> f32 [E, rows, nb * 32] with
    y[j] = kvalues[qs[j] & 15] * 2^(e-128) and y[j+16] = kvalues[qs[j] >> 4] * 2^(e-128), j in 0..16."""
    import numpy as np
    a = np.asarray(data.numpy(), dtype=np.uint8)
    e_dim, rows, n = a.shape
    assert n % 17 == 0, a.shape
    blk = a.reshape(e_dim, rows, n // 17, 17)
    e, qs = blk[..., 0].astype(np.int32), blk[..., 1:]
    d = np.ldexp(np.float64(1.0), e - 128)[..., None]
    kv = np.array(GGML_KVALUES_MXFP4, dtype=np.float64)
    y = np.concatenate((kv[qs & 15] * d, kv[qs >> 4] * d), axis=-1)  # [.., nb, 32]: j then j+16
    return torch.from_numpy(y.reshape(e_dim, rows, n // 17 * 32).astype(np.float32))


def check_ggml_mxfp4(ggml, model):
    """Decoding the ggml bytes with ggml's rule gives exactly transformers' dequantized expert weights
    (gate_up_proj [E, D, 2F]: gate = [..., ::2], up = [..., 1::2]; down_proj [E, F, D]), transposed to rows."""
    params = dict(model.named_parameters())
    n_checked = 0
    for name, data in ggml.items():
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        pre = f"model.layers.{layer}.mlp.experts."
        if kind == "ffn_down_exps":
            want = params[pre + "down_proj"].detach().transpose(1, 2)
        else:
            gu = params[pre + "gate_up_proj"].detach()
            want = (gu[..., ::2] if kind == "ffn_gate_exps" else gu[..., 1::2]).transpose(1, 2)
        got = decode_ggml_mxfp4(data)
        assert got.shape == want.shape and torch.equal(got, want.float()), (name, "ggml decode differs")
        n_checked += 1
    return n_checked


# ---------------------------------------------------------------------------------------------
# References

CONFIG_KEYS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
    "layer_types", "max_position_embeddings", "rope_parameters", "rms_norm_eps", "attention_bias",
    "tie_word_embeddings", "swiglu_alpha", "swiglu_limit", "bos_token_id", "eos_token_id", "pad_token_id",
    "hidden_act",
]


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def tokenizer_refs(tok, raw, raw_plain_merges):
    out = []
    for s in TOKENIZE_COMMON + EXTRA_STRINGS:
        assert unicodedata.is_normalized("NFC", s), s
        ids = tok(s, add_special_tokens=False).input_ids
        entry = {"text": s, "ids": ids, "decode": tok.decode(ids),
                 "ids_tokenizer_json": raw.encode(s, add_special_tokens=False).ids}
        entry["auto_matches_tokenizer_json"] = entry["ids"] == entry["ids_tokenizer_json"]
        plain = raw_plain_merges.encode(s, add_special_tokens=False).ids
        if plain != ids:
            entry["ids_without_ignore_merges"] = plain
        out.append(entry)
    return out


def build_reference(name, model_dir, prompts, pool, mxfp4, meta_extra, extra_tensors=None):
    """Logits of the unrounded and rounded models for each prompt (and the pool's for the bf16 model);
    extra_tensors are stored in the reference safetensors as they are."""
    model = load(model_dir, truncate=False, mxfp4=mxfp4)
    rounded = load(model_dir, truncate=True, mxfp4=mxfp4)
    d_inv = (model.model.rotary_emb.inv_freq - rounded.model.rotary_emb.inv_freq).abs().max().item()
    assert d_inv > 0, "truncate does not change YaRN's frequencies"
    cfg = model.config
    n_experts = cfg.num_local_experts
    ref, meta_prompts, all_ids = {}, [], []
    stats = new_clamp_stats()
    for pname, text, ids in prompts:
        assert len(ids) > cfg.sliding_window and len(ids) + N_GREEDY <= cfg.max_position_embeddings, (pname, len(ids))
        with clamp_stats(stats):
            full = logits_for(model, ids)
        full_r = logits_for(rounded, ids)
        d_round = (full_r - full).abs().max().item()
        ref[f"{pname}.ids"] = torch.tensor(ids, dtype=torch.int32)
        ref[f"{pname}.logits"] = full
        ref[f"{pname}.logits_rounded"] = full_r
        entry = {"name": pname, "text": text, "n_tokens": len(ids), "add_special_tokens": False,
                 "max_abs_diff_rounded_vs_unrounded": round(d_round, 6)}
        if pool is not None:
            pooled = pooled_logits(model, ids, pool)
            pooled_r = pooled_logits(rounded, ids, pool)
            same = pooled_logits(model, ids, list(range(n_experts)))
            d_all = (same - full).abs().max().item()
            d_pool = (pooled - full).abs().max().item()
            assert d_all < 1e-5, (name, pname, "patched router with every expert differs", d_all)
            assert d_pool > 1e-2, (name, pname, "the pool does not change the logits", d_pool)
            ref[f"{pname}.pool_logits"] = pooled
            ref[f"{pname}.pool_logits_rounded"] = pooled_r
            entry.update({"max_abs_diff_pool_vs_full": round(d_pool, 6),
                          "max_abs_diff_all_experts_patch_vs_full": d_all,
                          "max_abs_diff_pool_rounded_vs_pool": round((pooled_r - pooled).abs().max().item(), 6)})
        toks, gaps = greedy(rounded, ids, N_GREEDY)
        toks_u, _ = greedy(model, ids, N_GREEDY)
        ref[f"{pname}.greedy"] = torch.tensor(toks, dtype=torch.int32)
        agree = next((i for i, (a, b) in enumerate(zip(toks, toks_u)) if a != b), N_GREEDY)
        entry.update({"greedy": toks, "greedy_top2_gaps": gaps, "greedy_min_top2_gap": min(gaps),
                      "greedy_unrounded_model_agrees_for_first": agree})
        meta_prompts.append(entry)
        all_ids.append(ids)
    assert stats["gate_above_limit"] > 0 and stats["up_abs_above_limit"] > 0, (name, "clamp never triggers", stats)
    assert all(p["max_abs_diff_rounded_vs_unrounded"] > 1e-4 for p in meta_prompts), (name, "YaRN rounding no-op")

    # Routing is not degenerate, and the sliding window (4) matters: the same weights with a window as long as
    # the context give other logits.
    counts = expert_counts(model, modeling_gpt_oss.GptOssTopKRouter, all_ids)
    for layer, c in counts.items():
        used = sum(1 for e in range(n_experts) if c[e] > 0)
        assert used >= 4, (name, layer, "degenerate routing", c)
    wide = load(model_dir, truncate=False, mxfp4=mxfp4, sliding_window=cfg.max_position_embeddings)
    d_window = (logits_for(wide, all_ids[0]) - ref[f"{prompts[0][0]}.logits"]).abs().max().item()
    assert d_window > 1e-2, (name, "the sliding window changes nothing", d_window)

    ref_path = os.path.join(ROOT, f"reference-{name}.safetensors")
    assert not set(ref) & set(extra_tensors or {}), name
    save_file(dict(ref, **(extra_tensors or {})), ref_path)
    conf = {k: getattr(cfg, k) for k in CONFIG_KEYS if hasattr(cfg, k)}
    meta = {
        "arch": "gpt_oss", "model_dir": os.path.basename(model_dir), "architecture": type(model).__name__,
        "prompts": meta_prompts, "pool": pool, "n_vocab": cfg.vocab_size, "n_experts": n_experts,
        "config": conf, "versions": versions(),
        "yarn": dict(yarn_ranges(cfg), max_abs_diff_inv_freq=d_inv,
                     note="logits: rope_parameters.truncate false (as published, unrounded range); "
                          "*_rounded: truncate true, the floor/ceil ggml_rope_yarn_corr_dims always applies"),
        "clamp": dict(stats, over="the unpooled, unrounded forward passes of every prompt"),
        "max_abs_diff_window_as_long_as_context": {prompts[0][0]: round(d_window, 6)},
        "greedy_note": f"<name>.greedy: {N_GREEDY} argmax next tokens of the rounded (truncate true) model, one "
                       "full forward pass per step, no cache, no stop on EOS (no EOS handling at all); "
                       "greedy_top2_gaps: best minus second-best logit at each step (small = rounding-sensitive); "
                       "greedy_unrounded_model_agrees_for_first: how many leading tokens the truncate-false "
                       "model's greedy run shares",
        **meta_extra,
    }
    with open(os.path.join(ROOT, f"reference-{name}.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)

    # Verify: a fresh load of the committed files reproduces the stored logits.
    del model, rounded, wide
    again = load(model_dir, truncate=False, mxfp4=mxfp4)
    stored = load_file(ref_path)
    d = (logits_for(again, stored["fox.ids"].tolist()) - stored["fox.logits"]).abs().max().item()
    assert d < 1e-6, (name, "reload differs", d)
    return meta, counts


def main():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    assert hashlib.sha256(HARMONY_TEMPLATE.encode()).hexdigest().startswith("a4c9919cbbd4acdd"), "template changed"
    bf16_dir, mx_dir = os.path.join(ROOT, BF16_DIR), os.path.join(ROOT, MXFP4_DIR)
    for d in (bf16_dir, mx_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    raw = make_tokenizer(bf16_dir)
    model = GptOssForCausalLM(gptoss_config(raw))
    randomize(model, SEED)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    GenerationConfig(bos_token_id=ids["<|startoftext|>"], pad_token_id=ids["<|endoftext|>"],
                     eos_token_id=[ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]).save_pretrained(bf16_dir)
    del model

    tok = AutoTokenizer.from_pretrained(bf16_dir)
    raw = Tokenizer.from_file(os.path.join(bf16_dir, "tokenizer.json"))
    plain = Tokenizer.from_file(os.path.join(bf16_dir, "tokenizer.json"))
    plain.model.ignore_merges = False
    chat_text, chat_kwargs = render_chat(tok)
    prompts = []
    for pname, text in PLAIN_PROMPTS + [("chat", chat_text)]:
        # gpt-oss adds no BOS: add_special_tokens changes nothing; the chat prompt parses its special tokens.
        p_ids = tok(text, add_special_tokens=False).input_ids
        assert p_ids == tok(text).input_ids == raw.encode(text, add_special_tokens=False).ids, pname
        assert p_ids == plain.encode(text, add_special_tokens=False).ids, (pname, "ignore_merges matters here")
        prompts.append((pname, text, p_ids))
    tokenize = tokenizer_refs(tok, raw, plain)
    common = {
        "chat_prompt": chat_text, "chat_messages": CHAT_MESSAGES, "chat_template_kwargs": chat_kwargs,
        "chat_template": "chat_template.jinja: openai/gpt-oss's harmony template as llama.cpp vendors it "
                         "(models/templates/openai-gpt-oss-120b.jinja, ggml-org/llama.cpp b204a5a2), sha256 "
                         + hashlib.sha256(HARMONY_TEMPLATE.encode()).hexdigest(),
        "special_token_ids": ids, "tokenizer_size": raw.get_vocab_size(with_added_tokens=True),
        "generation_eos_token_ids": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "tokenize": tokenize,
        "tokenizer_note": "o200k-style byte-level BPE trained here (631 tokens) + gpt-oss's 9 named special tokens; "
                          "tokenizer.json as transformers' TikTokenConverter writes gpt-oss's: no normalizer, "
                          "Split(o200k regex, isolated) + ByteLevel(use_regex false), ByteLevel decoder, ByteLevel "
                          "post-processor, BPE ignore_merges true. ids: AutoTokenizer; ids_tokenizer_json: tokenizers "
                          "library on tokenizer.json; ids_without_ignore_merges (only where it differs): the same "
                          "BPE with ignore_merges false, which is what llama.cpp's gpt-4o pre-type does.",
        "tolerance_note": "transformers f32, eager attention, eager experts; pool logits: router logits "
                          "outside the pool set to -inf before the top-k",
    }
    meta, counts = build_reference("gptoss", bf16_dir, prompts, POOL, False, common)

    # The MXFP4 checkpoint and its reference.
    deq, state, quant_err = write_mxfp4_checkpoint(bf16_dir, mx_dir)
    mx = load(mx_dir, truncate=False, mxfp4=True)
    for pname, p in mx.named_parameters():
        want = deq[pname] if pname in deq else state[pname].float()
        assert torch.equal(p.detach(), want), (pname, "the MXFP4 load is not the dequantized checkpoint")
    ggml = ggml_mxfp4_tensors(mx_dir)
    n_ggml = check_ggml_mxfp4(ggml, mx)
    assert n_ggml == 3 * mx.config.num_hidden_layers, n_ggml
    print(f"ggml block_mxfp4 repack: {n_ggml} tensors decode (ggml's rule) to transformers' dequantized experts")
    del mx
    meta_mx, counts_mx = build_reference(
        "gptoss-mxfp4", mx_dir, prompts, None, True,
        dict(common, mxfp4_note="experts: mlp.experts.{gate_up,down}_proj_{blocks,scales} as published; the "
             "reference loads them with Mxfp4Config(dequantize=True) (transformers' convert_moe_packed_tensors, "
             "checked equal to quantize_mxfp4's dequantized values); the bf16 weights quantized are tiny-gptoss's",
             mxfp4_max_rel_quant_error=quant_err,
             ggml_mxfp4_note="blk.N.ffn_{gate,up,down}_exps.mxfp4 (uint8 [E, out_rows, in/32 * 17]): the bytes "
             "llama.cpp's converter (GptOssModel: transform_nibble_layout + repack_mxfp4) writes for the experts "
             "of tiny-gptoss-mxfp4, ggml block_mxfp4 (per 32 inputs: the E8M0 scale byte copied, then 16 bytes "
             "with element k in the low nibble and k+16 in the high one); gate = even rows of gate_up_proj, up = "
             "odd rows, down = down_proj; ggml ne = [in, out_rows, E]. Checked: ggml's dequantize_row_mxfp4 "
             "rule (kvalues_mxfp4 * 2^(e-128)) gives exactly transformers' dequantized expert weights, "
             "transposed"),
        extra_tensors=ggml)

    print_summary([("gptoss", meta, counts), ("gptoss-mxfp4", meta_mx, counts_mx)], bf16_dir, mx_dir)


def print_summary(results, bf16_dir, mx_dir):
    for name, meta, counts in results:
        stored = load_file(os.path.join(ROOT, f"reference-{name}.safetensors"))
        max_logit = max(v.abs().max().item() for k, v in stored.items() if "logits" in k)
        c = meta["clamp"]
        print(f"== {name}: max |logit| {max_logit:.3f}; clamp: gate>7 {c['gate_above_limit']}, |up|>7 "
              f"{c['up_abs_above_limit']} of {c['gate_elements']} (max gate {c['max_gate']:.2f}, max |up| "
              f"{c['max_abs_up']:.2f})")
        for layer, cnt in sorted(counts.items()):
            print(f"   layer {layer} expert picks: " + " ".join(f"{e}:{cnt[e]}" for e in range(8)))
        for p in meta["prompts"]:
            pool = f", pool diff {p['max_abs_diff_pool_vs_full']:.3f}" if "max_abs_diff_pool_vs_full" in p else ""
            print(f"   {p['name']}: {p['n_tokens']} tok, YaRN rounding diff "
                  f"{p['max_abs_diff_rounded_vs_unrounded']:.4f}"
                  f"{pool}, greedy min gap {p['greedy_min_top2_gap']:.3f}, greedy = unrounded's for "
                  f"{p['greedy_unrounded_model_agrees_for_first']}")
    y = results[0][1]["yarn"]["this_model"]
    print(f"   YaRN range (head_dim {y['head_dim']}): {y['low']:.4f}..{y['high']:.4f}, truncated "
          f"{y['low_truncated']}..{y['high_truncated']}")
    mismatch = [e["text"] for e in results[0][1]["tokenize"] if not e["auto_matches_tokenizer_json"]]
    no_im = [e["text"] for e in results[0][1]["tokenize"] if "ids_without_ignore_merges" in e]
    print(f"   AutoTokenizer vs tokenizer.json mismatches: {mismatch}; ignore_merges matters for: {no_im}")
    print(f"   special token ids: {results[0][1]['special_token_ids']}")
    with safe_open(os.path.join(mx_dir, "model.safetensors"), "pt") as f:
        print(f"   mxfp4 layer 0 tensors: {sorted(k for k in f.keys() if k.startswith('model.layers.0.'))}")
    total = 0
    for d in (bf16_dir, mx_dir):
        for n in sorted(os.listdir(d)):
            size = os.path.getsize(os.path.join(d, n))
            total += size
            print(f"{size:>10}  {os.path.relpath(os.path.join(d, n), ROOT)}")
    for name, _, _ in results:
        for ext in ("safetensors", "json"):
            p = os.path.join(ROOT, f"reference-{name}.{ext}")
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):>10}  {os.path.relpath(p, ROOT)}")
    print(f"{total:>10}  total")
    v = versions()
    print(f"wrote {BF16_DIR}, {MXFP4_DIR} and their references;", " ".join(f"{k} {v[k]}" for k in v))


# openai/gpt-oss's chat_template.jinja, byte for byte as llama.cpp vendors it (see the module docstring).
HARMONY_TEMPLATE = r'''{#-
  In addition to the normal inputs of `messages` and `tools`, this template also accepts the
  following kwargs:
  - "builtin_tools": A list, can contain "browser" and/or "python".
  - "model_identity": A string that optionally describes the model identity.
  - "reasoning_effort": A string that describes the reasoning effort, defaults to "medium".
 #}

{#- Tool Definition Rendering ============================================== #}
{%- macro render_typescript_type(param_spec, required_params, is_nullable=false) -%}
    {%- if param_spec.type == "array" -%}
        {%- if param_spec['items'] -%}
            {%- if param_spec['items']['type'] == "string" -%}
                {{- "string[]" }}
            {%- elif param_spec['items']['type'] == "number" -%}
                {{- "number[]" }}
            {%- elif param_spec['items']['type'] == "integer" -%}
                {{- "number[]" }}
            {%- elif param_spec['items']['type'] == "boolean" -%}
                {{- "boolean[]" }}
            {%- else -%}
                {%- set inner_type = render_typescript_type(param_spec['items'], required_params) -%}
                {%- if inner_type == "object | object" or inner_type|length > 50 -%}
                    {{- "any[]" }}
                {%- else -%}
                    {{- inner_type + "[]" }}
                {%- endif -%}
            {%- endif -%}
            {%- if param_spec.nullable -%}
                {{- " | null" }}
            {%- endif -%}
        {%- else -%}
            {{- "any[]" }}
            {%- if param_spec.nullable -%}
                {{- " | null" }}
            {%- endif -%}
        {%- endif -%}
    {%- elif param_spec.type is defined and param_spec.type is iterable and param_spec.type is not string and param_spec.type is not mapping and param_spec.type[0] is defined -%}
        {#- Handle array of types like ["object", "object"] from Union[dict, list] #}
        {%- if param_spec.type | length > 1 -%}
            {{- param_spec.type | join(" | ") }}
        {%- else -%}
            {{- param_spec.type[0] }}
        {%- endif -%}
    {%- elif param_spec.oneOf -%}
        {#- Handle oneOf schemas - check for complex unions and fallback to any #}
        {%- set has_object_variants = false -%}
        {%- for variant in param_spec.oneOf -%}
            {%- if variant.type == "object" -%}
                {%- set has_object_variants = true -%}
            {%- endif -%}
        {%- endfor -%}
        {%- if has_object_variants and param_spec.oneOf|length > 1 -%}
            {{- "any" }}
        {%- else -%}
            {%- for variant in param_spec.oneOf -%}
                {{- render_typescript_type(variant, required_params) -}}
                {%- if variant.description %}
                    {{- "// " + variant.description }}
                {%- endif -%}
                {%- if variant.default is defined %}
                    {{ "// default: " + variant.default|tojson }}
                {%- endif -%}
                {%- if not loop.last %}
                    {{- " | " }}
                {% endif -%}
            {%- endfor -%}
        {%- endif -%}
    {%- elif param_spec.type == "string" -%}
        {%- if param_spec.enum -%}
            {{- '"' + param_spec.enum|join('" | "') + '"' -}}
        {%- else -%}
            {{- "string" }}
            {%- if param_spec.nullable %}
                {{- " | null" }}
            {%- endif -%}
        {%- endif -%}
    {%- elif param_spec.type == "number" -%}
        {{- "number" }}
    {%- elif param_spec.type == "integer" -%}
        {{- "number" }}
    {%- elif param_spec.type == "boolean" -%}
        {{- "boolean" }}

    {%- elif param_spec.type == "object" -%}
        {%- if param_spec.properties -%}
            {{- "{\n" }}
            {%- for prop_name, prop_spec in param_spec.properties.items() -%}
                {{- prop_name -}}
                {%- if prop_name not in (param_spec.required or []) -%}
                    {{- "?" }}
                {%- endif -%}
                {{- ": " }}
                {{ render_typescript_type(prop_spec, param_spec.required or []) }}
                {%- if not loop.last -%}
                    {{-", " }}
                {%- endif -%}
            {%- endfor -%}
            {{- "}" }}
        {%- else -%}
            {{- "object" }}
        {%- endif -%}
    {%- else -%}
        {{- "any" }}
    {%- endif -%}
{%- endmacro -%}

{%- macro render_tool_namespace(namespace_name, tools) -%}
    {{- "## " + namespace_name + "\n\n" }}
    {{- "namespace " + namespace_name + " {\n\n" }}
    {%- for tool in tools %}
        {%- set tool = tool.function %}
        {{- "// " + tool.description + "\n" }}
        {{- "type "+ tool.name + " = " }}
        {%- if tool.parameters and tool.parameters.properties %}
            {{- "(_: {\n" }}
            {%- for param_name, param_spec in tool.parameters.properties.items() %}
                {%- if param_spec.description %}
                    {{- "// " + param_spec.description + "\n" }}
                {%- endif %}
                {{- param_name }}
                {%- if param_name not in (tool.parameters.required or []) -%}
                    {{- "?" }}
                {%- endif -%}
                {{- ": " }}
                {{- render_typescript_type(param_spec, tool.parameters.required or []) }}
                {%- if param_spec.default is defined -%}
                    {%- if param_spec.enum %}
                        {{- ", // default: " + param_spec.default }}
                    {%- elif param_spec.oneOf %}
                        {{- "// default: " + param_spec.default }}
                    {%- else %}
                        {{- ", // default: " + param_spec.default|tojson }}
                    {%- endif -%}
                {%- endif -%}
                {%- if not loop.last %}
                    {{- ",\n" }}
                {%- else %}
                    {{- ",\n" }}
                {%- endif -%}
            {%- endfor %}
            {{- "}) => any;\n\n" }}
        {%- else -%}
            {{- "() => any;\n\n" }}
        {%- endif -%}
    {%- endfor %}
    {{- "} // namespace " + namespace_name }}
{%- endmacro -%}

{%- macro render_builtin_tools(browser_tool, python_tool) -%}
    {%- if browser_tool %}
        {{- "## browser\n\n" }}
        {{- "// Tool for browsing.\n" }}
        {{- "// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n" }}
        {{- "// Cite information from the tool using the following format:\n" }}
        {{- "// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n" }}
        {{- "// Do not quote more than 10 words directly from the tool output.\n" }}
        {{- "// sources=web (default: web)\n" }}
        {{- "namespace browser {\n\n" }}
        {{- "// Searches for information related to `query` and displays `topn` results.\n" }}
        {{- "type search = (_: {\n" }}
        {{- "query: string,\n" }}
        {{- "topn?: number, // default: 10\n" }}
        {{- "source?: string,\n" }}
        {{- "}) => any;\n\n" }}
        {{- "// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\n" }}
        {{- "// Valid link ids are displayed with the formatting: `【{id}†.*】`.\n" }}
        {{- "// If `cursor` is not provided, the most recent page is implied.\n" }}
        {{- "// If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n" }}
        {{- "// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\n" }}
        {{- "// Use this function without `id` to scroll to a new location of an opened page.\n" }}
        {{- "type open = (_: {\n" }}
        {{- "id?: number | string, // default: -1\n" }}
        {{- "cursor?: number, // default: -1\n" }}
        {{- "loc?: number, // default: -1\n" }}
        {{- "num_lines?: number, // default: -1\n" }}
        {{- "view_source?: boolean, // default: false\n" }}
        {{- "source?: string,\n" }}
        {{- "}) => any;\n\n" }}
        {{- "// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.\n" }}
        {{- "type find = (_: {\n" }}
        {{- "pattern: string,\n" }}
        {{- "cursor?: number, // default: -1\n" }}
        {{- "}) => any;\n\n" }}
        {{- "} // namespace browser\n\n" }}
    {%- endif -%}

    {%- if python_tool %}
        {{- "## python\n\n" }}
        {{- "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).\n\n" }}
        {{- "When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.\n\n" }}
    {%- endif -%}
{%- endmacro -%}

{#- System Message Construction ============================================ #}
{%- macro build_system_message() -%}
    {%- if model_identity is not defined %}
        {%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." %}
    {%- endif %}
    {{- model_identity + "\n" }}
    {{- "Knowledge cutoff: 2024-06\n" }}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\n\n" }}
    {%- if reasoning_effort is not defined %}
        {%- set reasoning_effort = "medium" %}
    {%- endif %}
    {{- "Reasoning: " + reasoning_effort + "\n\n" }}
    {%- if builtin_tools %}
        {{- "# Tools\n\n" }}
        {%- set available_builtin_tools = namespace(browser=false, python=false) %}
        {%- for tool in builtin_tools %}
            {%- if tool == "browser" %}
                {%- set available_builtin_tools.browser = true %}
            {%- elif tool == "python" %}
                {%- set available_builtin_tools.python = true %}
            {%- endif %}
        {%- endfor %}
        {{- render_builtin_tools(available_builtin_tools.browser, available_builtin_tools.python) }}
    {%- endif -%}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
    {%- if tools -%}
        {{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}
    {%- endif -%}
{%- endmacro -%}

{#- Main Template Logic ================================================= #}
{#- Set defaults #}

{#- Render system message #}
{{- "<|start|>system<|message|>" }}
{{- build_system_message() }}
{{- "<|end|>" }}

{#- Extract developer message #}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}

{#- Render developer message #}
{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {%- if developer_message %}
        {{- "# Instructions\n\n" }}
        {{- developer_message }}
        {{- "\n\n" }}
    {%- endif %}
    {%- if tools -%}
        {{- "# Tools\n\n" }}
        {{- render_tool_namespace("functions", tools) }}
    {%- endif -%}
    {{- "<|end|>" }}
{%- endif %}

{#- Render messages #}
{%- set last_tool_call = namespace(name=none) %}
{%- for message in loop_messages -%}
    {#- At this point only assistant/user/tool messages should remain #}
    {%- if message.role == 'assistant' -%}
        {#- Checks to ensure the messages are being passed in the format we expect #}
        {%- if "content" in message %}
            {%- if "<|channel|>analysis<|message|>" in message.content or "<|channel|>final<|message|>" in message.content %}
                {{- raise_exception("You have passed a message containing <|channel|> tags in the content field. Instead of doing this, you should pass analysis messages (the string between '<|message|>' and '<|end|>') in the 'thinking' field, and final messages (the string between '<|message|>' and '<|end|>') in the 'content' field.") }}
            {%- endif %}
        {%- endif %}
        {%- if "thinking" in message %}
            {%- if "<|channel|>analysis<|message|>" in message.thinking or "<|channel|>final<|message|>" in message.thinking %}
                {{- raise_exception("You have passed a message containing <|channel|> tags in the thinking field. Instead of doing this, you should pass analysis messages (the string between '<|message|>' and '<|end|>') in the 'thinking' field, and final messages (the string between '<|message|>' and '<|end|>') in the 'content' field.") }}
            {%- endif %}
        {%- endif %}
        {%- if "tool_calls" in message %}
            {#- We need very careful handling here - we want to drop the tool call analysis message if the model #}
            {#- has output a later <|final|> message, but otherwise we want to retain it. This is the only case #}
            {#- when we render CoT/analysis messages in inference. #}
            {%- set future_final_message = namespace(found=false) %}
            {%- for future_message in loop_messages[loop.index:] %}
                {%- if future_message.role == 'assistant' and "tool_calls" not in future_message %}
                    {%- set future_final_message.found = true %}
                {%- endif %}
            {%- endfor %}
            {#- We assume max 1 tool call per message, and so we infer the tool call name #}
            {#- in "tool" messages from the most recent assistant tool call name #}
            {%- set tool_call = message.tool_calls[0] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content and message.thinking %}
                {{- raise_exception("Cannot pass both content and thinking in an assistant message with tool calls! Put the analysis message in one or the other, but not both.") }}
            {%- elif message.content and not future_final_message.found %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.content + "<|end|>" }}
            {%- elif message.thinking and not future_final_message.found %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant to=" }}
            {{- "functions." + tool_call.name + "<|channel|>commentary " }}
            {{- (tool_call.content_type if tool_call.content_type is defined else "json") + "<|message|>" }}
            {{- tool_call.arguments|tojson }}
            {{- "<|call|>" }}
            {%- set last_tool_call.name = tool_call.name %}
        {%- elif loop.last and not add_generation_prompt %}
            {#- Only render the CoT if the final turn is an assistant turn and add_generation_prompt is false #}
            {#- This is a situation that should only occur in training, never in inference. #}
            {%- if "thinking" in message %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {#- <|return|> indicates the end of generation, but <|end|> does not #}
            {#- <|return|> should never be an input to the model, but we include it as the final token #}
            {#- when training, so the model learns to emit it. #}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {#- CoT is dropped during all previous turns, so we never render it for inference #}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
            {%- set last_tool_call.name = none %}
        {%- endif %}
    {%- elif message.role == 'tool' -%}
        {%- if last_tool_call.name is none %}
            {{- raise_exception("Message has tool role, but there was no previous assistant message with a tool call!") }}
        {%- endif %}
        {{- "<|start|>functions." + last_tool_call.name }}
        {{- " to=assistant<|channel|>commentary<|message|>" + message.content|tojson + "<|end|>" }}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}

{#- Generation prompt #}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}'''


if __name__ == "__main__":
    main()
