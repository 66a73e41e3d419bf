#!/usr/bin/env bash
# On the lent GPU machine: build ggml's CUDA backend as a loadable module from the same ggml
# source llama-cpp-sys-2 vendors, drop it next to device_check (built on the dev machine with
# --features dynamic-backends), and run the parity check on the GPU.
set -eu
cd "$(dirname "$0")"
nvidia-smi -L
start=$(date +%s)
cmake -S ggml -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DGGML_BACKEND_DL=ON \
  -DGGML_CUDA_FA=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >$OUT/cmake.log 2>&1 \
  || { tail -30 $OUT/cmake.log; exit 1; }
cmake --build build --target ggml-cuda -j16 >$OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "cuda module built in $(( $(date +%s) - start )) s"
cp build/bin/libggml-cuda.so bin/ 2>/dev/null || cp $(find build -name 'libggml-cuda.so' | head -1) bin/
ls -la bin
LD_LIBRARY_PATH=$PWD/bin ./bin/device_check model model.gguf cuda 2>&1 | tee $OUT/device_check.log || true
LLAMA_GPU_LAYERS=99 LD_LIBRARY_PATH=$PWD/bin ./bin/device_check model model.gguf cuda 2>&1 | tee $OUT/device_check_gpu_ref.log
