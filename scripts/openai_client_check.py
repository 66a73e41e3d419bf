#!/usr/bin/env python3
"""Drive `sage serve` with the official `openai` Python package and check its answers against
`sage run` on the same model and prompt (temperature 0): chat and text completions, streaming
and not, usage, /v1/models, a refused request, a clean exit on SIGTERM.

Run by .ci/run after the test suite (it installs `openai` into a venv under target/):
    python3 -m venv target/ci-venv && target/ci-venv/bin/pip install openai
    target/ci-venv/bin/python scripts/openai_client_check.py
Needs target/release/sage and sage-convert (cargo build --release --bins). Exits non-zero on the
first mismatch.
"""
import json
import os
import signal
import subprocess
import sys
import threading

import openai

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release")
SAGE = os.path.join(BIN, "sage")
WORK = os.path.join(ROOT, "target", "openai-check")
MODEL = os.path.join(WORK, "sage-moe-16m-q8_0")
SYSTEM = "You speak as the King James Bible."
QUESTION = "And God said unto Moses,"
N = 24


def sage_run(*args):
    out = subprocess.run([SAGE, "run", MODEL, "--temp", "0", "--json", "-n", str(N), *args],
                         check=True, capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in out.splitlines()]
    return "".join(l.get("text", "") for l in lines[:-1]), lines[-1]["stats"]


def check(what, got, want):
    if got != want:
        sys.exit(f"openai_client_check: {what}: got {got!r}, want {want!r}")
    print(f"ok  {what}")


def main():
    os.makedirs(WORK, exist_ok=True)
    subprocess.run([os.path.join(BIN, "sage-convert"), os.path.join(ROOT, "models", "sage-moe-16m"), "-o", MODEL,
                    "--quant", "q8_0", "--force"], check=True, capture_output=True)
    chat_text, chat_stats = sage_run("--chat", "--system", SYSTEM, "--prompt", QUESTION, "--arena-experts", "16")
    plain_text, plain_stats = sage_run("--prompt", QUESTION, "--arena-experts", "16")

    server = subprocess.Popen([SAGE, "serve", MODEL, "--port", "0", "--arena-experts", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    timer = threading.Timer(120, server.kill)  # a server that never answers fails the check
    timer.start()
    try:
        line = server.stdout.readline()
        url = next(w for w in line.split() if w.startswith("http://"))
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

        r = client.chat.completions.create(model="sage", messages=messages, temperature=0, max_tokens=N)
        check("chat: text", r.choices[0].message.content, chat_text)
        check("chat: finish_reason", r.choices[0].finish_reason, "length")
        check("chat: usage", (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens),
              (chat_stats["prompt_tokens"], N, chat_stats["prompt_tokens"] + N))

        stream = client.chat.completions.create(model="sage", messages=messages, temperature=0, max_tokens=N,
                                                stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
        check("chat stream: text", text, chat_text)
        check("chat stream: usage", (usage.prompt_tokens, usage.completion_tokens), (chat_stats["prompt_tokens"], N))
        check("chat stream: cached prompt tokens", usage.prompt_tokens_details.cached_tokens,
              chat_stats["prompt_tokens"] - 1)

        r = client.completions.create(model="sage", prompt=QUESTION, temperature=0, max_tokens=N)
        check("completion: text", r.choices[0].text, plain_text)
        check("completion: usage", (r.usage.prompt_tokens, r.usage.completion_tokens), (plain_stats["prompt_tokens"], N))

        models = [m.id for m in client.models.list()]
        check("models", models, [os.path.basename(MODEL)])

        try:
            client.chat.completions.create(model="sage", messages=messages, n=2)
            sys.exit("openai_client_check: n=2 was accepted")
        except openai.BadRequestError as e:
            check("n=2 refused", (e.status_code, "n = 2" in str(e)), (400, True))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait()
        timer.cancel()
    check("exit status after SIGTERM", code, 0)
    print(f"openai_client_check: sage serve answers the openai package {openai.__version__} as sage run does")


if __name__ == "__main__":
    main()
