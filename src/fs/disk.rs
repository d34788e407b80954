//! What a snapshot records about a whole volume: its partition layout ([`DiskLayout`]) and
//! its allocation map ([`VolumeMap`]). They are built by `probe::disk` (the layer above `fs`), which reads
//! the partition table and composes the partitions' maps as described there.

use super::{BlockMap, FsInfo};
use serde::{Deserialize, Serialize};

/// The partition layout of a disk, as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// "dos" or "gpt".
    pub table: String,
    /// Disk identifier: `0x1234abcd` (MBR signature) or the GPT disk GUID.
    pub id: String,
    /// Sector size the table is expressed in.
    pub sector_size: u32,
    pub partitions: Vec<PartitionLayout>,
}

/// One partition of a [`DiskLayout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLayout {
    /// 1-based number as the kernel and `sfdisk` give it.
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// MBR type byte (hex) or GPT type GUID, as `sfdisk` prints them.
    #[serde(rename = "type")]
    pub type_id: String,
    /// "primary", "extended" or "logical" (MBR only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT unique GUID, or the MBR PARTUUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The filesystem found in the partition, when its allocation map could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsInfo>,
    /// True when every block of the partition was kept (no usable map).
    #[serde(default)]
    pub all_blocks: bool,
}

/// What a backup needs to know about a volume before reading it.
#[derive(Debug, Clone)]
pub struct VolumeMap {
    /// The filesystem spanning the whole volume (no partition table).
    pub fs: Option<FsInfo>,
    /// The partition layout (partitioned disks).
    pub layout: Option<DiskLayout>,
    /// `None`: every block must be read.
    pub map: Option<BlockMap>,
    /// Why parts of the volume are read whole although a filesystem or table was recognised.
    pub warnings: Vec<String>,
}
