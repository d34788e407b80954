//! A format-2 snapshot's block map: a tree of blobs (docs/FORMAT.md §F2.5).
//!
//! Leaves cover [`LEAF_BLOCKS`] blocks each and hold block-reference records (ZERO, UNUSED,
//! PART); interior nodes list up to [`FANOUT`] children. The geometry depends only on the
//! block count, so two snapshots of one volume cut their leaves at the same blocks, and an
//! unchanged stretch of the volume gives the same leaf bytes, hence the same blob: an
//! incremental backup stores only the leaves (and interior nodes) that changed.
//!
//! Every node is checked against the place it is found at (level, number of blocks, number
//! of children) before anything is allocated from its counts, so a damaged or hostile node is
//! an error, never a panic or an unbounded allocation.

use super::blob::{BlobKind, BlobSink, BlobSource};
use super::format::{
    BlockRef, MAX_TREE_HEIGHT, NODE_HEADER_LEN, NODE_MAGIC, NODE_VERSION, REC_PART_LEN,
    decode_records, encode_run, le_u32, le_u64,
};
pub use super::format::{FANOUT, LEAF_BLOCKS};
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The root of a snapshot's tree: its node id and its height (0: the root is a leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRoot {
    pub root: ChunkId,
    pub height: u32,
}

/// `{"root": "<64 hex digits>", "height": h}` in a snapshot header.
#[derive(Serialize, Deserialize)]
struct TreeRootJson {
    root: String,
    height: u32,
}

impl Serialize for TreeRoot {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        TreeRootJson {
            root: self.root.to_hex(),
            height: self.height,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for TreeRoot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let j = TreeRootJson::deserialize(d)?;
        let root = ChunkId::from_hex(&j.root)
            .ok_or_else(|| serde::de::Error::custom("tree root is not 64 hex digits"))?;
        Ok(TreeRoot {
            root,
            height: j.height,
        })
    }
}

/// Blocks covered by a node of level `level` (saturating: high levels cover "everything").
pub fn node_span(level: u32) -> u64 {
    LEAF_BLOCKS.saturating_mul(FANOUT.saturating_pow(level))
}

/// The height of the tree of a volume of `block_count` blocks: the smallest `h` with
/// `LEAF_BLOCKS · FANOUT^h ≥ block_count`.
pub fn tree_height(block_count: u64) -> u32 {
    let mut h = 0;
    while node_span(h) < block_count && h < MAX_TREE_HEIGHT {
        h += 1;
    }
    h
}

/// Children of an interior node of `level` covering `blocks` blocks.
fn child_count(level: u32, blocks: u64) -> u64 {
    blocks.div_ceil(node_span(level - 1))
}

/// Blocks covered by child `k` of a node of `level` covering `blocks` blocks.
fn child_blocks(level: u32, blocks: u64, k: u64) -> u64 {
    let span = node_span(level - 1);
    (blocks - k * span).min(span)
}

// ---------------------------------------------------------------------------------------
// Node encoding

fn node_header(level: u32, blocks: u64, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(NODE_HEADER_LEN + capacity);
    out.extend_from_slice(&NODE_MAGIC);
    out.push(NODE_VERSION);
    out.push(level as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&blocks.to_le_bytes());
    out
}

/// One run of a decoded leaf: blocks `start .. start + n` of the leaf (a PART run: pieces
/// `index .. index + n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    r: BlockRef,
    n: u64,
}

/// A decoded, checked node.
#[derive(Debug)]
enum Node {
    /// Runs in block order, covering exactly the leaf's blocks.
    Leaf(Vec<Run>),
    /// Children ids in block order.
    Interior(Vec<ChunkId>),
}

/// Why a node was rejected.
enum BadNode {
    Version(u8),
    Corrupt(String),
}

impl From<String> for BadNode {
    fn from(s: String) -> Self {
        BadNode::Corrupt(s)
    }
}

