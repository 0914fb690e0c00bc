#!/usr/bin/env bash
# Writes tests/data/quant_mix.json: the type llama.cpp's llama-quantize gives every tensor of
# SmolLM2-135M-Instruct at each preset, and the bytes of tensor data, for tests/quant.rs.
#   LLAMA_BIN=/path/to/llama.cpp/build/bin LLAMA_GGUF_PY=/path/to/llama.cpp/gguf-py \
#     tests/data/make_quant_mix_fixture.sh MODEL.gguf
# Made with llama.cpp as vendored in llama-cpp-python 0.3.36 (see tests/data/README.md). The
# source's own quantization does not matter: the types depend only on names and shapes.
set -euo pipefail
model="$1"; out="$(cd "$(dirname "$0")" && pwd)/quant_mix.json"; work="$(mktemp -d)"
for p in Q2_K Q3_K_M Q4_K_S Q4_K_M Q5_K_M Q6_K Q8_0; do
    "$LLAMA_BIN/llama-quantize" --allow-requantize "$model" "$work/$p.gguf" "$p" 2 > /dev/null 2>&1
done
PYTHONPATH="$LLAMA_GGUF_PY" python3 - "$work" "$out" <<'PY'
import json, sys, gguf
work, out = sys.argv[1], sys.argv[2]
res = {"made_by": "tests/data/make_quant_mix_fixture.sh (llama-quantize, llama-cpp-python 0.3.36)",
       "names": None, "presets": {}}
for p in ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]:
    r = gguf.GGUFReader(f"{work}/{p}.gguf")
    names = [t.name for t in r.tensors]
    res["names"] = res["names"] or names
    assert names == res["names"]
    res["presets"][p] = {"tensor_bytes": sum(int(t.n_bytes) for t in r.tensors),
                         "types": [t.tensor_type.name for t in r.tensors]}
json.dump(res, open(out, "w"), separators=(",", ":"))
PY
rm -rf "$work"
