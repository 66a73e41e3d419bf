#!/usr/bin/env python3
"""Make sage's tiny Mixtral, OLMoE and Qwen2-MoE reference fixtures with Hugging Face transformers.

Writes, under tests/fixtures/:
  tiny-mixtral/     a random-weight MixtralForCausalLM: config.json, model.safetensors (bf16, the
                    Hub layout transformers 5 writes: block_sparse_moe.experts.N.w1/w2/w3),
                    generation_config.json, and a Mistral-style SentencePiece BPE tokenizer with
                    byte fallback: tokenizer.model, tokenizer.json (transformers' LlamaConverter,
                    "legacy" form: Prepend/Replace normalizer, no pre-tokenizer, BPE with merges),
                    tokenizer_config.json (LlamaTokenizer, add_bos_token, Mixtral-Instruct template)
  tiny-olmoe/       a random-weight OlmoeForCausalLM (mlp.experts.N.{gate,up,down}_proj on disk,
                    q_norm/k_norm over the whole projection) with a GPT-NeoX-style byte-level BPE
                    (NFC, GPT-2 regex, <|endoftext|>/<|padding|>) and OLMoE-Instruct's tulu template
  tiny-qwen2moe/    a random-weight Qwen2MoeForCausalLM (q/k/v biases, shared expert with a sigmoid
                    gate) with the Qwen2 tokenizer of tiny-qwen3moe (copied)
  reference-<arch>.safetensors   for arch in mixtral, olmoe, qwen2moe: per prompt <name>.ids (int32),
                    <name>.logits (f32 [n_tokens, n_vocab]) and <name>.pool_logits (routing restricted
                    to the pool: router logits outside it are -inf before the softmax)
  reference-<arch>.json          prompts, pool, config values, versions, the rendered chat prompt, and
                    tokenizer references: ids of AutoTokenizer.from_pretrained(dir) (no special tokens
                    added) for a list of strings, their decode, and the ids of the tokenizer.json
                    pipeline as the `tokenizers` library runs it (plus SentencePiece's for Mixtral)

Usage (CPU torch is enough; about 10 s on 2 cores):
    python3 -m venv /work/venv
    /work/venv/bin/pip install torch 'transformers>=5' safetensors tokenizers numpy sentencepiece protobuf
    /work/venv/bin/python scripts/make_arch_fixtures.py
Made with torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, sentencepiece 0.2.3 (the last line
printed names the versions of the run; reference-<arch>.json records them too).
Deterministic: fixed seeds; the tokenizers are trained on text generated below (single-threaded).

The Mixtral chat template is Mixtral-8x7B-Instruct-v0.1's release template as recorded in
huggingface/huggingface.js packages/jinja/test/e2e.test.js ("mistralai/Mixtral-8x7B-Instruct-v0.1");
the Hub repository changed its template later (June 2024, to match mistral_common). The OLMoE
template is open-instruct's "tulu" template with a leading {{ bos_token }}, the form
OLMoE-1B-7B-0924-Instruct renders as "<|endoftext|><|user|>\\n...\\n<|assistant|>\\n".

Note on the Mixtral tokenizer: AutoTokenizer.from_pretrained(dir) loads tokenizer.json as it is
(TokenizersBackend: transformers 5.24 registers no tokenizer class for model_type "mixtral"), and its
ids equal SentencePiece's on every string without special tokens. LlamaTokenizer.from_pretrained(dir),
named explicitly, instead rebuilds the pipeline with a Metaspace pre-tokenizer that adds no "▁" to a
chunk already starting with a space: for "  two leading" it gives one "▁" fewer than SentencePiece,
llama.cpp and tokenizer.json. The references hold AutoTokenizer's ids and, beside them, the ids of
tokenizer.json run by the `tokenizers` library (and SentencePiece's for Mixtral); every model prompt
tokenizes the same both ways (checked below).
"""
import io
import json
import os
import shutil
import sys
import types
import unicodedata
from collections import Counter

import sentencepiece as spm
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor
from transformers.models.mixtral import modeling_mixtral
from transformers.models.olmoe import modeling_olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.tokenization_utils_base import generate_merges

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import corpus  # noqa: E402  (the same training text as the Qwen3 fixture)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
QWEN_TOKENIZER_SRC = os.path.join(ROOT, "tiny-qwen3moe")

