#!/usr/bin/env python3
"""Render conversations with Hugging Face transformers' apply_chat_template: the references sage's
chat templates (minijinja) are checked against.

Writes tests/fixtures/chat-templates.json:
  {"versions": {...},
   "conversations": [{"name", "messages", "add_generation_prompt"}, ...],
   "models": {"<model dir, relative to the repository>": {"<conversation name>": {"text": ...} or
              {"error": "<the template's raise_exception message>"}}},
   "features": {"template": ..., "bos_token", "eos_token", "kwargs", "rendered": {...}}}

"models" covers every model sage bundles or tests with a template of its own (ChatML for the Qwen
fixtures and the bundled model, Mixtral-Instruct's release template, OLMoE-Instruct's tulu
template), each as AutoTokenizer.from_pretrained(dir) renders it. "features" is one template written
here that uses the Jinja the published templates use (Qwen3's: namespace, a reversed slice,
`is defined` / `is none` / `is string`, tojson, str methods with arguments, whitespace control,
loop.first/last/index0, extra variables such as enable_thinking passed as keyword arguments),
rendered by transformers with the Qwen tokenizer of the fixtures.

Usage (no torch needed; a second):
    /work/venv/bin/python scripts/make_chat_references.py
Made with transformers 5.24.0, jinja2 3.1 (recorded in the output).
"""
import json
import os

import jinja2
import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
OUT = os.path.join(REPO, "tests", "fixtures", "chat-templates.json")

MODELS = [
    "models/sage-moe-16m",
    "tests/fixtures/tiny-qwen3moe",
    "tests/fixtures/tiny-qwen3-omni",
    "tests/fixtures/tiny-qwen2moe",
    "tests/fixtures/tiny-mixtral",
    "tests/fixtures/tiny-olmoe",
]

U, A, S = "user", "assistant", "system"


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    ("one_user_turn", [m(U, "What is a mixture of experts?")], True),
    ("system_then_user", [m(S, "You answer in one sentence."), m(U, "Why is the sky blue?")], True),
    ("multi_turn", [m(U, "Name a prime."), m(A, "Seven."), m(U, "And one larger than 100?")], True),
    ("multi_turn_with_system", [m(S, "Be terse."), m(U, "2+2?"), m(A, "4"), m(U, "3+3?")], True),
    ("ends_with_assistant_no_prompt", [m(U, "Say hi."), m(A, "Hi!")], False),
    ("no_generation_prompt", [m(U, "Only the user's turn.")], False),
    ("unicode_and_newlines", [m(U, "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600\n\n  indented\tline\n")], True),
    ("long_history", [m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d"), m(U, "e"), m(A, "f"), m(U, "g")], True),
    ("roles_not_alternating", [m(U, "first"), m(U, "second")], True),
    ("assistant_first", [m(A, "I speak first."), m(U, "ok")], True),
    ("template_like_content", [m(U, "{{ not a tag }} {% neither %} <|im_end|>")], True),
]

# Written for these tests: the constructs of published templates (Qwen3's among them), not any
# one model's template.
FEATURES_TEMPLATE = """{#- a thinking ChatML: system first, reasoning split from answers -#}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content.strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1, count=0) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == 'user' and ns.count == 0 %}
        {%- set ns.last_user = index %}
        {%- set ns.count = ns.count + 1 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- if message.content is string and message.content.endswith('?') %}{{- ' (asked back)' }}{%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if meta is defined %}{{- '<!-- ' + meta | tojson + ' -->\\n' }}{%- endif %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
{{- eos_token if false else '' -}}"""

FEATURE_CONVERSATIONS = [
    ("system_stripped", [m(S, "  Be brief.  \n"), m(U, "Hi")], True, {}),
    ("reasoning_split", [m(U, "q1"), m(A, "<think>\nplan\n</think>\n\nanswer one"), m(U, "q2"),
                         m(A, "<think>\nmore plans\n\n</think>\n\nanswer two?")], False, {}),
    ("reasoning_before_last_user", [m(U, "q1"), m(A, "<think>x</think>a1"), m(U, "q2")], True, {}),
    ("thinking_off", [m(U, "hello")], True, {"enable_thinking": False}),
    ("thinking_on", [m(U, "hello")], True, {"enable_thinking": True}),
    ("tojson_kwarg", [m(U, "hello")], True, {"meta": {"b": [1, 2.5, "x\u00e9"], "a": None, "c": True}}),
    ("second_system_message", [m(S, "one"), m(U, "u"), m(S, "two"), m(U, "v")], True, {}),
    ("unknown_role", [m(U, "u"), m("tool", "t")], True, {}),
]


def render(tok, messages, add_generation_prompt, **kw):
    try:
        return {"text": tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False, **kw)}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main():
    out = {
        "versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
        "conversations": [{"name": n, "messages": msgs, "add_generation_prompt": g} for n, msgs, g in CONVERSATIONS],
        "models": {},
    }
    for rel in MODELS:
        tok = AutoTokenizer.from_pretrained(os.path.join(REPO, rel))
        assert tok.chat_template, rel
        out["models"][rel] = {n: render(tok, msgs, g) for n, msgs, g in CONVERSATIONS}
    qwen = AutoTokenizer.from_pretrained(os.path.join(REPO, "tests/fixtures/tiny-qwen3moe"))
    out["features"] = {
        "template": FEATURES_TEMPLATE,
        "bos_token": qwen.bos_token or "",
        "eos_token": qwen.eos_token,
        "conversations": [
            {"name": n, "messages": msgs, "add_generation_prompt": g, "kwargs": kw,
             **render(qwen, msgs, g, chat_template=FEATURES_TEMPLATE, **kw)}
            for n, msgs, g, kw in FEATURE_CONVERSATIONS
        ],
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    n_err = sum("error" in r for mod in out["models"].values() for r in mod.values())
    print(f"wrote {OUT}: {len(MODELS)} models x {len(CONVERSATIONS)} conversations ({n_err} refused by "
          f"their template), {len(FEATURE_CONVERSATIONS)} feature cases; "
          f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}")


if __name__ == "__main__":
    main()