/// Decodes a node found where a node of `level` covering `blocks` blocks belongs.
fn decode_node(bytes: &[u8], level: u32, blocks: u64) -> std::result::Result<Node, BadNode> {
    if bytes.len() < NODE_HEADER_LEN {
        return Err(format!("{} bytes, too short for a tree node", bytes.len()).into());
    }
    if bytes[..4] != NODE_MAGIC {
        return Err("bad magic (not a tree node)".to_string().into());
    }
    if bytes[4] != NODE_VERSION {
        return Err(BadNode::Version(bytes[4]));
    }
    if u32::from(bytes[5]) != level {
        return Err(format!("node of level {} where level {level} belongs", bytes[5]).into());
    }
    if bytes[6..8] != [0, 0] {
        return Err("reserved bytes are not zero".to_string().into());
    }
    let got = le_u64(bytes, 8);
    if got != blocks {
        return Err(format!("node covers {got} blocks where {blocks} belong").into());
    }
    let body = &bytes[NODE_HEADER_LEN..];
    if level == 0 {
        // Each record covers at least one block: bounds the work before decoding.
        if body.len() as u64 > blocks.saturating_mul(REC_PART_LEN as u64) {
            return Err(format!("{} bytes of records for {blocks} blocks", body.len()).into());
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut start = 0u64;
        let mut foreign = None;
        decode_records(body, blocks, |r, n| {
            match r {
                BlockRef::Zero | BlockRef::Unused | BlockRef::Part { .. } => {}
                BlockRef::Chunk(_) | BlockRef::Slice { .. } => {
                    foreign.get_or_insert(r);
                }
            }
            runs.push(Run { start, r, n });
            start += n;
        })
        .map_err(|e| BadNode::Corrupt(e.to_string()))?;
        if let Some(r) = foreign {
            return Err(format!("format 1 record in a leaf: {r:?}").into());
        }
        return Ok(Node::Leaf(runs));
    }
    let want = child_count(level, blocks);
    if want == 0 || want > FANOUT {
        return Err(format!("an interior node cannot cover {blocks} blocks").into());
    }
    if body.len() < 4 {
        return Err("interior node without a child count".to_string().into());
    }
    let c = le_u32(body, 0) as u64;
    if c != want {
        return Err(format!("{c} children where {want} belong").into());
    }
    let ids = &body[4..];
    if ids.len() as u64 != c * 32 {
        return Err(format!("{} bytes of child ids for {c} children", ids.len()).into());
    }
    let children = ids
        .chunks_exact(32)
        .map(|b| {
            let mut id = [0u8; 32];
            id.copy_from_slice(b);
            ChunkId(id)
        })
        .collect();
    Ok(Node::Interior(children))
}

/// Where a node's errors point: the snapshot the tree belongs to, when known.
#[derive(Debug, Clone)]
struct Context {
    what: String,
    path: PathBuf,
}

impl Context {
    fn error(&self, id: &ChunkId, bad: BadNode) -> Error {
        match bad {
            BadNode::Version(v) => Error::UnsupportedVersion {
                what: "tree node",
                path: self.path.clone(),
                found: u32::from(v),
                supported: u32::from(NODE_VERSION),
            },
            BadNode::Corrupt(detail) => Error::corrupt(
                format!("tree node {id} of {}", self.what),
                &self.path,
                detail,
            ),
        }
    }
}

fn load_node(
    src: &dyn BlobSource,
    ctx: &Context,
    id: &ChunkId,
    level: u32,
    blocks: u64,
) -> Result<Node> {
    let bytes = src.blob(id, BlobKind::Tree)?;
    decode_node(&bytes, level, blocks).map_err(|b| ctx.error(id, b))
}

// ---------------------------------------------------------------------------------------
// Writer

/// Children collected for the next node of one level.
#[derive(Default)]
struct Level {
    ids: Vec<ChunkId>,
    blocks: u64,
}

/// Builds a snapshot's tree from its block references, in block order, storing each node as
/// a tree blob as soon as it is complete (memory: one leaf and one child list per level).
pub struct TreeWriter<'a> {
    sink: &'a dyn BlobSink,
    block_count: u64,
    height: u32,
    /// Blocks pushed so far.
    pushed: u64,
    /// Encoded records of the current leaf.
    leaf: Vec<u8>,
    leaf_blocks: u64,
    /// The run not yet encoded (it may continue with the next push).
    run: Option<(BlockRef, u64)>,
    /// `levels[l]`: children (of level `l`) of the level `l + 1` node being built.
    levels: Vec<Level>,
    root: Option<ChunkId>,
}

impl<'a> TreeWriter<'a> {
    /// A writer for a volume of `block_count` blocks.
    pub fn new(sink: &'a dyn BlobSink, block_count: u64) -> Self {
        let height = tree_height(block_count);
        TreeWriter {
            sink,
            block_count,
            height,
            pushed: 0,
            leaf: Vec::new(),
            leaf_blocks: 0,
            run: None,
            levels: (0..height).map(|_| Level::default()).collect(),
            root: None,
        }
    }

    /// Blocks pushed so far.
    pub fn blocks(&self) -> u64 {
        self.pushed
    }

    /// Appends a run of `count` blocks starting with `r` (a PART ref: pieces `index ..
    /// index + count`). Only ZERO, UNUSED and PART references belong in a tree.
    pub fn push(&mut self, r: BlockRef, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        match r {
            BlockRef::Zero | BlockRef::Unused => {}
            BlockRef::Part { index, .. } => {
                if u64::from(index) + count > u64::from(u32::MAX) {
                    return Err(Error::internal(
                        "tree writer",
                        format!("pieces {index} + {count} do not fit 32 bits"),
                    ));
                }
            }
            BlockRef::Chunk(_) | BlockRef::Slice { .. } => {
                return Err(Error::internal(
                    "tree writer",
                    format!("{r:?} is a format 1 reference"),
                ));
            }
        }
        if self.block_count - self.pushed < count {
            return Err(Error::internal(
                "tree writer",
                format!(
                    "{count} more blocks after {} of {}",
                    self.pushed, self.block_count
                ),
            ));
        }
        let mut r = r;
        let mut count = count;
        while count > 0 {
            let take = count.min(LEAF_BLOCKS - self.leaf_blocks);
            self.run = match self.run {
                Some((pr, pn)) if pr.continues(pn, &r) => Some((pr, pn + take)),
                Some((pr, pn)) => {
                    encode_run(&mut self.leaf, pr, pn);
                    Some((r, take))
                }
                None => Some((r, take)),
            };
            self.leaf_blocks += take;
            self.pushed += take;
            r = r.advance(take);
            count -= take;
            if self.leaf_blocks == LEAF_BLOCKS {
                self.flush_leaf()?;
            }
        }
        Ok(())
    }