PLAIN_PROMPTS = [  # the plain texts of make_fixtures.py
    ("fox", "The quick brown fox jumps over the lazy dog."),
    ("code", "def main():\n    return 42  # the answer\n"),
    ("mixed", "Hello, world! 12345 caf\u00e9 na\u00efve \u00fcber \u2014 done.  Two  spaces\n\nend"),
]
CHAT_MESSAGES = [{"role": "user", "content": "What is a mixture of experts?"}]

MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
OLMOE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

# Strings for the tokenizer references (all already NFC: llama.cpp does not normalize).
TOKENIZE_COMMON = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading",
    " one leading",
    "trailing spaces   ",
    "multiple   inner    spaces",
    " ",
    "12345 and 3.14159",
    "line one\nline two\n\n\tindented\ttab\r\nend",
    "caf\u00e9 na\u00efve \u00fcber d\u00e9j\u00e0 vu",
    "\u65e5\u672c\u8a9e \u4e2d\u6587 \U0001F600\U0001F389",  # 日本語 (in the corpus) 中文 and emoji (not)
    "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u0395\u03bb\u03bb\u03ac\u03b4\u03b1",  # привет мир Ελλάδα
    "It's they're we've I'd you'll",
    "def main():\n    return 42  # the answer\n",
    "if (x >= 10) { y += x * 2; } // done",
    "",
    "\u00dcn\u00efc\u00f6d\u00e9 \u015dtr\u00ef\u00f1g \u2014 \u201cquotes\u201d \u2026 end",
]
SPECIAL_STRINGS = {
    "mixtral": ["<s>hello</s> world", "x <s> y</s>", "<unk> token"],
    "olmoe": ["end<|endoftext|>start", "a <|padding|> b", "<|endoftext|>"],
    "qwen2moe": ["<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>", "<|im_end|>"],
}


def non_ascii_lines():
    """Lines with multi-byte characters, so some become pieces; CJK other than these, emoji etc. do not."""
    words = ("caf\u00e9 na\u00efve \u00fcber d\u00e9j\u00e0 vu stra\u00dfe gr\u00f6\u00dfe fa\u00e7ade r\u00e9sum\u00e9 "
             "se\u00f1or \u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u0434\u0430\u043d\u043d\u044b\u0435 "
             "\u65e5\u672c\u8a9e \u6771\u4eac \u6a21\u578b \u5c02\u9580\u5bb6 \u0395\u03bb\u03bb\u03ac\u03b4\u03b1").split()
    g = torch.Generator().manual_seed(11)
    lines = []
    for _ in range(600):
        n = int(torch.randint(2, 8, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[j] for j in idx))
    return lines


# ---------------------------------------------------------------------------------------------
# Tokenizers

class _ScoreOrderedExtractor(SentencePieceExtractor):
    """transformers 5.24's SpmConverter.tokenizer() calls extract(vocab_scores) with the 4.x signature,
    which SentencePieceExtractor.extract no longer has; this restores it: the vocab in id order and
    merges ranked by piece score (what transformers 4 produced for Llama/Mistral)."""

    def extract(self, vocab_scores=None):
        vocab = {p.piece: i for i, p in enumerate(self.proto.pieces)}
        return vocab, generate_merges(vocab, vocab_scores)


class _MistralLikeConverter(LlamaConverter):
    SpmExtractor = _ScoreOrderedExtractor


def make_mixtral_tokenizer(out_dir):
    """A SentencePiece BPE with byte fallback trained like Llama/Mistral's, converted the legacy way."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() + non_ascii_lines()), model_writer=model,
        model_type="bpe", vocab_size=640, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, split_by_unicode_script=True,
        split_by_whitespace=True, split_by_number=True, max_sentence_length=100000,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    spm_path = os.path.join(out_dir, "tokenizer.model")
    with open(spm_path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    assert sp.get_piece_size() == 640, sp.get_piece_size()
    shim = types.SimpleNamespace(vocab_file=spm_path, legacy=True, add_prefix_space=True,
                                 convert_ids_to_tokens=sp.id_to_piece)
    tok = _MistralLikeConverter(shim).converted()
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False)])
    # Mistral's tokenizer.json carries BOS in its post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
            "legacy": True, "clean_up_tokenization_spaces": False,
            "chat_template": MIXTRAL_CHAT_TEMPLATE,
        }, f, indent=2)
    return sp


def make_olmoe_tokenizer(out_dir):
    """A GPT-NeoX-style byte-level BPE: NFC, GPT-2's regex, <|endoftext|> 0 and <|padding|> 1."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|padding|>"],
    )
    tok.train_from_iterator(corpus() + non_ascii_lines(), trainer=trainer)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|padding|>",
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "chat_template": OLMOE_CHAT_TEMPLATE,
        }, f, indent=2)
    return tok


