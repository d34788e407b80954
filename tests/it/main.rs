//! Integration tests: the real `volback` binary against real files, loop devices, ext4, NTFS,
//! FAT and exFAT filesystems made by their mkfs, and repositories damaged on purpose.
//!
//! One test binary (`cargo test --test it`); every test gets its own temporary directory from
//! [`util::TestDir`]. Tests that need root and loop devices call
//! [`util::require_root_and_loop`]: they skip on a machine without them, and fail when `CI` is
//! set.
//!
//! They drive Linux tools (losetup, mkfs, mount, sfdisk, blkid), so they build on Unix only;
//! a Windows build runs the library's unit tests, and `windows` drives the Windows build's
//! `volback.exe` under wine from here.
#![cfg(unix)]

mod backends;
mod chunk_repair;
mod cli;
mod copy;
mod corruption;
mod crash;
mod disk;
mod encryption;
mod ext4;
mod ext_damage;
mod fs_maps_win;
mod garage;
mod images;
mod mount;
mod nbd;
mod ntfs_fat_damage;
mod old_formats;
mod packs;
mod probe;
mod prune;
mod repo_safety;
mod resume_changed;
mod roundtrip;
mod s3;
mod s3_faults;
mod util;
mod windows;
mod xfs_btrfs;
mod xfs_btrfs_damage;