    fn flush_leaf(&mut self) -> Result<()> {
        if let Some((r, n)) = self.run.take() {
            encode_run(&mut self.leaf, r, n);
        }
        let mut node = node_header(0, self.leaf_blocks, self.leaf.len());
        node.extend_from_slice(&self.leaf);
        let id = self.sink.put_blob(BlobKind::Tree, &node)?;
        let blocks = self.leaf_blocks;
        self.leaf.clear();
        self.leaf_blocks = 0;
        if self.height == 0 {
            self.root = Some(id);
            Ok(())
        } else {
            self.add_child(0, id, blocks)
        }
    }

    /// Adds a finished node of level `level` to its parent's list; a full list below the
    /// root's becomes a node at once.
    fn add_child(&mut self, level: u32, id: ChunkId, blocks: u64) -> Result<()> {
        let l = &mut self.levels[level as usize];
        l.ids.push(id);
        l.blocks += blocks;
        if l.ids.len() as u64 == FANOUT && level + 1 < self.height {
            let (id, blocks) = self.emit_interior(level)?;
            self.add_child(level + 1, id, blocks)?;
        }
        Ok(())
    }

    /// Stores the node of level `level + 1` whose children are `levels[level]`.
    fn emit_interior(&mut self, level: u32) -> Result<(ChunkId, u64)> {
        let l = std::mem::take(&mut self.levels[level as usize]);
        let mut node = node_header(level + 1, l.blocks, 4 + 32 * l.ids.len());
        node.extend_from_slice(&(l.ids.len() as u32).to_le_bytes());
        for id in &l.ids {
            node.extend_from_slice(&id.0);
        }
        let id = self.sink.put_blob(BlobKind::Tree, &node)?;
        Ok((id, l.blocks))
    }

    /// Stores the last nodes and returns the root. Every block must have been pushed.
    pub fn finish(mut self) -> Result<TreeRoot> {
        if self.pushed != self.block_count {
            return Err(Error::internal(
                "tree writer",
                format!(
                    "{} blocks were pushed, the volume has {}",
                    self.pushed, self.block_count
                ),
            ));
        }
        if self.leaf_blocks > 0 || (self.height == 0 && self.root.is_none()) {
            self.flush_leaf()?;
        }
        for level in 0..self.height {
            if self.levels[level as usize].ids.is_empty() {
                continue;
            }
            let (id, blocks) = self.emit_interior(level)?;
            if level + 1 == self.height {
                self.root = Some(id);
            } else {
                self.add_child(level + 1, id, blocks)?;
            }
        }
        let root = self
            .root
            .ok_or_else(|| Error::internal("tree writer", "no root node"))?;
        Ok(TreeRoot {
            root,
            height: self.height,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Reader

/// Decoded nodes a reader keeps: the path from the root plus a few leaves (a leaf is at most
/// about 1 MiB decoded).
const CACHED_NODES: usize = 16;

/// A decoded leaf and the blocks it covers.
#[derive(Debug, Clone)]
pub struct LeafRef {
    /// First block of the leaf in the volume.
    start: u64,
    blocks: u64,
    node: Arc<Node>,
}

impl LeafRef {
    /// The blocks this leaf covers.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.start..self.start + self.blocks
    }

    fn runs(&self) -> &[Run] {
        match &*self.node {
            Node::Leaf(runs) => runs,
            Node::Interior(_) => &[],
        }
    }

    /// The run index holding block `rel` of the leaf.
    fn find(&self, rel: u64) -> usize {
        self.runs().partition_point(|run| run.start + run.n <= rel)
    }

    /// The reference of block `block` (inside [`Self::range`]); `hint` is the run index of the
    /// previous lookup, kept by sequential readers.
    fn lookup(&self, block: u64, hint: &mut usize) -> Option<BlockRef> {
        let rel = block.checked_sub(self.start)?;
        let runs = self.runs();
        let within = |i: usize| {
            runs.get(i)
                .is_some_and(|r| r.start <= rel && rel < r.start + r.n)
        };
        if !within(*hint) {
            *hint = if within(*hint + 1) {
                *hint + 1
            } else {
                self.find(rel)
            };
        }
        let run = runs.get(*hint)?;
        Some(run.r.advance(rel - run.start))
    }
}

/// Random and sequential access to a tree's block references.
pub struct TreeReader {
    src: Arc<dyn BlobSource>,
    root: TreeRoot,
    block_count: u64,
    ctx: Context,
    /// Small LRU of decoded nodes, and its clock.
    cache: Mutex<(u64, Vec<Cached>)>,
    /// The leaf of the last lookup: random readers mostly stay in one leaf for a while.
    last: Mutex<Option<LeafRef>>,
}

/// A decoded node in a reader's cache, with the geometry it was checked against.
struct Cached {
    id: ChunkId,
    level: u32,
    blocks: u64,
    node: Arc<Node>,
    used: u64,
}

impl std::fmt::Debug for TreeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeReader")
            .field("root", &self.root)
            .field("block_count", &self.block_count)
            .finish()
    }
}

impl TreeReader {
    /// A reader of the tree `root` of a volume of `block_count` blocks, reading nodes from
    /// `src`. `what` and `path` name the snapshot in errors. The height must match the block
    /// count.
    pub fn new(
        src: Arc<dyn BlobSource>,
        root: TreeRoot,
        block_count: u64,
        what: impl Into<String>,
        path: &Path,
    ) -> Result<TreeReader> {
        let ctx = Context {
            what: what.into(),
            path: path.to_path_buf(),
        };
        let want = tree_height(block_count);
        if root.height != want {
            return Err(Error::corrupt(
                ctx.what.clone(),
                &ctx.path,
                format!(
                    "tree of height {} for {block_count} blocks (height {want} expected)",
                    root.height
                ),
            ));
        }
        Ok(TreeReader {
            src,
            root,
            block_count,
            ctx,
            cache: Mutex::new((0, Vec::new())),
            last: Mutex::new(None),
        })
    }

