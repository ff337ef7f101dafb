#!/usr/bin/env bash
# Type-checks the Windows mount (the WinFsp adapter in mount/src/winfsp.rs, with the parts of
# brickbox-core and brickbox-platform it needs) for x86_64-pc-windows-msvc, with clippy.
# Nothing is linked or run: this machine has no WinFsp and no MSVC.
#
# The C code of dependencies (ring, zstd, SQLite) is still compiled by their build scripts, so
# it needs clang, llvm-ar and the MinGW-w64 headers (apt: clang llvm mingw-w64-x86-64-dev); the
# objects are never linked, so their ABI does not matter. winfsp_wrs ships pre-generated
# bindings: no libclang/bindgen is needed.
#
# Skips with a message (exit 0) when the Rust target or the tools cannot be had (offline, not
# root, no apt). Cold: ~3-8 min on 2 shared cores (check builds of ~300 crates + the C code);
# warm: a few seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-pc-windows-msvc
skip() {
    echo "check-windows: SKIPPED: $*"
    exit 0
}
start=$(date +%s)

# 1. The Rust target.
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    command -v rustup >/dev/null 2>&1 || skip "rustup is not installed, so the $TARGET target cannot be added"
    rustup target add "$TARGET" >/dev/null 2>&1 || skip "cannot add the Rust target $TARGET (offline?)"
fi

# 2. A C compiler, archiver and headers for the build scripts of C dependencies.
if ! command -v clang >/dev/null 2>&1 || ! command -v llvm-ar >/dev/null 2>&1 ||
    [[ ! -d /usr/share/mingw-w64/include ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq clang llvm mingw-w64-x86-64-dev; } >/dev/null 2>&1 ||
            skip "cannot install clang, llvm and mingw-w64-x86-64-dev with apt"
    else
        skip "clang, llvm-ar and the MinGW-w64 headers are needed (apt-get install clang llvm mingw-w64-x86-64-dev)"
    fi
fi

target_env=${TARGET//-/_}
export "CC_${target_env}=clang"
export "AR_${target_env}=llvm-ar"
export "CFLAGS_${target_env}=--target=x86_64-w64-mingw32 -I/usr/share/mingw-w64/include"

echo "check-windows: cargo clippy --target $TARGET -p brickbox-mount"
if cargo clippy --target "$TARGET" -p brickbox-mount -- -D warnings; then
    echo "check-windows: OK in $(($(date +%s) - start)) s"
else
    echo "check-windows: FAILED after $(($(date +%s) - start)) s"
    exit 1
fi