def copy_qwen_tokenizer(out_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(QWEN_TOKENIZER_SRC, name), os.path.join(out_dir, name))


# ---------------------------------------------------------------------------------------------
# Models

def mixtral_config(tok):
    return MixtralConfig(
        vocab_size=640, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, router_jitter_noise=0.0, attn_implementation="eager",
    )


def olmoe_config(tok):
    return OlmoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=False, clip_qkv=None, attention_bias=False, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|padding|>"),
        attn_implementation="eager",
    )


def qwen2moe_config(tok):
    return Qwen2MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        shared_expert_intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=None, attn_implementation="eager",
    )


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:  # includes OLMoE's q_norm/k_norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                # A spread-out router, so top-k choices are well separated; a shared-expert gate
                # whose sigmoid is not stuck at 0.5.
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(".bias"):
                # Biases start at zero; a converter that drops them must fail.
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    # Round to bf16 (what is stored) so the f32 reference sees exactly the stored weights.
    model.to(torch.bfloat16).to(torch.float32)


def logits_for(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().contiguous()


def pooled_logits(model, ids, pool, router_cls, n_experts, renormalize):
    """Reference for a pool: router logits of experts outside the pool are -inf before the softmax.

    The patched forward is the architecture's router forward plus the mask: softmax over all experts
    in f32, top-k, then Mixtral renormalizes the top-k weights and OLMoE / Qwen2-MoE (norm_topk_prob
    false) do not. Qwen2-MoE's shared expert lives outside the router and is untouched.
    """
    orig = router_cls.forward
    mask = torch.full((n_experts,), float("-inf"))
    mask[pool] = 0.0

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = torch.nn.functional.linear(hidden_states, self.weight) + mask
        probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top_v, top_i = torch.topk(probs, self.top_k, dim=-1)
        if renormalize:
            top_v /= top_v.sum(dim=-1, keepdim=True)
        return router_logits, top_v.to(router_logits.dtype), top_i

    router_cls.forward = forward
    try:
        return logits_for(model, ids)
    finally:
        router_cls.forward = orig


def expert_counts(model, router_cls, prompt_ids):
    """How often each expert is chosen, per layer, over the prompts (full routing)."""
    counts = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, router_cls):
            # "model.layers.N.mlp.gate", or "model.language_model.layers.N.mlp.gate"
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            counts[layer] = Counter()

            def hook(_m, _inp, out, layer=layer):
                counts[layer].update(out[2].flatten().tolist())
            hooks.append(mod.register_forward_hook(hook))
    try:
        for ids in prompt_ids:
            logits_for(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return counts


ARCHES = [
    dict(arch="mixtral", dir="tiny-mixtral", model_cls=MixtralForCausalLM, config=mixtral_config,
         router_cls=modeling_mixtral.MixtralTopKRouter, renormalize=True, pool=[1, 4, 6, 7], seed=2001),
    dict(arch="olmoe", dir="tiny-olmoe", model_cls=OlmoeForCausalLM, config=olmoe_config,
         router_cls=modeling_olmoe.OlmoeTopKRouter, renormalize=False, pool=[0, 3, 5, 6, 9, 12], seed=2002),
    dict(arch="qwen2moe", dir="tiny-qwen2moe", model_cls=Qwen2MoeForCausalLM, config=qwen2moe_config,
         router_cls=modeling_qwen2_moe.Qwen2MoeTopKRouter, renormalize=False, pool=[1, 2, 4, 5, 7], seed=2003),
]

TOKENIZER_NOTES = {
    "mixtral": "SentencePiece BPE with byte fallback (tokenizer.model), converted by transformers' "
               "LlamaConverter (legacy: Prepend+Replace normalizer, no pre-tokenizer). ids: "
               "AutoTokenizer (loads tokenizer.json as is); ids_tokenizer_json: tokenizers library on "
               "tokenizer.json; ids_sentencepiece: SentencePieceProcessor.encode, which does not parse "
               "special tokens in text. transformers' LlamaTokenizer class, named explicitly, adds one "
               "'▁' fewer before text that starts with a space.",
    "olmoe": "GPT-NeoX-style byte-level BPE (NFC, GPT-2 regex); <|endoftext|> is bos/eos/unk, "
             "<|padding|> pad; embedding rows past the tokenizer are padding.",
    "qwen2moe": "the Qwen2 tokenizer of tiny-qwen3moe; embedding rows past the tokenizer are padding.",
}

CONFIG_KEYS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "qkv_bias", "attention_bias", "clip_qkv",
    "max_position_embeddings", "rms_norm_eps", "rope_parameters", "sliding_window",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
]


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "sentencepiece": spm.__version__}


