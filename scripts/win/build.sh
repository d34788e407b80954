#!/usr/bin/env bash
# Builds volback.exe and the library's unit-test executable for Windows (x86_64-pc-windows-gnu)
# with the `wintest` profile (Cargo.toml), in one cargo run so that std and the dependencies are
# built once, with one feature set (two runs, `build` then `test`, rebuilt half of them: 11 min
# instead of 6). The executable comes with the integration test target, which needs it
# (tests/it is empty on Windows). Extra arguments go to cargo.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
cd "$here/../.."
"${VOLBACK_WIN_CARGO[@]}" test --no-run --lib --test it "${VOLBACK_WIN_FLAGS[@]}" "$@"
ls -l "$VOLBACK_WIN_EXE"
