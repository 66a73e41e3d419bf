#!/usr/bin/env bash
# Flash attention on and off, side by side (alternating rounds), 2 threads, on a shallow model
# of Qwen3-30B-A3B's shapes: prompt and decode tok/s and peak RSS after a prompt that fills
# most of the context.
#   bench/attention.sh [MODEL_DIR] [ROUNDS] [CTX]
# MODEL_DIR is made when missing: sage-convert synth --like qwen3-30b-a3b --quant q4_k --layers 2
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:-target/bench/q30-2}
rounds=${2:-3}
ctx=${3:-4096}
[ -d "$m" ] || ./target/release/sage-convert synth --like qwen3-30b-a3b --quant q4_k --layers 2 -o "$m"
# About 9 tokens per sentence; 97% of the context.
p=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * ($ctx * 97 // 900)))")
echo "fa prompt_tok_s decode_tok_s peak_rss_bytes"
for r in $(seq "$rounds"); do
    for fa in on off; do
        ./target/release/sage run "$m" --prompt "$p" --ctx "$ctx" --flash-attn "$fa" -t 2 -n 32 --temp 0 --json 2>/dev/null | tail -1 \
            | python3 -c "import json,sys; s=json.load(sys.stdin)['stats']; print('$fa', round(s['prompt_tok_per_s'],1), round(s['gen_tok_per_s'],1), s['peak_rss_bytes'])"
    done
done
