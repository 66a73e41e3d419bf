#!/usr/bin/env bash
# Prepare the GPU parity check for a lent GPU machine that has CUDA and CMake but no Rust:
# fills ./gpu (ignored by git; add "/gpu/" to .git/info/exclude) with
#   gpu/ggml       ggml's source as vendored by llama-cpp-sys-2 (not committed: another project's code)
#   gpu/bin        examples/device_check built with --features dynamic-backends, its shared
#                  libraries and a few CPU backend modules
#   gpu/model      the tiny fixture converted at q8_0, and gpu/model.gguf its merge
#   gpu/run.sh     builds ggml's CUDA backend module there (~3 min on 16 cores) and runs the check
# Then run `bash gpu/run.sh` on the device machine, carrying "gpu".
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$(ls -d ~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp/ggml | head -1)
rm -rf gpu && mkdir -p gpu/bin
cp -r "$src" gpu/ggml
touch gpu/ggml/ggml.pc.in
# Backends the check does not need, to keep the tree under the 64 MiB the device takes.
for d in virtgpu cann webgpu openvino et metal hexagon sycl vulkan opencl zdnn rpc blas musa hip zendnn kompute; do
    rm -rf "gpu/ggml/src/ggml-$d"
done
CARGO_TARGET_DIR=target/dyn cargo build --release --features dynamic-backends --example device_check
out=$(dirname "$(ls -d target/dyn/release/build/llama-cpp-sys-2-*/out/lib | head -1)")
cp target/dyn/release/examples/device_check gpu/bin/ && strip --strip-unneeded gpu/bin/device_check
for l in libllama.so.0 libllama-common.so.0 libggml-base.so.0 libggml.so.0; do cp -L "$out/lib/$l" gpu/bin/; done
# AMX variants fault in some VMs; these cover x86-64 hosts.
for v in haswell skylakex x64; do cp "$out/backends/libggml-cpu-$v.so" gpu/bin/; done
cargo build --release --bins
./target/release/sage-convert tests/fixtures/tiny-qwen3moe -o gpu/model --quant q8_0 --force
./target/release/sage-convert merge gpu/model -o gpu/model.gguf --force
cp scripts/gpu/run.sh gpu/run.sh
du -sh gpu