    pub fn root(&self) -> &TreeRoot {
        &self.root
    }

    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Node `id`, found where a node of `level` covering `blocks` belongs.
    fn node(&self, id: &ChunkId, level: u32, blocks: u64) -> Result<Arc<Node>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.0 += 1;
            let now = c.0;
            if let Some(e) = c.1.iter_mut().find(|e| e.id == *id) {
                e.used = now;
                // Equal ids mean equal bytes, and the bytes name the node's level and block
                // count: a node decoded elsewhere fits here only if both agree.
                if (e.level, e.blocks) != (level, blocks) {
                    return Err(self.ctx.error(
                        id,
                        BadNode::Corrupt(format!(
                            "node of level {} covering {} blocks where level {level} and \
                             {blocks} blocks belong",
                            e.level, e.blocks
                        )),
                    ));
                }
                return Ok(e.node.clone());
            }
        }
        let node = Arc::new(load_node(&*self.src, &self.ctx, id, level, blocks)?);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.0 += 1;
        let used = c.0;
        if c.1.len() >= CACHED_NODES
            && let Some(oldest) = (0..c.1.len()).min_by_key(|&i| c.1[i].used)
        {
            c.1.swap_remove(oldest);
        }
        c.1.push(Cached {
            id: *id,
            level,
            blocks,
            node: node.clone(),
            used,
        });
        Ok(node)
    }

    /// The leaf holding block `block`.
    pub fn leaf_at(&self, block: u64) -> Result<LeafRef> {
        {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = &*last
                && l.range().contains(&block)
            {
                return Ok(l.clone());
            }
        }
        let leaf = self.descend(block)?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(leaf.clone());
        Ok(leaf)
    }

    /// Looks up the leaf holding `block` from the root.
    fn descend(&self, block: u64) -> Result<LeafRef> {
        if block >= self.block_count {
            return Err(Error::read_out_of_range(
                self.ctx.what.clone(),
                block,
                1,
                self.block_count,
            ));
        }
        let mut id = self.root.root;
        let mut level = self.root.height;
        let mut start = 0u64;
        let mut blocks = self.block_count;
        while level > 0 {
            let node = self.node(&id, level, blocks)?;
            let Node::Interior(children) = &*node else {
                return Err(self.ctx.error(
                    &id,
                    BadNode::Corrupt("leaf where an interior node belongs".into()),
                ));
            };
            let span = node_span(level - 1);
            let k = (block - start) / span;
            id = *children.get(k as usize).ok_or_else(|| {
                self.ctx
                    .error(&id, BadNode::Corrupt(format!("no child {k}")))
            })?;
            blocks = child_blocks(level, blocks, k);
            start += k * span;
            level -= 1;
        }
        let node = self.node(&id, 0, blocks)?;
        Ok(LeafRef {
            start,
            blocks,
            node,
        })
    }

    /// The reference of block `block`.
    pub fn block_ref(&self, block: u64) -> Result<BlockRef> {
        let leaf = self.leaf_at(block)?;
        leaf.lookup(block, &mut 0).ok_or_else(|| {
            Error::internal("tree reader", format!("block {block} is not in its leaf"))
        })
    }

    /// The reference of block `block` and the number of blocks from it to the end of its run
    /// (at least 1; runs end at leaf boundaries here).
    pub fn run_at(&self, block: u64) -> Result<(BlockRef, u64)> {
        let leaf = self.leaf_at(block)?;
        let rel = block - leaf.start;
        leaf.runs()
            .get(leaf.find(rel))
            .map(|run| (run.r.advance(rel - run.start), run.start + run.n - rel))
            .ok_or_else(|| {
                Error::internal("tree reader", format!("block {block} is not in its leaf"))
            })
    }

    /// Visits every block in order: `f(first_block, ref, count)` per run (equal references,
    /// or consecutive pieces of one blob), runs merged across leaves.
    pub fn for_each_run(&self, mut f: impl FnMut(u64, BlockRef, u64) -> Result<()>) -> Result<()> {
        let mut pending: Option<(u64, BlockRef, u64)> = None;
        let mut block = 0u64;
        while block < self.block_count {
            let leaf = self.leaf_at(block)?;
            for run in leaf.runs() {
                let first = leaf.start + run.start;
                pending = match pending {
                    Some((pf, pr, pn)) if pr.continues(pn, &run.r) => Some((pf, pr, pn + run.n)),
                    Some((pf, pr, pn)) => {
                        f(pf, pr, pn)?;
                        Some((first, run.r, run.n))
                    }
                    None => Some((first, run.r, run.n)),
                };
            }
            block = leaf.range().end;
        }
        if let Some((pf, pr, pn)) = pending {
            f(pf, pr, pn)?;
        }
        Ok(())
    }

    /// A cursor for reading references in increasing block order.
    pub fn cursor(self: &Arc<Self>) -> TreeCursor {
        TreeCursor {
            reader: self.clone(),
            leaf: None,
            hint: 0,
        }
    }
}

