#!/usr/bin/env bash
# Starts wine's server and services for scripts/win/env.sh's prefix (creating the prefix on
# first use), detached from the caller's standard output and error.
#
# Why: the first wine program of a session starts wineserver, and wineserver starts services
# (services.exe, winedevice.exe, explorer.exe, …) that outlive the program. Started from a test
# that captures the program's output through pipes, they inherit those pipes and hold them open,
# so a reader waiting for end-of-file never gets it and the test hangs. Started here first,
# with their output sent to a log file, they hold nothing of the tests. `wineserver -p` keeps
# the server (and so the services) up between programs; scripts/win/test.sh stops it at the end
# with `wineserver -k`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
mkdir -p "$WINEPREFIX"
log="$VOLBACK_WIN_TARGET_DIR/wine-start.log"
# Fails when a server already runs for this prefix: then that one is used.
wineserver -p </dev/null >>"$log" 2>&1 || true
wine wineboot --init </dev/null >>"$log" 2>&1
