#!/usr/bin/env bash
# Quantizes the default model to Q4_K_M with llama.cpp's llama-imatrix + llama-quantize and with
# `tessera quant calibrate --method imatrix`, from the same dequantized base and the same
# calibration text, then evaluates both against the base with `tessera quant eval` in one
# session. Prints the two evaluations and the sizes.
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin tools/scripts/compare_llamacpp_quant.sh [WORKDIR]
#
# (--no-repack: ggml's repacked CPU kernels can pick AMX instructions that some machines trap.)
# llama.cpp's tools build from the source inside llama-cpp-python's source package (CPU only):
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
#   tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
#   cmake --build build -j --target llama-imatrix llama-quantize
# Settings (environment): SAMPLES (calibration windows, default 32), SEQ_LEN (512), TYPE
# (Q4_K_M), CHUNKS (evaluation windows of 512 tokens, default 8), TESSERA (the binary).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$here/target/quant-compare}"
bin="${LLAMA_BIN:?set LLAMA_BIN to the build/bin folder of llama.cpp}"
tessera="${TESSERA:-$here/target/release/tessera}"
samples="${SAMPLES:-32}"; seq="${SEQ_LEN:-512}"; type="${TYPE:-Q4_K_M}"; chunks="${CHUNKS:-8}"
mkdir -p "$work"
calib="$here/quant/calibration/prose-en.txt"

echo "== base: the default model dequantized to F32"
[ -f "$work/base-f32.gguf" ] || "$tessera" quant calibrate --method rtn --type F32 --no-eval \
    -o "$work/base-f32.gguf" > /dev/null

echo "== llama.cpp: llama-imatrix ($samples chunks of $seq) + llama-quantize $type"
start=$(date +%s.%N)
"$bin/llama-imatrix" -m "$work/base-f32.gguf" -f "$calib" -c "$seq" --chunks "$samples" --no-repack \
    -o "$work/llama.imatrix.gguf" -t "$(nproc)" > "$work/llama-imatrix.log" 2>&1
mid=$(date +%s.%N)
"$bin/llama-quantize" --allow-requantize --imatrix "$work/llama.imatrix.gguf" "$work/base-f32.gguf" \
    "$work/llama.$type.gguf" "$type" > "$work/llama-quantize.log" 2>&1
end=$(date +%s.%N)
echo "llama-imatrix $(echo "$mid - $start" | bc) s, llama-quantize $(echo "$end - $mid" | bc) s"

echo "== tessera: quant calibrate --method imatrix --type $type ($samples windows of $seq)"
start=$(date +%s.%N)
# Tessera reads the default model itself: its weights are the base's (base-f32.gguf is them
# dequantized), and running Q4_1 weights on the GPU is faster than running F32 ones.
"$tessera" quant calibrate --data "$calib" --samples "$samples" \
    --seq-len "$seq" --method imatrix --type "$type" --no-eval -o "$work/tessera.$type.gguf"
end=$(date +%s.%N)
echo "tessera quant calibrate $(echo "$end - $start" | bc) s"

for f in llama tessera; do
    echo "== quant eval: $f.$type.gguf ($(stat -c %s "$work/$f.$type.gguf") bytes)"
    "$tessera" quant eval -m "$work/$f.$type.gguf" --base "$work/base-f32.gguf" \
        -f heldout-en -c 512 --chunks "$chunks" --json | tee "$work/$f.eval.json"
done
