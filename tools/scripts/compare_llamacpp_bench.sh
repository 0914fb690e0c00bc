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
# (repetitions, 3), ROUNDS (times the whole comparison runs, 1 to 999; 1), THREADS (llama.cpp
# CPU threads, all cores), TESSERA (the binary), OUT (a folder for the raw JSON, default
# target/bench-compare; with ROUNDS above 1, a folder per round in it).
#
# On a shared or virtual machine the speed of the whole machine drifts by 20% or more within
# minutes (seen on lavapipe, 2026-12-05: three runs of this script in 25 minutes gave
# tg128 ratios of 10.8x, 10.0x and 7.9x, Tessera and llama.cpp moving in opposite
# directions). ROUNDS=3 R=1 runs the programs in turn three times, so that each round's
# ratio compares runs minutes apart, and prints every round's ratios with their median.
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
rounds="${ROUNDS:-1}"
if ! [[ "$rounds" =~ ^[1-9][0-9]{0,2}$ ]]; then
    echo "ROUNDS=$rounds: give a whole number of rounds from 1 to 999" >&2
    exit 1
fi
# A llama-bench that cannot run is named now, not after Tessera's minutes of benchmarking.
for var in LLAMA_BENCH_CPU LLAMA_BENCH_VK; do
    path="${!var:-}"
    if [ -n "$path" ] && ! { [ -f "$path" ] && [ -x "$path" ]; }; then
        echo "$var=$path is not an executable file: give the path of a llama-bench build" \
            "(see this script's header) or leave $var unset" >&2
        exit 1
    fi
done
out="${OUT:-$here/target/bench-compare}"
if [ ! -x "$tessera" ]; then
    echo "no tessera binary at $tessera: build it (cargo build --release) or set TESSERA" >&2
    exit 1
fi
model="${1:-$("$tessera" fetch)}"
# Stops the script where llama-bench ($1) failed, with the end of its log ($2).
llama_failed() {
    echo "llama-bench $1 failed (its log: $2):" >&2
    tail -n 5 "$2" >&2
    exit 1
}

# Runs llama-bench $3 (with the arguments after it) into folder $1 as llama-$2.json, kept only
# when it succeeded, and its log llama-$2.log.
run_llama() {
    local dir="$1" name="$2" bin="$3"
    shift 3
    "$bin" -m "$model" -p "$p" -n "$n" -r "$r" -o json "$@" \
        > "$dir/llama-$name.json.part" 2> "$dir/llama-$name.log" \
        || llama_failed "$bin" "$dir/llama-$name.log"
    mv "$dir/llama-$name.json.part" "$dir/llama-$name.json"
}

# One comparison into folder $1: each program's JSON there, then the table and the ratios.
compare_once() {
    local out="$1"
    mkdir -p "$out"
    # Only this run's results are compared.
    rm -f "$out/tessera.json" "$out/llama-cpu.json" "$out/llama-vulkan.json"
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

    # Each program's JSON is kept only when the program succeeded (written to .part, then
    # renamed), so that a failed run leaves no result that looks like one.
    echo "== tessera bench (every device) on $model" >&2
    "$tessera" bench -m "$model" -p "$p" -n "$n" -r "$r" --device all -o json \
        > "$out/tessera.json.part"
    mv "$out/tessera.json.part" "$out/tessera.json"

    if [ -n "${LLAMA_BENCH_CPU:-}" ]; then
        echo "== llama.cpp CPU ($threads threads)" >&2
        run_llama "$out" cpu "$LLAMA_BENCH_CPU" -t "$threads"
    fi
    if [ -n "${LLAMA_BENCH_VK:-}" ]; then
        echo "== llama.cpp Vulkan (device 0)" >&2
        GGML_VK_VISIBLE_DEVICES=0 run_llama "$out" vulkan "$LLAMA_BENCH_VK" -ngl 99
    fi
    python3 - "$out" <<'EOF'
import json, os, sys

out = sys.argv[1]

FIELDS = ("n_prompt", "n_gen", "avg_ts", "stddev_ts")

def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError("not a list of records")
        for rec in records:
            missing = [k for k in FIELDS if k not in rec]
            if missing:
                raise ValueError(f"a record without {', '.join(missing)}")
    except (ValueError, TypeError) as e:
        log = path.replace(".json", ".log")
        hint = f" (its log: {log})" if os.path.exists(log) else ""
        sys.exit(f"{path} is not llama-bench's JSON: {e}{hint}")
    return records

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
                ratios.append((f"{t}: {ours} / {theirs}", ratio))
if ratios:
    print()
    print("Ratios (Tessera / llama.cpp, tokens/s):")
    print("\n".join(f"  {name} = {ratio:.2f}x" for name, ratio in ratios))
with open(os.path.join(out, "ratios.json"), "w") as f:
    json.dump(ratios, f)
EOF
}

if [ "$rounds" -le 1 ]; then
    compare_once "$out"
    exit 0
fi
for i in $(seq 1 "$rounds"); do
    echo "== round $i of $rounds ($(date -u +%H:%M:%S) UTC)" >&2
    compare_once "$out/round$i"
    echo
done
python3 - "$out" "$rounds" <<'EOF'
import json, os, statistics, sys

out, rounds = sys.argv[1], int(sys.argv[2])
by_name = {}
for i in range(1, rounds + 1):
    with open(os.path.join(out, f"round{i}", "ratios.json")) as f:
        for name, ratio in json.load(f):
            by_name.setdefault(name, []).append(ratio)
print(f"Ratios over {rounds} rounds (each round's, then their median):")
for name, values in by_name.items():
    each = ", ".join(f"{v:.2f}x" for v in values)
    print(f"  {name}: {each}; median {statistics.median(values):.2f}x")
EOF
