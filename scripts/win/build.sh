#!/usr/bin/env bash
# Builds volback.exe and the library's unit-test executable for Windows (x86_64-pc-windows-gnu)
# with the `wintest` profile (Cargo.toml); the dependencies and std are built once for both.
# Extra arguments go to both cargo runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
cd "$here/../.."
"${VOLBACK_WIN_CARGO[@]}" build --bin volback "${VOLBACK_WIN_FLAGS[@]}" "$@"
"${VOLBACK_WIN_CARGO[@]}" test --no-run --lib "${VOLBACK_WIN_FLAGS[@]}" "$@"
ls -l "$VOLBACK_WIN_EXE"
