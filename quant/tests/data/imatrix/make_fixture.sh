#!/usr/bin/env bash
# Regenerates the importance-matrix fixtures in this folder with llama.cpp itself (see README.md).
# Needs llama.cpp built in $LLAMA_CPP (default /tmp/llsrc, binaries in build/bin, gguf-py in gguf-py),
# python3 with numpy, and the SmolLM2-135M-Instruct Q4_1 model.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
llama="${LLAMA_CPP:-/tmp/llsrc}"
model="${TESSERA_MODEL:-$HOME/.cache/tessera/SmolLM2-135M-Instruct.Q4_1.gguf}"
text="$here/../../../../tests/data/tinyshakespeare-head.txt"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The first 8 KiB of Tiny Shakespeare, named train.txt (the name is recorded as the dataset).
head -c 8192 "$text" > "$work/train.txt"
cd "$work"
for format in gguf dat; do
    # --no-repack: this build's AMX kernels die with SIGILL in a container that has not been
    # granted AMX tile state; the plain CPU kernels give the same statistics.
    "$llama/build/bin/llama-imatrix" -m "$model" -f train.txt -c 128 --chunks 2 -t 1 \
        --no-repack --output-format "$format" -o "full.$format" > "log-$format.txt" 2>&1
done
PYTHONPATH="$llama/gguf-py" python3 "$here/cut.py" full.gguf "$here/smollm2-3.imatrix.gguf"
python3 "$here/cut.py" full.dat "$here/smollm2-3.imatrix.dat"
ls -l "$here"/smollm2-3.imatrix.*
