#!/usr/bin/env bash
# Fails with a clear message when something setup.sh installs is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
problems=()
for tool in wine wineserver x86_64-w64-mingw32-gcc rustup; do
    command -v "$tool" >/dev/null || problems+=("$tool is not installed")
done
rustup toolchain list 2>/dev/null | grep -q '^debian' || problems+=("no rustup toolchain 'debian'")
[[ -f $VOLBACK_WIN_SHIM_DIR/bcryptprimitives.dll ]] || problems+=("no $VOLBACK_WIN_SHIM_DIR/bcryptprimitives.dll")
if ((${#problems[@]})); then
    printf 'scripts/win: %s\n' "${problems[@]}" >&2
    echo "run scripts/win/setup.sh (as root) first" >&2
    exit 1
fi
