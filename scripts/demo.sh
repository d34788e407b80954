#!/usr/bin/env bash
# Builds volback, makes a small ext4 image, backs it up twice (full, then incremental) into an
# encrypted local-directory repository (password in WORKDIR/password, VOLBACK_PASSWORD_FILE), restores the latest snapshot, checks it with e2fsck, verifies
# the repository and applies a retention policy (forget --keep-last 3 --prune).
# Needs cargo and e2fsprogs (mkfs.ext4 -d populates the image without mounting it).
# Usage: scripts/demo.sh [WORKDIR]   (default /tmp/volback-demo; reruns add snapshots)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/volback-demo}
mkdir -p "$work/files"
cargo build --release --quiet
volback=target/release/volback

# A volume with some real files: the image is rebuilt each run, so the second backup below is
# an incremental one of a changed volume.
cp -r src docs README.md "$work/files/" 2>/dev/null || true
date > "$work/files/last-run.txt"
# The file the second backup sees changed is added after mkfs (debugfs refuses to overwrite).
rm -f "$work/files/changed.bin" "$work/disk.img"
truncate -s 64M "$work/disk.img"
mkfs.ext4 -q -F -L demo -U 6f6c6276-6261-636b-2d64-656d6f000001 -E root_owner=0:0 \
    -d "$work/files" "$work/disk.img"

# The repository is encrypted; every command reads the password from this file.
[ -f "$work/password" ] || { umask 077; head -c 18 /dev/urandom | base64 > "$work/password"; }
export VOLBACK_PASSWORD_FILE="$work/password"
[ -f "$work/repo/config" ] || "$volback" init "$work/repo"
"$volback" backup "$work/disk.img" "$work/repo"
echo "# change one file and back up again"
head -c 100000 /dev/urandom > "$work/files/changed.bin"
debugfs -w -R "write $work/files/changed.bin changed.bin" "$work/disk.img" >/dev/null 2>&1
"$volback" backup "$work/disk.img" "$work/repo"
"$volback" snapshots "$work/repo"
"$volback" restore "$work/repo" latest "$work/restored.img"
e2fsck -fn "$work/restored.img"
"$volback" verify "$work/repo" --read-data
echo "# keep the 3 newest snapshots (reruns add one each), delete what nothing needs any more"
"$volback" forget "$work/repo" --keep-last 3 --prune
echo "demo done: repository in $work/repo"
