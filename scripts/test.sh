#!/usr/bin/env bash
# The whole test suite, as README and .ci/run run it: the Linux build's tests
# (`cargo test --release`: unit, integration, documentation tests), then the Windows part
# (scripts/win/test.sh: the Windows build, its unit tests under wine, and volback.exe driven
# end to end under wine by tests/it/windows.rs, across systems in both directions).
# The Windows part needs scripts/win/setup.sh to have run once (as root). Arguments go to the
# Linux `cargo test` (before its `--`), e.g. `--test it`.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
echo "==> Linux build ($(date -u +%H:%M:%S))"
cargo test --release --no-run "$@"
# The S3 tests run against a Garage server they start: a garage 2.5.0 binary is found, or
# built once per machine (scripts/garage.sh install; .ci/run starts that build early).
echo "==> Garage ($(date -u +%H:%M:%S))"
GARAGE=$(scripts/garage.sh install)
export GARAGE
echo "==> Linux tests ($(date -u +%H:%M:%S))"
# windows:: tests drive volback.exe: they run in the Windows part, once it is built.
cargo test --release "$@" -- --skip windows::
echo "Linux tests: ${SECONDS} s"
scripts/win/test.sh
echo "All tests: ${SECONDS} s"
