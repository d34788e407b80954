#!/usr/bin/env bash
# The Windows part of scripts/test.sh: builds the Windows executables (build.sh), runs the
# library's unit tests under wine, then the integration tests that drive volback.exe under wine
# (tests/it/windows.rs, a Linux test binary: cargo test --release --test it windows::). Extra
# arguments go to the cargo test of the unit tests (a test-name filter, --nocapture …).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
cd "$here/../.."
"$here/setup-check.sh"
step() { printf '==> %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
step "Windows build"
SECONDS=0
"$here/build.sh"
echo "Windows build: ${SECONDS} s"
"$here/wine-start.sh"
trap 'wineserver -k 2>/dev/null || true' EXIT
step "Windows unit tests under wine"
SECONDS=0
"${VOLBACK_WIN_CARGO[@]}" test --lib "${VOLBACK_WIN_FLAGS[@]}" -- "$@"
echo "Windows unit tests: ${SECONDS} s"
step "volback.exe end to end under wine (tests/it/windows.rs)"
SECONDS=0
cargo test --release --test it windows::
echo "Windows integration tests: ${SECONDS} s"
