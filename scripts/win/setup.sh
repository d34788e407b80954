#!/usr/bin/env bash
# Installs what the Windows build and its wine runs need, once (idempotent: what is there is
# reused). Run as root on Debian 12 (bookworm):
#   - rustc-web, cargo-web, rust-web-src: Debian's Rust toolchain with the std sources, linked
#     into rustup as the `debian` toolchain (rustup cannot download the Windows std here, so
#     std is built from those sources with -Zbuild-std);
#   - gcc-mingw-w64-x86-64: the linker (and the C compiler of zstd);
#   - wine, wine64: runs the tests and volback.exe;
#   - the bcryptprimitives.dll shim that wine 8 lacks (scripts/win/bcryptprimitives.c);
#   - a booted wine prefix (scripts/win/env.sh's WINEPREFIX).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
export DEBIAN_FRONTEND=noninteractive
packages=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine wine64)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup toolchain list | grep -q '^debian' || rustup toolchain link debian /usr
mkdir -p "$VOLBACK_WIN_SHIM_DIR"
dll="$VOLBACK_WIN_SHIM_DIR/bcryptprimitives.dll"
if [[ ! -f $dll || $here/bcryptprimitives.c -nt $dll ]]; then
    x86_64-w64-mingw32-gcc -O2 -shared -s -o "$dll" "$here/bcryptprimitives.c" -ladvapi32
fi
"$here/wine-start.sh"
