#!/usr/bin/env python3
"""Train sage's bundled model: a small but real Qwen3-MoE, on public-domain/permissive English.

The model is exactly transformers' Qwen3MoeForCausalLM (so sage-convert converts it and
llama.cpp runs it): 4 layers, n_embd 256, 16 experts of FFN 256 with top-4 routing and Qwen3's
router load-balancing loss, a byte-level BPE of 4096 tokens trained on the same corpus.

Corpus (Debian bookworm packages, fetched with `apt-get download`, no root needed):
  bible-kjv-text + bible-kjv   the King James Bible (1611; public domain), dumped with the
                               package's own `bible` program
  jargon-text                  the Jargon File 4.4.7 (public domain)
  python3.11-doc               the reStructuredText sources of the Python tutorial, HOWTOs,
                               FAQ, language reference and glossary (PSF License 2)
Every 50th document of each source is held out (never trained on) and written to
heldout.txt beside the model.

Usage (CPU torch; about an hour on 2 cores):
  python3 scripts/train_model.py -o models/sage-moe-16m [--steps N] [--cache DIR]
  python3 scripts/train_model.py -o models/sage-moe-16m --heldout-only   # heldout.txt alone
Writes: model.safetensors (bf16), config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, heldout.txt, train_log.tsv, TRAINING.md.
Deterministic for a given corpus and torch build: fixed seeds, one data order.
"""
import argparse
import glob
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

