#!/usr/bin/env bash
# Runs `tessera bench` and llama.cpp's llama-bench on the same model and machine, one after the
# other, and prints their tokens/s side by side with the ratios (Tessera / llama.cpp).
#
#   LLAMA_BENCH_CPU=/path/to/cpu/build/bin/llama-bench \
#   LLAMA_BENCH_VK=/path/to/vulkan/build/bin/llama-bench \
#   tools/scripts/compare_llamacpp_bench.sh [MODEL.gguf]
#
# Either llama-bench may be left unset; MODEL defaults to the default model (`tessera fetch`).
# Settings (environment): P (prompt length, default 512), N (tokens generated, 128), R
# (repetitions, 3), THREADS (llama.cpp CPU threads, all cores), TESSERA (the binary), OUT (a
# folder for the raw JSON, default target/bench-compare).
#
# Which llama.cpp: the CPU build is the one inside llama-cpp-python 0.3.36's source package
# (llama.cpp 0c1e570); the Vulkan build is llama-cpp-python 0.3.16's (llama.cpp 4227c9b),
# because newer ones need Vulkan headers (VK_EXT_layer_settings) that Debian 12 lacks:
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16
#   tar xzf llama_cpp_python-0.3.16.tar.gz && cd llama_cpp_python-0.3.16/vendor/llama.cpp
#   apt-get install -y libvulkan-dev glslc
#   cmake -B build -DGGML_VULKAN=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build -j --target llama-bench
# (the CPU build: the same from 0.3.36 without -DGGML_VULKAN). On a CPU with AMX that the virtual
# machine does not let programs use, that native CPU build stops at the first prompt with SIGILL
# ("Illegal instruction"); build it with -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON
# -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON instead (seen on a Xeon
# with amx_tile, 2026-12-05). llama.cpp skips CPU-type Vulkan
# devices such as lavapipe unless GGML_VK_VISIBLE_DEVICES names them; this script sets it to 0.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
tessera="${TESSERA:-$here/target/release/tessera}"
p="${P:-512}"; n="${N:-128}"; r="${R:-3}"; threads="${THREADS:-$(nproc)}"
out="${OUT:-$here/target/bench-compare}"
if [ ! -x "$tessera" ]; then
    echo "no tessera binary at $tessera: build it (cargo build --release) or set TESSERA" >&2
    exit 1
fi
model="${1:-$("$tessera" fetch)}"
mkdir -p "$out"
# Only this run's results are compared.
rm -f "$out/tessera.json" "$out/llama-cpu.json" "$out/llama-vulkan.json"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== tessera bench (every device) on $model" >&2
"$tessera" bench -m "$model" -p "$p" -n "$n" -r "$r" --device all -o json > "$out/tessera.json"

if [ -n "${LLAMA_BENCH_CPU:-}" ]; then
    echo "== llama.cpp CPU ($threads threads)" >&2
    "$LLAMA_BENCH_CPU" -m "$model" -p "$p" -n "$n" -r "$r" -t "$threads" -o json \
        > "$out/llama-cpu.json" 2> "$out/llama-cpu.log"
fi
if [ -n "${LLAMA_BENCH_VK:-}" ]; then
    echo "== llama.cpp Vulkan (device 0)" >&2
    GGML_VK_VISIBLE_DEVICES=0 "$LLAMA_BENCH_VK" -m "$model" -p "$p" -n "$n" -r "$r" -ngl 99 \
        -o json > "$out/llama-vulkan.json" 2> "$out/llama-vulkan.log"
fi

python3 - "$out" <<'EOF'
import json, os, sys

out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)

def test(rec):
    return f"pp{rec['n_prompt']}" if rec["n_gen"] == 0 else f"tg{rec['n_gen']}"

def order(name):
    return (name[:2], int(name[2:]))

rows = {}
tessera = load("tessera.json")
devices = sorted({(r.get("backend", "?"), r.get("device", "?")) for r in tessera})
backends = [b for b, _ in devices]
for rec in tessera:
    backend, device = rec.get("backend", "?"), rec.get("device", "?")
    # Name the device too where two devices share a backend (a GPU and lavapipe, say).
    label = f"Tessera {backend}" if backends.count(backend) == 1 else f"Tessera {backend} {device}"
    rows.setdefault(test(rec), {})[label] = rec
for name, label in [("llama-cpu.json", "llama.cpp CPU"), ("llama-vulkan.json", "llama.cpp Vulkan")]:
    for rec in load(name):
        rows.setdefault(test(rec), {})[label] = rec

columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (not c.startswith("T"), c))
print("| test | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for t, recs in sorted(rows.items(), key=lambda kv: order(kv[0])):
    cells = []
    for c in columns:
        rec = recs.get(c)
        cells.append(f"{rec['avg_ts']:.2f} ± {rec['stddev_ts']:.2f}" if rec else "")
    print(f"| {t} | " + " | ".join(cells) + " |")

ratios = []
for t, recs in sorted(rows.items(), key=lambda kv: order(kv[0])):
    for ours in [c for c in columns if c.startswith("Tessera")]:
        for theirs in [c for c in columns if c.startswith("llama.cpp")]:
            if ours in recs and theirs in recs and recs[theirs]["avg_ts"] > 0:
                ratio = recs[ours]["avg_ts"] / recs[theirs]["avg_ts"]
                ratios.append(f"  {t}: {ours} / {theirs} = {ratio:.2f}x")
if ratios:
    print()
    print("Ratios (Tessera / llama.cpp, tokens/s):")
    print("\n".join(ratios))
EOF
