#!/usr/bin/env bash
# Prepare the offline package folder that benchmarks/gpu_check.sh --wheels reads on the lent GPU machine (no network
# there): the llama-cpp-python 0.3.36 sdist, trimmed, and the wheels the GPU image lacks, for its Python 3.12.
#
#   benchmarks/gpu_wheels.sh [DIR]        # default .whl; then: echo /.whl/ >> .git/info/exclude, and carry .whl
#
# The sdist as PyPI serves it is 76.6 MB, more than the device tool carries (64 MiB with the working tree): it holds
# a 38 MB git pack of llama.cpp, its test vocabularies (models/, 75 MB unpacked) and docs. None of that is built;
# neither are the ggml backends other than CPU and CUDA, nor the server's web UI. Trimmed: about 5.7 MB, and
# `cmake -S` on it configures as the full one does (checked with the CPU backend; the CUDA configure needs cuBLAS).
set -euo pipefail
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps -d "$TMP" llama-cpp-python==0.3.36
tar xzf "$TMP"/llama_cpp_python-0.3.36.tar.gz -C "$TMP"
SRC=$TMP/llama_cpp_python-0.3.36
V=$SRC/vendor/llama.cpp
rm -rf "$SRC/.git" "$V"/.git* "$V/models" "$V/docs" "$V/media" "$V/benches" "$V/tests" "$V/examples" "$V/scripts" \
    "$V/conversion" "$V/tools/ui" "$V/tools/server"
for b in virtgpu cann openvino webgpu et metal hexagon sycl vulkan opencl; do rm -rf "$V/ggml/src/ggml-$b"; done
tar czf "$DIR/llama_cpp_python-0.3.36.tar.gz" -C "$TMP" llama_cpp_python-0.3.36
"$PY" -m pip download -q --no-deps -d "$DIR" diskcache==5.6.3
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
    gguf==0.19.0 diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 sd-parsers==0.6
du -sh "$DIR"