/// Reads a tree's references in increasing block order, one leaf decoded at a time (any
/// order works; going back costs a lookup from the root).
pub struct TreeCursor {
    reader: Arc<TreeReader>,
    leaf: Option<LeafRef>,
    hint: usize,
}

impl TreeCursor {
    /// The reference of block `block`; `None` past the end.
    pub fn get(&mut self, block: u64) -> Result<Option<BlockRef>> {
        if block >= self.reader.block_count {
            return Ok(None);
        }
        if !self
            .leaf
            .as_ref()
            .is_some_and(|l| l.range().contains(&block))
        {
            self.leaf = Some(self.reader.leaf_at(block)?);
            self.hint = 0;
        }
        Ok(self
            .leaf
            .as_ref()
            .and_then(|l| l.lookup(block, &mut self.hint)))
    }
}

/// Visits a tree for prune's mark: every node id (kind [`BlobKind::Tree`]) and every data
/// blob its leaves name (kind [`BlobKind::Data`]). `visit` returns whether to descend into a
/// tree node (false: already seen; its subtree is skipped); its answer for data blobs is
/// ignored. A data blob named by several consecutive runs of a leaf is visited once there.
pub fn walk_tree(
    src: &dyn BlobSource,
    root: &TreeRoot,
    visit: &mut dyn FnMut(&ChunkId, BlobKind) -> bool,
) -> Result<()> {
    let ctx = Context {
        what: format!("tree {}", root.root),
        path: PathBuf::from("packs"),
    };
    if root.height > MAX_TREE_HEIGHT {
        return Err(ctx.error(
            &root.root,
            BadNode::Corrupt(format!("tree height {} is too large", root.height)),
        ));
    }
    if !visit(&root.root, BlobKind::Tree) {
        return Ok(());
    }
    // The root's block count is in its own bytes: accept it when the height fits it.
    let bytes = src.blob(&root.root, BlobKind::Tree)?;
    let blocks = if bytes.len() >= NODE_HEADER_LEN {
        le_u64(&bytes, 8)
    } else {
        0
    };
    if tree_height(blocks) != root.height {
        return Err(ctx.error(
            &root.root,
            BadNode::Corrupt(format!(
                "root of height {} covers {blocks} blocks",
                root.height
            )),
        ));
    }
    let node = decode_node(&bytes, root.height, blocks).map_err(|b| ctx.error(&root.root, b))?;
    drop(bytes);
    walk_node(src, &ctx, node, root.height, blocks, visit)
}

fn walk_node(
    src: &dyn BlobSource,
    ctx: &Context,
    node: Node,
    level: u32,
    blocks: u64,
    visit: &mut dyn FnMut(&ChunkId, BlobKind) -> bool,
) -> Result<()> {
    match node {
        Node::Leaf(runs) => {
            let mut last = None;
            for run in runs {
                if let BlockRef::Part { blob, .. } = run.r
                    && last != Some(blob)
                {
                    visit(&blob, BlobKind::Data);
                    last = Some(blob);
                }
            }
        }
        Node::Interior(children) => {
            for (k, id) in children.iter().enumerate() {
                if !visit(id, BlobKind::Tree) {
                    continue;
                }
                let cb = child_blocks(level, blocks, k as u64);
                let child = load_node(src, ctx, id, level - 1, cb)?;
                walk_node(src, ctx, child, level - 1, cb, visit)?;
            }
        }
    }
    Ok(())
}

