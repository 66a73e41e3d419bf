#!/usr/bin/env python3
"""Record transformers' AutoTokenizer ids for the Qwen3-MoE fixture and the bundled model.

Writes tests/fixtures/tokenize-<name>.json for name in tiny-qwen3moe (tests/fixtures/) and
sage-moe-16m (models/): for each string (the arch fixtures' list, plus the tokenizer's special
tokens in text), the ids of AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)
and their decode; for tiny-qwen3moe also the ids AutoTokenizer gives each prompt of
reference.json (whose stored ids scripts/make_fixtures.py made with the `tokenizers` package,
which shares its core with the Rust crate: these are the independent reference).

Usage (the venv of scripts/make_arch_fixtures.py; a few seconds):
    /work/venv/bin/python scripts/make_tokenizer_references.py
Made with transformers 5.24.0, tokenizers 0.23.3 (recorded in each file).
"""
import json
import os
import sys
import unicodedata

import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(REPO, "tests", "fixtures")
sys.path.insert(0, HERE)
from make_arch_fixtures import TOKENIZE_COMMON  # noqa: E402

SPECIAL = ["<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>", "<|im_end|>", "a<|im_start|>b c"]
MODELS = [("tiny-qwen3moe", os.path.join(FIXTURES, "tiny-qwen3moe")),
          ("sage-moe-16m", os.path.join(REPO, "models", "sage-moe-16m"))]


def main():
    for name, d in MODELS:
        tok = AutoTokenizer.from_pretrained(d)
        entries = []
        for s in TOKENIZE_COMMON + SPECIAL:
            assert unicodedata.is_normalized("NFC", s), s
            ids = tok(s, add_special_tokens=False).input_ids
            entries.append({"text": s, "ids": ids, "decode": tok.decode(ids)})
        out = {"model": name, "source": "AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)",
               "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
               "tokenize": entries}
        if name == "tiny-qwen3moe":
            with open(os.path.join(FIXTURES, "reference.json")) as f:
                prompts = json.load(f)["prompts"]
            out["prompts"] = [{"name": p["name"], "ids": tok(p["text"], add_special_tokens=False).input_ids}
                              for p in prompts]
        path = os.path.join(FIXTURES, f"tokenize-{name}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1, ensure_ascii=False)
        print("wrote", path, len(entries), "strings")
    print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__)


if __name__ == "__main__":
    main()
