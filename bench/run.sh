#!/usr/bin/env bash
# sage against llama.cpp on the same files and threads, in one run, under the same memory
# limits (cgroup v1 memory controller; needs root):
#   1. llama.cpp, the whole model in memory, read with --no-mmap (no limit), its weights in
#      its CPU repacking buffers (its default, and its fastest kernels)
#   2. sage, every expert in its arena (no limit)
#   3. limits of base + 25% and base + 50% of the expert bytes (+ 384 MiB for KV cache,
#      compute buffers and code): llama.cpp with mmap and its CPU repacking off (through
#      llama.cpp's C API: use_extra_bufts = false; with repacking on it would copy every q4_K
#      matrix out of the mapping, 34 GB in all, and is OOM-killed at either limit), and sage
#      with the arena that fits
#   4. the I/O bound: this disk's sequential read bandwidth (O_DIRECT) / sage's bytes read
#      per decoded token under the limit
# Page cache is dropped before every run and counts against the limit.
#
#   bench/run.sh MODEL_DIR MODEL.gguf [N_PROMPT] [N_GEN] [POLICY]
# SAGE_FLAGS="--no-prefetch" passes flags to sage's runs; RUNS="sage-25 sage-50" runs only those
# (names: llama-full sage-full llama-mmap-25 sage-25 llama-mmap-50 sage-50); PCTS="10 25 50"
# sets the limits (default 25 50); TRACES="a.trace b.trace" runs sage under each limit once per
# routing trace (--route-trace, benchmarks only: sage-25-a, sage-25-b ...) instead of once
# with its own routing. VARIANTS="cold:--cold-quant" adds, per trace and limit, a run with
# those bench_one flags (comma-separated) named sage-25-TRACE-cold: levers side by side.
# MODEL.gguf is `sage-convert merge MODEL_DIR` (or `sage-convert synth ... --merged`).
# Prints one JSON line per run, then a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$1
GGUF=$2
NP=${3:-512}
NG=${4:-128}
POLICY=${5:-lru}
MARGIN=$((384 << 20))
TIMEOUT=${BENCH_TIMEOUT:-1800}
cargo build --release --quiet --example bench_one
B=target/release/examples/bench_one
CG=/sys/fs/cgroup/memory/sage-bench-$$
trap 'rmdir "$CG" 2>/dev/null || true' EXIT

. bench/lib.sh

num() { grep -o "\"$1\": *[0-9.e+-]*" | head -1 | sed 's/.*: *//'; }

sizes=$($B sizes "$DIR")
BASE=$(echo "$sizes" | tr -d ' ' | sed 's/,/\n/g' | sed -n 's/.*"base_bytes":\([0-9]*\).*/\1/p')
EXP=$(echo "$sizes" | tr -d ' ' | sed 's/,/\n/g' | sed -n 's/.*"expert_bytes":\([0-9]*\).*/\1/p')
echo "# base $BASE bytes, experts $EXP bytes, prompt $NP, decode $NG, policy $POLICY ${SAGE_FLAGS:-}, $(nproc) threads, $(date -u +%F)" >&2

# Disk: sequential O_DIRECT read of up to 4 GiB of the merged GGUF.
drop_caches
BW=$(dd if="$GGUF" of=/dev/null bs=4M count=1024 iflag=direct 2>&1 | awk '/copied/{print $1 / $(NF-3)}')
# (dd prints "N bytes ... copied, T s, R unit/s": bytes / seconds)
echo "{\"run\": \"disk\", \"read_bytes_per_s\": $BW}"

R=()
R+=("$(run none llama-full $B llama "$GGUF" --no-mmap --prompt "$NP" --gen "$NG")")
R+=("$(run none sage-full $B sage "$DIR" --prompt "$NP" --gen "$NG" --policy "$POLICY" ${SAGE_FLAGS:-})")
for pct in ${PCTS:-25 50}; do
    limit=$((BASE + EXP * pct / 100 + MARGIN))
    arena=$((EXP * pct / 100))
    R+=("$(run $limit llama-mmap-$pct $B llama "$GGUF" --no-repack --prompt "$NP" --gen "$NG")")
    if [ -z "${TRACES:-}" ]; then
        R+=("$(run $limit sage-$pct $B sage "$DIR" --arena $arena --prompt "$NP" --gen "$NG" --policy "$POLICY" ${SAGE_FLAGS:-})")
    fi
    for tr in ${TRACES:-}; do
        R+=("$(run $limit sage-$pct-$(basename "$tr" .trace) $B sage "$DIR" --arena $arena --prompt "$NP" --gen "$NG" --policy "$POLICY" --route-trace "$tr" ${SAGE_FLAGS:-})")
        for v in ${VARIANTS:-}; do
            f=${v#*:}
            R+=("$(run $limit sage-$pct-$(basename "$tr" .trace)-${v%%:*} $B sage "$DIR" --arena $arena --prompt "$NP" --gen "$NG" --policy "$POLICY" --route-trace "$tr" ${SAGE_FLAGS:-} ${f//,/ })")
        done
    done
done
F=()
for r in "${R[@]}"; do [ -z "$r" ] || F+=("$r"); done
R=("${F[@]}")
printf '%s\n' "${R[@]}"

echo
echo "| run | memory limit | prompt tok/s | decode tok/s | decode hit rate | bytes read / token | cgroup peak | OOM kills |"
echo "|---|---|---|---|---|---|---|---|"
for r in "${R[@]}"; do
    name=$(echo "$r" | sed 's/.*"run": "\([^"]*\)".*/\1/')
    limit=$(echo "$r" | sed 's/.*"limit": "\([^"]*\)".*/\1/')
    awk -v n="$name" -v l="$limit" -v p="$(echo "$r" | num prompt_tok_s)" -v d="$(echo "$r" | num decode_tok_s)" \
        -v h="$(echo "$r" | num decode_hit_rate)" -v b="$(echo "$r" | num decode_bytes_read_per_token)" \
        -v c="$(echo "$r" | num cgroup_peak)" -v o="$(echo "$r" | num oom_kills)" -v x="$(echo "$r" | num exit)" 'BEGIN {
        lim = (l == "none") ? "none" : sprintf("%.2f GB", l / 1e9)
        printf "| %s | %s | %s | %s | %s | %s | %.2f GB | %s%s |\n", n, lim,
            (p == "") ? "-" : sprintf("%.1f", p), (d == "") ? "-" : sprintf("%.2f", d),
            (h == "") ? "-" : sprintf("%.1f%%", 100 * h), (b == "") ? "-" : sprintf("%.1f MB", b / 1e6),
            c / 1e9, o, (x != 0) ? sprintf(" (exit %s)", x) : "" }'

done
for pct in ${PCTS:-25 50}; do
    for r in "${R[@]}"; do
        case "$r" in *"\"run\": \"sage-$pct"[\"-]*)
            per=$(echo "$r" | num decode_bytes_read_per_token)
            dec=$(echo "$r" | num decode_tok_s)
            if [ -n "$per" ] && [ "$per" != 0 ]; then
                awk -v bw="$BW" -v per="$per" -v dec="$dec" -v pct="$(echo "$r" | sed 's/.*"run": "\([^"]*\)".*/\1/')" 'BEGIN {
                    bound = bw / per; printf "I/O bound of %s: %.0f MB/s / %.1f MB per token = %.2f tok/s; sage decodes %.2f tok/s = %.2f of it\n", pct, bw / 1e6, per / 1e6, bound, dec, dec / bound }'
            fi;;
        esac
    done
done
