#!/usr/bin/env bash
# Builds kubetx as one statically linked release binary (glibc, `crt-static`), the binary the
# container image ships. The Dockerfile runs this script; so can a developer or CI:
#
#   scripts/build-static.sh [OUTPUT]     # default output: target/static/kubetx
#
# The build uses the host's own Rust target (x86_64- or aarch64-unknown-linux-gnu), so it needs
# no extra rustup target and no musl toolchain. Naming the target explicitly keeps the static
# flag off build scripts and proc macros, which must stay dynamic. Set CARGO_TARGET_DIR to
# build elsewhere (default: target/static, apart from the debug build's directory so that the
# two do not wait on each other's lock).
set -euo pipefail
cd "$(dirname "$0")/.."

output="${1:-target/static/kubetx}"
target="$(uname -m)-unknown-linux-gnu"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/static}"
# crt-static: link glibc statically. getrandom's default Linux backend finds getrandom(2) with
# dlsym, which a static binary lacks, and would fall back to reading /dev/urandom; call it
# directly instead. Strip symbols: a quarter of the size.
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\""
export CARGO_PROFILE_RELEASE_STRIP="${CARGO_PROFILE_RELEASE_STRIP:-symbols}"

cargo build --release --locked --target "$target" --bin kubetx
built="$CARGO_TARGET_DIR/$target/release/kubetx"

# A static executable has no program interpreter (no PT_INTERP / "Requesting program interpreter").
if command -v readelf >/dev/null && readelf --program-headers "$built" | grep -q INTERP; then
    echo "error: $built is dynamically linked" >&2
    exit 1
fi

mkdir -p "$(dirname "$output")"
if [ "$built" != "$output" ]; then
    cp "$built" "$output"
fi
echo "$output"