def build(spec):
    arch, out_dir = spec["arch"], os.path.join(ROOT, spec["dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    sp = None
    if arch == "mixtral":
        sp = make_mixtral_tokenizer(out_dir)
    elif arch == "olmoe":
        make_olmoe_tokenizer(out_dir)
    else:
        copy_qwen_tokenizer(out_dir)
    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))

    cfg = spec["config"](raw)
    model = spec["model_cls"](cfg)
    spec.get("randomize", randomize)(model, spec["seed"])
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    del model

    # The reference comes from the committed files, loaded fresh in f32: casting the in-memory
    # model to bf16 and back would also have rounded RoPE's inv_freq buffer.
    model = spec["model_cls"].from_pretrained(
        out_dir, dtype=spec.get("ref_dtype", torch.float32), attn_implementation="eager", experts_implementation="eager")
    model.eval()
    cfg = model.config
    text_cfg = cfg.get_text_config()
    n_experts = getattr(text_cfg, spec.get("n_experts_key", "num_local_experts" if arch == "mixtral" else "num_experts"))
    tok = AutoTokenizer.from_pretrained(out_dir)

    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    prompts = [(n, t, True) for n, t in PLAIN_PROMPTS] + [("chat", chat_text, False)]

    ref, meta_prompts, all_ids = {}, [], []
    for name, text, add_special in prompts:
        ids = tok(text, add_special_tokens=add_special).input_ids
        raw_ids = raw.encode(text, add_special_tokens=add_special).ids
        assert ids == raw_ids, (arch, name, ids, raw_ids)  # AutoTokenizer and tokenizer.json agree here
        assert max(ids) < text_cfg.vocab_size
        full = logits_for(model, ids)
        pool_fn = spec.get("pooled_logits", pooled_logits)
        pooled = pool_fn(model, ids, spec["pool"], spec["router_cls"], n_experts, spec["renormalize"])
        same = pool_fn(model, ids, list(range(n_experts)), spec["router_cls"], n_experts, spec["renormalize"])
        d_all = (same - full).abs().max().item()
        d_pool = (pooled - full).abs().max().item()
        assert d_all < 1e-5, (arch, name, "patched router with every expert differs", d_all)
        assert d_pool > 1e-2, (arch, name, "the pool does not change the logits", d_pool)
        ref[f"{name}.ids"] = torch.tensor(ids, dtype=torch.int32)
        ref[f"{name}.logits"] = full
        ref[f"{name}.pool_logits"] = pooled
        meta_prompts.append({"name": name, "text": text, "n_tokens": len(ids),
                             "add_special_tokens": add_special,
                             "max_abs_diff_pool_vs_full": round(d_pool, 6),
                             "max_abs_diff_all_experts_patch_vs_full": d_all})
        all_ids.append(ids)

    tokenize = []
    for s in TOKENIZE_COMMON + SPECIAL_STRINGS.get(arch, SPECIAL_STRINGS["qwen2moe"]):
        assert unicodedata.is_normalized("NFC", s), s
        ids = tok(s, add_special_tokens=False).input_ids
        entry = {"text": s, "ids": ids, "decode": tok.decode(ids),
                 "ids_tokenizer_json": raw.encode(s, add_special_tokens=False).ids}
        if sp is not None:
            entry["ids_sentencepiece"] = sp.encode(s)
        entry["auto_matches_tokenizer_json"] = entry["ids"] == entry["ids_tokenizer_json"]
        tokenize.append(entry)

    ref_path = os.path.join(ROOT, f"reference-{arch}.safetensors")
    save_file(ref, ref_path)
    conf = {k: getattr(text_cfg, k) for k in spec.get("config_keys", CONFIG_KEYS) if hasattr(text_cfg, k)}
    meta = {
        "arch": arch, "model_dir": spec["dir"], "architecture": type(model).__name__,
        "prompts": meta_prompts, "pool": spec["pool"], "n_vocab": text_cfg.vocab_size,
        "n_experts": n_experts, "tokenizer_size": raw.get_vocab_size(with_added_tokens=True),
        "config": conf, "versions": versions(), "chat_prompt": chat_text,
        "chat_messages": CHAT_MESSAGES,
        "special_token_ids": {t: raw.token_to_id(t) for t in
                              [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token] if t is not None},
        "tokenize": tokenize,
        "tokenizer_note": spec.get("tokenizer_note") or TOKENIZER_NOTES[arch],
        "tolerance_note": spec.get("tolerance_note", "transformers f32, eager attention, eager experts; pool "
                                   "logits: router logits outside the pool set to -inf before the softmax"),
    }
    with open(os.path.join(ROOT, f"reference-{arch}.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)

    # Tensors the checkpoint carries beside the model (a next-token-prediction layer).
    if "extra_tensors" in spec:
        spec["extra_tensors"](out_dir)

    # Verify: a fresh load of the committed checkpoint reproduces the stored logits.
    del model
    again = spec["model_cls"].from_pretrained(
        out_dir, dtype=spec.get("ref_dtype", torch.float32), attn_implementation="eager", experts_implementation="eager").eval()
    stored = load_file(ref_path)
    d = (logits_for(again, stored["fox.ids"].tolist()) - stored["fox.logits"]).abs().max().item()
    assert d < 1e-6, (arch, "reload differs", d)
    counts = expert_counts(again, spec["router_cls"], all_ids)
    for layer, c in counts.items():
        used = sum(1 for e in range(n_experts) if c[e] > 0)
        assert used >= min(n_experts, 4), (arch, layer, "degenerate routing", c)

    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        layers = spec.get("layers_prefix", "model.layers.")
        layer0 = sorted(k for k in f.keys() if k.startswith(layers + "0."))
        others = sorted(k for k in f.keys() if not k.startswith(layers))
    print(f"== {arch}: reload max diff {d:.2e}; max |logit| "
          f"{max(ref[f'{n}.logits'].abs().max().item() for n, _, _ in prompts):.3f}")
    for layer, c in sorted(counts.items()):
        print(f"   layer {layer} expert picks: " + " ".join(f"{e}:{c[e]}" for e in range(n_experts)))
    print("   prompts: " + ", ".join(f"{p['name']}={p['n_tokens']} tok (pool diff "
                                       f"{p['max_abs_diff_pool_vs_full']:.3f})" for p in meta_prompts))
    mismatch = [e["text"] for e in tokenize if not e["auto_matches_tokenizer_json"]]
    print(f"   AutoTokenizer vs tokenizer.json mismatches: {mismatch}")
    print(f"   layer 0 tensors: {layer0}")
    print(f"   other tensors: {others}")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for spec in ARCHES:
        build(spec)
    total = 0
    for spec in ARCHES:
        paths = [os.path.join(ROOT, spec["dir"], n) for n in sorted(os.listdir(os.path.join(ROOT, spec["dir"])))]
        paths += [os.path.join(ROOT, f"reference-{spec['arch']}.{e}") for e in ("safetensors", "json")]
        for p in paths:
            size = os.path.getsize(p)
            total += size
            print(f"{size:>10}  {os.path.relpath(p, ROOT)}")
    print(f"{total:>10}  total")
    v = versions()
    print("wrote tiny-mixtral, tiny-olmoe, tiny-qwen2moe and their references;",
          " ".join(f"{k} {v[k]}" for k in v))


if __name__ == "__main__":
    main()
