#!/usr/bin/env bash
# The memory issue's benchmarks, side by side in one run, 2 threads, f16 KV unless said:
#   a  all resident, sage against llama.cpp, flash attention on and off, after a prompt of
#      N tokens (one round: sage on, llama.cpp on, sage off, llama.cpp off): prompt and
#      decode tok/s
#   b  sage all resident, then sage with --memory = every other part of the budget at that
#      context + 25% of the experts (bench_one --memory-experts 25) under a cgroup limit of
#      exactly that total, flash attention on: prompt and decode tok/s, cgroup peak, OOM kills
#   c  the longest context a total of 8 GiB holds at f16 / q8_0 / q4_0 KV with flash attention
#      on, and f16 with it off (`sage plan --ram 8GiB --longest-ctx`: the engine's own budget
#      function, Engine::fit_memory, bisected), and decode speed there under a cgroup limit of
#      8 GiB with --memory 8GiB (bench_one --depth: the positions before the last few assumed
#      evaluated, not computed: a prompt that long takes hours on 2 cores)
#   bench/memory.sh PHASES MODEL_DIR MODEL.gguf N_PROMPT [N_GEN]
# DEPTH=D: sage's runs in a and b evaluate their prompt after D positions assumed evaluated
# (bench_one --depth: the attention cost of a prompt at that depth without computing the D
# tokens before it, which take hours on 2 cores at 48 layers; llama.cpp has no such mode, so
# its runs are left out).
# PHASES: a, b, c or any of them ("ab"). Needs root (cgroup v1, drop_caches). RUNS="sage-fa-on
# llama-fa-on" runs only those names; BENCH_TIMEOUT (seconds, default 7200) bounds each run.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASES=$1 DIR=$2 GGUF=$3 NP=$4 NG=${5:-32}
cargo build --release --quiet --example bench_one
B=target/release/examples/bench_one
CG=/sys/fs/cgroup/memory/sage-mem-$$
trap 'rmdir "$CG" 2>/dev/null || true' EXIT
TIMEOUT=${BENCH_TIMEOUT:-7200}
RUN_FIELDS="\"n_prompt\": $NP, "
. bench/lib.sh

DEPTH=${DEPTH:-0}
D=(); [ "$DEPTH" -gt 0 ] && D=(--depth "$DEPTH")
RUN_FIELDS="$RUN_FIELDS\"depth\": $DEPTH, "
echo "# $DIR, prompt $NP after $DEPTH, decode $NG, 2 threads, $(date -u +%F)" >&2
if [[ $PHASES == *a* ]]; then
    for fa in on off; do
        flag=""; [ $fa = on ] && flag=--flash-attn
        run none sage-fa-$fa $B sage "$DIR" "${D[@]}" --prompt "$NP" --gen "$NG" --threads 2 $flag
        [ "$DEPTH" -gt 0 ] || run none llama-fa-$fa $B llama "$GGUF" --no-mmap --prompt "$NP" --gen "$NG" --threads 2 $flag
    done
fi
if [[ $PHASES == *b* ]]; then
    total=$($B sage "$DIR" "${D[@]}" --prompt "$NP" --gen "$NG" --threads 2 --flash-attn --memory-experts 25 --fit-only \
        | python3 -c "import json,sys; print(json.load(sys.stdin)['memory'])")
    run none sage-all $B sage "$DIR" "${D[@]}" --prompt "$NP" --gen "$NG" --threads 2 --flash-attn
    run "$total" sage-memory-25 $B sage "$DIR" "${D[@]}" --prompt "$NP" --gen "$NG" --threads 2 --flash-attn --memory "$total"
fi
if [[ $PHASES == *c* ]]; then
    for cfg in on:f16 on:q8_0 on:q4_0 off:f16; do
        fa=${cfg%%:*} t=${cfg#*:}
        flag=""; [ $fa = on ] && flag=--flash-attn
        plan=$(target/release/sage plan "$DIR" --ram 8GiB --longest-ctx --flash-attn $fa --cache-type-k $t --cache-type-v $t -t 2 --disk 1GB --json 2>/dev/null)
        ctx=$(echo "$plan" | python3 -c "import json,sys; print(json.load(sys.stdin)['longest_ctx'])")
        echo "{\"plan\": \"fa-$fa-$t\", \"longest_ctx\": $ctx}"
        run $((8 << 30)) "sage-8g-fa-$fa-$t-ctx-$ctx" $B sage "$DIR" --ctx "$ctx" --depth $((ctx - NG - 8)) --prompt 1 --gen "$NG" \
            --threads 2 $flag --ctk $t --ctv $t --memory $((8 << 30))
    done
fi
