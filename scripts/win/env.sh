# The environment of the Windows build and of its runs under wine. Source it (bash):
#   . scripts/win/env.sh
# Every variable can be set beforehand to override the default shown.
#
# VOLBACK_WIN_TARGET_DIR  cargo's target directory for Windows builds (kept apart from the
#                         Linux one: -Zbuild-std rebuilds std for the target there)
# VOLBACK_WIN_PROFILE     the cargo profile of the Windows build (Cargo.toml, `wintest`)
# VOLBACK_WIN_EXE         the volback.exe that tests/it/windows.rs drives under wine
# WINEPREFIX              a wine prefix of the project's own, created on first use
_volback_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export VOLBACK_WIN_TRIPLE=x86_64-pc-windows-gnu
export VOLBACK_WIN_TARGET_DIR="${VOLBACK_WIN_TARGET_DIR:-$_volback_root/target/windows}"
export VOLBACK_WIN_PROFILE="${VOLBACK_WIN_PROFILE:-wintest}"
export VOLBACK_WIN_EXE="${VOLBACK_WIN_EXE:-$VOLBACK_WIN_TARGET_DIR/$VOLBACK_WIN_TRIPLE/$VOLBACK_WIN_PROFILE/volback.exe}"
# The shim DLL built by setup.sh (bcryptprimitives.c), found by wine's loader through WINEPATH.
export VOLBACK_WIN_SHIM_DIR="${VOLBACK_WIN_SHIM_DIR:-$VOLBACK_WIN_TARGET_DIR/shim}"
# Debian's rustc (rustup cannot fetch the Windows std here) with its std sources: stable cargo
# accepts -Zbuild-std only with RUSTC_BOOTSTRAP, which is set for the Windows cargo runs only
# (`"${VOLBACK_WIN_CARGO[@]}" build …`): in the environment it would change the fingerprints of
# the Linux build, which cargo would then rebuild from scratch.
export VOLBACK_WIN_TOOLCHAIN="${VOLBACK_WIN_TOOLCHAIN:-+debian}"
VOLBACK_WIN_CARGO=(env RUSTC_BOOTSTRAP=1 cargo "$VOLBACK_WIN_TOOLCHAIN")
VOLBACK_WIN_FLAGS=(-Zbuild-std=std,panic_abort --target "$VOLBACK_WIN_TRIPLE"
    --target-dir "$VOLBACK_WIN_TARGET_DIR" --profile "$VOLBACK_WIN_PROFILE")
# Object storage (cargo feature s3: opendal, tokio, reqwest, rustls) is left out of the Windows
# build unless VOLBACK_WIN_S3=1: it is neither tested under wine nor needed by the Windows tests,
# and building it would add minutes to CI (docs/WINDOWS.md).
if [[ ${VOLBACK_WIN_S3:-0} != 1 ]]; then
    VOLBACK_WIN_FLAGS+=(--no-default-features)
fi
export WINEPREFIX="${WINEPREFIX:-$VOLBACK_WIN_TARGET_DIR/wineprefix}"
# Quiet, but a DLL that does not load is still reported.
export WINEDEBUG="${WINEDEBUG:--all,err+module}"
# Wine maps the Unix root to drive Z:.
export WINEPATH="Z:${VOLBACK_WIN_SHIM_DIR//\//\\}"
# `cargo test` runs the Windows test executables through wine.
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
unset _volback_root