/// An in-memory blob store for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::collections::HashMap;

    type Stored = (BlobKind, Arc<Vec<u8>>);

    #[derive(Default)]
    pub struct MemBlobs {
        pub map: Mutex<HashMap<ChunkId, Stored>>,
        pub puts: std::sync::atomic::AtomicUsize,
        pub gets: std::sync::atomic::AtomicUsize,
    }

    impl MemBlobs {
        pub fn new() -> Arc<MemBlobs> {
            Arc::new(MemBlobs::default())
        }

        pub fn len(&self) -> usize {
            self.map.lock().unwrap().len()
        }

        /// Replaces the content stored under `id` (hostile-store tests).
        pub fn set_raw(&self, id: ChunkId, kind: BlobKind, content: Vec<u8>) {
            self.map
                .lock()
                .unwrap()
                .insert(id, (kind, Arc::new(content)));
        }

        pub fn get_raw(&self, id: &ChunkId) -> Vec<u8> {
            self.map.lock().unwrap()[id].1.to_vec()
        }
    }

    impl BlobSource for MemBlobs {
        fn blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Arc<Vec<u8>>> {
            self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match self.map.lock().unwrap().get(id) {
                Some((k, b)) if *k == kind => Ok(b.clone()),
                _ => Err(Error::MissingChunk {
                    id: id.to_hex(),
                    path: PathBuf::from("mem"),
                }),
            }
        }
    }

    impl BlobSink for MemBlobs {
        fn put_blob(&self, kind: BlobKind, content: &[u8]) -> Result<ChunkId> {
            self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = ChunkId(*blake3::hash(content).as_bytes());
            self.map
                .lock()
                .unwrap()
                .entry(id)
                .or_insert_with(|| (kind, Arc::new(content.to_vec())));
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::MemBlobs;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn blob(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn part(n: u8, index: u32) -> BlockRef {
        BlockRef::Part {
            blob: blob(n),
            index,
        }
    }

    /// Writes the runs into a tree and returns it with its reader.
    fn build(src: &Arc<MemBlobs>, runs: &[(BlockRef, u64)]) -> (TreeRoot, TreeReader) {
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let mut w = TreeWriter::new(&**src, total);
        for &(r, n) in runs {
            w.push(r, n).unwrap();
        }
        assert_eq!(w.blocks(), total);
        let root = w.finish().unwrap();
        let reader = TreeReader::new(src.clone(), root, total, "test", Path::new("t")).unwrap();
        (root, reader)
    }

    fn expand(runs: &[(BlockRef, u64)]) -> Vec<BlockRef> {
        runs.iter()
            .flat_map(|&(r, n)| (0..n).map(move |k| r.advance(k)))
            .collect()
    }

    /// Every run `reader` reports: (first block, reference, count).
    fn runs_of(reader: &TreeReader) -> Vec<(u64, BlockRef, u64)> {
        let mut runs = Vec::new();
        reader
            .for_each_run(|f, r, n| {
                runs.push((f, r, n));
                Ok(())
            })
            .unwrap();
        runs
    }

    fn read_all(reader: &TreeReader) -> Vec<BlockRef> {
        let mut out = Vec::new();
        reader
            .for_each_run(|first, r, n| {
                assert_eq!(first, out.len() as u64);
                out.extend((0..n).map(|k| r.advance(k)));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn geometry() {
        assert_eq!(tree_height(0), 0);
        assert_eq!(tree_height(1), 0);
        assert_eq!(tree_height(LEAF_BLOCKS), 0);
        assert_eq!(tree_height(LEAF_BLOCKS + 1), 1);
        assert_eq!(tree_height(LEAF_BLOCKS * FANOUT), 1);
        assert_eq!(tree_height(LEAF_BLOCKS * FANOUT + 1), 2);
        assert_eq!(tree_height(u64::MAX), MAX_TREE_HEIGHT);
        assert_eq!(node_span(MAX_TREE_HEIGHT), u64::MAX);
    }

    #[test]
    fn trees_at_the_geometry_edges() {
        for (total, height, nodes) in [
            (1u64, 0u32, 1usize),
            (LEAF_BLOCKS, 0, 1),
            (LEAF_BLOCKS + 1, 1, 3),
            // Zero leaves share one blob: full leaf, last leaf, two interior nodes, root.
            (LEAF_BLOCKS * FANOUT + 1, 2, 5),
        ] {
            let src = MemBlobs::new();
            let (root, reader) = build(&src, &[(BlockRef::Zero, total)]);
            assert_eq!(root.height, height, "{total}");
            assert_eq!(src.len(), nodes, "{total}");
            assert_eq!(reader.block_ref(0).unwrap(), BlockRef::Zero);
            assert_eq!(reader.block_ref(total - 1).unwrap(), BlockRef::Zero);
            assert!(matches!(
                reader.block_ref(total),
                Err(Error::OutOfRange { .. })
            ));
            let runs = runs_of(&reader);
            assert_eq!(runs, vec![(0, BlockRef::Zero, total)]);
            let mut seen = Vec::new();
            walk_tree(&*src, &root, &mut |id, k| {
                seen.push((*id, k));
                true
            })
            .unwrap();
            assert_eq!(seen.iter().filter(|s| s.1 == BlobKind::Data).count(), 0);
            let distinct: HashSet<_> = seen.iter().map(|s| s.0).collect();
            assert_eq!(distinct.len(), nodes);
        }
    }

    #[test]
    fn an_empty_volume_has_an_empty_leaf() {
        let src = MemBlobs::new();
        let (root, reader) = build(&src, &[]);
        assert_eq!(root.height, 0);
        assert_eq!(read_all(&reader), vec![]);
        assert!(reader.block_ref(0).is_err());
    }

    #[test]
    fn runs_are_coalesced_and_split_at_leaves() {
        let src = MemBlobs::new();
        // Pieces 0..LEAF_BLOCKS+10 of one blob, pushed block by block, cross a leaf boundary.
        let total = LEAF_BLOCKS + 10;
        let mut w = TreeWriter::new(&*src, total);
        for i in 0..total {
            w.push(part(1, i as u32), 1).unwrap();
        }
        let root = w.finish().unwrap();
        let reader = TreeReader::new(src.clone(), root, total, "t", Path::new("t")).unwrap();
        let runs = runs_of(&reader);
        assert_eq!(runs, vec![(0, part(1, 0), total)]);
        // Each leaf is one record.
        let leaf = reader.leaf_at(LEAF_BLOCKS).unwrap();
        assert_eq!(leaf.runs().len(), 1);
        assert_eq!(leaf.runs()[0].r, part(1, LEAF_BLOCKS as u32));
        assert_eq!(
            reader.block_ref(LEAF_BLOCKS + 3).unwrap(),
            part(1, LEAF_BLOCKS as u32 + 3)
        );
        // Non-consecutive pieces are not merged.
        let (_, r2) = build(&src, &[(part(2, 0), 2), (part(2, 5), 2), (part(3, 2), 1)]);
        assert_eq!(r2.leaf_at(0).unwrap().runs().len(), 3);
    }

    #[test]
    fn the_writer_refuses_what_does_not_belong() {
        let src = MemBlobs::new();
        let mut w = TreeWriter::new(&*src, 4);
        assert!(w.push(BlockRef::Chunk(blob(1)), 1).is_err());
        assert!(w.push(part(1, u32::MAX - 1), 2).is_err());
        w.push(BlockRef::Zero, 3).unwrap();
        assert!(w.push(BlockRef::Zero, 2).is_err());
        let w2 = TreeWriter::new(&*src, 4);
        assert!(w2.finish().is_err());
    }

    #[test]
    fn identical_leaves_are_stored_once() {
        let src = MemBlobs::new();
        let runs = [(part(1, 0), 100), (BlockRef::Zero, 3 * LEAF_BLOCKS)];
        let (a, _) = build(&src, &runs);
        let n = src.len();
        let (b, _) = build(&src, &runs);
        assert_eq!(a, b);
        assert_eq!(src.len(), n);
    }

    #[test]
    fn the_cursor_reads_in_order_and_back() {
        let src = MemBlobs::new();
        let runs = [
            (part(1, 0), 5),
            (BlockRef::Unused, LEAF_BLOCKS),
            (part(2, 7), 3),
            (BlockRef::Zero, 2 * LEAF_BLOCKS),
        ];
        let (_, reader) = build(&src, &runs);
        let reader = Arc::new(reader);
        let want = expand(&runs);
        let mut c = reader.cursor();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(c.get(i as u64).unwrap(), Some(*w));
        }
        assert_eq!(c.get(want.len() as u64).unwrap(), None);
        assert_eq!(c.get(3).unwrap(), Some(part(1, 3)));
        assert_eq!(c.get(LEAF_BLOCKS + 6).unwrap(), Some(part(2, 8)));
        assert_eq!(reader.run_at(2).unwrap(), (part(1, 2), 3));
        assert_eq!(
            reader.run_at(5).unwrap(),
            (BlockRef::Unused, LEAF_BLOCKS - 5)
        );
        assert_eq!(reader.run_at(LEAF_BLOCKS).unwrap(), (BlockRef::Unused, 5));
        assert_eq!(reader.run_at(LEAF_BLOCKS + 6).unwrap(), (part(2, 8), 2));
        assert!(reader.run_at(want.len() as u64).is_err());
    }

    #[test]
    fn walk_visits_nodes_and_blobs_and_skips_seen_subtrees() {
        let src = MemBlobs::new();
        let runs = [
            (part(1, 0), 3),
            (part(2, 0), 4),
            (part(1, 3), 1),
            (BlockRef::Zero, LEAF_BLOCKS * 2),
            (part(3, 0), 1),
        ];
        let (root, _) = build(&src, &runs);
        let mut seen = HashSet::new();
        let mut data = HashSet::new();
        walk_tree(&*src, &root, &mut |id, kind| match kind {
            BlobKind::Tree => seen.insert(*id),
            BlobKind::Data => {
                data.insert(*id);
                true
            }
        })
        .unwrap();
        assert_eq!(data, HashSet::from([blob(1), blob(2), blob(3)]));
        assert_eq!(seen.len(), src.len());
        // A caller that has seen the root gets nothing else.
        let mut calls = 0;
        walk_tree(&*src, &root, &mut |_, _| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1);
    }

    fn leaf_bytes(level: u8, blocks: u64, records: &[u8]) -> Vec<u8> {
        let mut b = node_header(u32::from(level), blocks, records.len());
        b.extend_from_slice(records);
        b
    }

    #[test]
    fn damaged_nodes_are_errors() {
        let src = MemBlobs::new();
        let (root, reader) = build(&src, &[(part(1, 0), LEAF_BLOCKS + 5)]);
        assert!(reader.block_ref(LEAF_BLOCKS).is_ok());
        let good_root = src.get_raw(&root.root);
        let check = |bytes: Vec<u8>, what: &str| {
            src.set_raw(root.root, BlobKind::Tree, bytes);
            let r =
                TreeReader::new(src.clone(), root, LEAF_BLOCKS + 5, "t", Path::new("t")).unwrap();
            let e = r.block_ref(0).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { .. } | Error::UnsupportedVersion { .. }),
                "{what}: {e}"
            );
            assert!(walk_tree(&*src, &root, &mut |_, _| true).is_err(), "{what}");
        };
        let mut b = good_root.clone();
        b[0] = b'X';
        check(b, "magic");
        let mut b = good_root.clone();
        b[4] = 2;
        check(b, "version");
        let mut b = good_root.clone();
        b[5] = 0;
        check(b, "level");
        let mut b = good_root.clone();
        b[6] = 1;
        check(b, "reserved");
        let mut b = good_root.clone();
        b[8] = b[8].wrapping_add(1);
        check(b, "blocks");
        let mut b = good_root.clone();
        b[16] = 3;
        check(b, "child count");
        let mut b = good_root.clone();
        b.pop();
        check(b, "short ids");
        check(good_root[..10].to_vec(), "short header");
        // A wrong height for the block count.
        assert!(
            TreeReader::new(
                src.clone(),
                TreeRoot {
                    root: root.root,
                    height: 2
                },
                5,
                "t",
                Path::new("t")
            )
            .is_err()
        );
    }

    #[test]
    fn leaves_are_checked() {
        let mut recs = Vec::new();
        encode_run(&mut recs, part(1, 0), 3);
        assert!(decode_node(&leaf_bytes(0, 3, &recs), 0, 3).is_ok());
        assert!(decode_node(&leaf_bytes(0, 4, &recs), 0, 4).is_err());
        assert!(decode_node(&leaf_bytes(0, 3, &recs), 0, 2).is_err());
        assert!(decode_node(&leaf_bytes(1, 3, &recs), 0, 3).is_err());
        let mut chunk = Vec::new();
        encode_run(&mut chunk, BlockRef::Chunk(blob(2)), 1);
        assert!(decode_node(&leaf_bytes(0, 1, &chunk), 0, 1).is_err());
        let mut far = Vec::new();
        far.push(super::super::format::REC_PART);
        far.extend_from_slice(&3u32.to_le_bytes());
        far.extend_from_slice(&[1; 32]);
        far.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert!(decode_node(&leaf_bytes(0, 3, &far), 0, 3).is_err());
    }

    fn arb_run() -> impl Strategy<Value = (BlockRef, u64)> {
        prop_oneof![
            (1u64..3 * LEAF_BLOCKS).prop_map(|n| (BlockRef::Zero, n)),
            (1u64..2 * LEAF_BLOCKS).prop_map(|n| (BlockRef::Unused, n)),
            (0u8..4, 0u32..100, 1u64..70).prop_map(|(b, i, n)| (part(b, i), n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn trees_round_trip(runs in proptest::collection::vec(arb_run(), 0..40), probes in proptest::collection::vec(any::<u64>(), 0..20)) {
            let src = MemBlobs::new();
            let (_, reader) = build(&src, &runs);
            let want = expand(&runs);
            prop_assert_eq!(read_all(&reader), want.clone());
            for p in probes {
                if want.is_empty() { break; }
                let i = p % want.len() as u64;
                prop_assert_eq!(reader.block_ref(i).unwrap(), want[i as usize]);
            }
        }

        #[test]
        fn hostile_nodes_never_panic(level in 0u8..3, blocks in 0u64..40_000, body in proptest::collection::vec(any::<u8>(), 0..300), exp_level in 0u32..3, exp_blocks in 0u64..40_000) {
            let _ = decode_node(&leaf_bytes(level, blocks, &body), exp_level, exp_blocks);
            let _ = decode_node(&body, exp_level, exp_blocks);
        }

        #[test]
        fn hostile_stores_never_panic(seed in proptest::collection::vec(any::<u8>(), 0..200), at in any::<usize>()) {
            let src = MemBlobs::new();
            let total = LEAF_BLOCKS * 2 + 3;
            let (root, _) = build(&src, &[(part(1, 0), 5), (BlockRef::Zero, total - 5)]);
            // Replace one node with garbage or a mangled copy.
            let ids: Vec<ChunkId> = src.map.lock().unwrap().keys().copied().collect();
            let id = ids[at % ids.len()];
            let mut b = src.get_raw(&id);
            for (k, x) in seed.iter().enumerate() {
                let n = b.len().max(1);
                if let Some(slot) = b.get_mut((at.wrapping_add(k * 7919)) % n) { *slot ^= x; }
            }
            src.set_raw(id, BlobKind::Tree, b);
            let r = TreeReader::new(src.clone(), root, total, "t", Path::new("t")).unwrap();
            let _ = r.block_ref(at as u64 % total);
            let _ = r.for_each_run(|_, _, _| Ok(()));
            let _ = walk_tree(&*src, &root, &mut |_, _| true);
        }
    }
}
