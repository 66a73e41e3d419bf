#!/usr/bin/env bash
# Conversion benchmark: peak RSS of converting a several-GB checkpoint, and sage-convert's
# throughput against llama.cpp's llama_model_quantize on the same f16 GGUF, same machine,
# same run (runs alternate; medians).
#
#   bench/convert.sh WORK_DIR [LAYERS] [RUNS]
#
# Needs python3 with numpy (for bench/make_synthetic_hf.py) and ~30 GB free in WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: bench/convert.sh WORK_DIR [LAYERS] [RUNS]}
layers=${2:-4}
runs=${3:-3}
mkdir -p "$work"
cargo build --release --bins --example llama_quantize >/dev/null 2>&1
conv=./target/release/sage-convert
lq=./target/release/examples/llama_quantize

[ -f "$work/hf/model.safetensors.index.json" ] || python3 bench/make_synthetic_hf.py "$work/hf" --layers "$layers"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; $(date -u +%F)"
echo "checkpoint: $(du -sh "$work/hf" | cut -f1) bf16 safetensors, $layers layers of Qwen3-30B-A3B shape"

peak() { # command... -> prints "seconds max_rss_kib"
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" >/dev/null
    cat "$work/time.txt"
}

read -r s rss <<<"$(peak $conv "$work/hf" -o "$work/q4k" --quant q4_k --force)"
echo "HF bf16 -> q4_k: ${s} s, peak RSS $((rss / 1024)) MiB"

if [ ! -f "$work/f16.gguf" ]; then
    $conv "$work/hf" -o "$work/f16" --quant f16 --force >/dev/null
    $conv merge "$work/f16" -o "$work/f16.gguf" --force >/dev/null
    rm -rf "$work/f16"
fi
cat "$work/f16.gguf" >/dev/null # both start from a warm page cache
sage_t=(); llama_t=()
for i in $(seq "$runs"); do
    read -r s rss <<<"$(peak $conv "$work/f16.gguf" -o "$work/sage-q4k" --quant q4_k --force)"
    sage_t+=("$s"); echo "run $i: sage-convert f16.gguf -> q4_k: $s s (peak RSS $((rss / 1024)) MiB)"
    read -r s rss <<<"$(peak $lq "$work/f16.gguf" "$work/llama-q4k.gguf" "$(nproc)")"
    llama_t+=("$s"); echo "run $i: llama_model_quantize f16.gguf -> q4_K: $s s (peak RSS $((rss / 1024)) MiB)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ms=$(median "${sage_t[@]}"); ml=$(median "${llama_t[@]}")
bytes=$(stat -c %s "$work/f16.gguf")
echo "median: sage-convert $ms s ($(awk -v b="$bytes" -v t="$ms" 'BEGIN{printf "%.0f", b/t/1e6}') MB/s of f16 input), llama_model_quantize $ml s ($(awk -v b="$bytes" -v t="$ml" 'BEGIN{printf "%.0f", b/t/1e6}') MB/s)"
echo "throughput ratio sage/llama.cpp: $(awk -v a="$ms" -v b="$ml" 'BEGIN{printf "%.2f", b/a}')"