PACKAGES = ["bible-kjv-text", "bible-kjv", "jargon-text", "python3.11-doc"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 4096
HELDOUT_EVERY = 50
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sh(*args, cwd=None):
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def fetch(cache):
    """Download and unpack the corpus packages into `cache` (once)."""
    root = os.path.join(cache, "root")
    os.makedirs(cache, exist_ok=True)
    debs = {}
    for p in PACKAGES:
        found = glob.glob(os.path.join(cache, f"{p}_*.deb"))
        if not found:
            sh("apt-get", "download", p, cwd=cache)
            found = glob.glob(os.path.join(cache, f"{p}_*.deb"))
        debs[p] = os.path.basename(sorted(found)[-1])
        sh("dpkg-deb", "-x", os.path.join(cache, debs[p]), root)
    return root, debs


def kjv_docs(root):
    """One document per chapter: a 'Book N' heading, then one verse per line, numbers dropped."""
    out = subprocess.run([os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"),
                          "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    docs, cur, verse = [], [], []
    for line in out.splitlines():
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            if verse:
                cur.append(" ".join(verse))
            verse = [m.group(2).strip()]
        elif line.strip() and not line.startswith(" ") and re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line):
            if verse:
                cur.append(" ".join(verse))
                verse = []
            if cur:
                docs.append("\n".join(cur))
            cur = [line.strip()]
        elif line.strip():
            verse.append(line.strip())
    if verse:
        cur.append(" ".join(verse))
    if cur:
        docs.append("\n".join(cur))
    return docs


def chunks(paragraphs, size):
    docs, cur, n = [], [], 0
    for p in paragraphs:
        cur.append(p)
        n += len(p)
        if n >= size:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def jargon_docs(root):
    import gzip
    with gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"), "rt", errors="replace") as f:
        text = f.read()
    paras = [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return chunks(paras, 2000)


def python_docs(root):
    base = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
    files = []
    for d in ("tutorial", "howto", "faq", "reference"):
        files += sorted(glob.glob(os.path.join(base, d, "*.rst.txt")))
    files.append(os.path.join(base, "glossary.rst.txt"))
    docs = []
    for path in files:
        with open(path, errors="replace") as f:
            text = f.read()
        paras = [p.rstrip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        docs += chunks(paras, 2000)
    return docs


def corpus(cache):
    root, debs = fetch(cache)
    sources = {"kjv": kjv_docs(root), "jargon": jargon_docs(root), "python-docs": python_docs(root)}
    train, held = [], {}
    for name, docs in sources.items():
        for i, d in enumerate(docs):
            if i % HELDOUT_EVERY == HELDOUT_EVERY - 1:
                held.setdefault(name, []).append(d)
            else:
                train.append(d)
    # Held-out documents interleaved source by source, so any prefix mixes all three styles.
    heldout = [d for group in itertools.zip_longest(*held.values()) for d in group if d is not None]
    return train, heldout, debs, {k: (len(v), sum(map(len, v))) for k, v in sources.items()}


def make_tokenizer(train):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIAL), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(train, trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    return tok


def config(tok, args):
    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=args.embd, intermediate_size=2 * args.embd,
        moe_intermediate_size=args.expert_ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.embd // 64, num_key_value_heads=args.embd // 128,
        head_dim=64, num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, output_router_logits=True,
        router_aux_loss_coef=0.01, bos_token_id=None,
        eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|endoftext|>"),
    )


def stream(tok, docs):
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [eot]
    return torch.tensor(ids, dtype=torch.long)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--cache", default="/tmp/sage-corpus")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256, help="n_embd (heads of 64; half as many KV heads)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--tokenizer", help="use this tokenizer.json instead of training one (the same corpus's)")
    ap.add_argument("--heldout-chars", type=int, default=60000,
                    help="characters of held-out text written to heldout.txt")
    ap.add_argument("--heldout-only", action="store_true",
                    help="only (re)write heldout.txt from the corpus; no training")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    train_docs, held_docs, debs, sizes = corpus(args.cache)
    if args.heldout_only:
        with open(os.path.join(args.out, "heldout.txt"), "w") as f:
            f.write("\n\n".join(held_docs)[: args.heldout_chars])
        print("wrote", os.path.join(args.out, "heldout.txt"), flush=True)
        return
    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else make_tokenizer(train_docs)
    data = stream(tok, train_docs)
    held_text = "\n\n".join(held_docs)[: args.heldout_chars]
    held = stream(tok, [held_text])
    print(f"corpus {sizes}; train {len(data)} tokens, held-out {len(held)} tokens", flush=True)

    cfg = config(tok, args)
    model = Qwen3MoeForCausalLM(cfg)
    # torch's grouped matmul for the experts: the same math as the eager loop, about 1.6x faster.
    model.set_experts_implementation("grouped_mm")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def held_loss():
        model.eval()
        losses = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for s in range(0, len(held) - args.seq, args.seq):
                x = held[s: s + args.seq].unsqueeze(0)
                losses.append(float(model(input_ids=x, labels=x, output_router_logits=False).loss))
        model.train()
        return sum(losses) / len(losses)

    g = torch.Generator().manual_seed(42)
    log = open(os.path.join(args.out, "train_log.tsv"), "w")
    log.write("step\tlr\ttrain_loss\taux_loss\theldout_loss\tseconds\n")
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([data[s: s + args.seq + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # transformers shifts labels itself: labels are the inputs.
            out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            ce = float(out.loss.detach()) - cfg.router_aux_loss_coef * float(out.aux_loss.detach())
            hl = held_loss() if (step % 500 == 0 or step == args.steps - 1) else float("nan")
            el = time.time() - t0
            log.write(f"{step}\t{lr_at(step):.6f}\t{ce:.4f}\t{float(out.aux_loss.detach()):.4f}\t{hl:.4f}\t{el:.0f}\n")
            log.flush()
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step}/{args.steps} loss {ce:.3f} aux {float(out.aux_loss.detach()):.3f} "
                  f"held-out {hl:.3f} {el:.0f}s eta {eta:.0f}s", flush=True)
    log.close()

    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }, f, indent=2)
    with open(os.path.join(args.out, "heldout.txt"), "w") as f:
        f.write(held_text)
    digest = hashlib.sha256("\x00".join(train_docs).encode()).hexdigest()[:16]
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write(f"""# How this model was made

Command: `python3 scripts/train_model.py {' '.join(sys.argv[1:])}`
(torch {torch.__version__}, transformers {sys.modules['transformers'].__version__},
{args.threads} CPU threads, {time.time() - t0:.0f} s of training).

Architecture: Qwen3MoeForCausalLM, {n_params / 1e6:.2f} M parameters: {args.layers} layers, n_embd {args.embd},
{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads of 64, {args.experts} experts of FFN {args.expert_ffn}, top-{args.top_k} routing with normalized weights,
router load-balancing loss coefficient {cfg.router_aux_loss_coef}; byte-level BPE of {VOCAB}
tokens (Qwen2 pre-tokenizer split) {'from ' + args.tokenizer + ' (trained on the same training split)' if args.tokenizer else 'trained on the training split'}.

Training: {args.steps} steps of {args.batch} x {args.seq} tokens, AdamW (lr {args.lr}, warmup
{warmup}, cosine to 10%, weight decay 0.1), bf16 autocast; loss curve in train_log.tsv.

Corpus (Debian bookworm packages: {', '.join(debs.values())}):

| source | license | documents | characters |
|---|---|---|---|
| King James Bible, one document per chapter | public domain (1611) | {sizes['kjv'][0]} | {sizes['kjv'][1]} |
| Jargon File 4.4.7 | public domain | {sizes['jargon'][0]} | {sizes['jargon'][1]} |
| Python 3.11 docs (tutorial, HOWTOs, FAQ, reference, glossary; reST) | PSF License 2 | {sizes['python-docs'][0]} | {sizes['python-docs'][1]} |

Every {HELDOUT_EVERY}th document of each source is held out; heldout.txt holds the first
{args.heldout_chars} characters of the held-out documents, interleaved source by source. Training split: {len(data)} tokens
(sha256 prefix of its text {digest}).
""")
    print("wrote", args.out, flush=True)


if __name__ == "__main__":
    main()
