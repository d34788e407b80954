//! Test helpers: an in-memory volume, scripted client input, and a reader for the server's
//! output.

use super::handshake::{Handshake, handshake};
use super::proto::{self, Request};
use super::session::Fault;
use super::transmission::{Transmission, Transmitter};
use super::{Client, Export, Quiet, SessionStats};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::io::Cursor;
use std::ops::Range;
use std::sync::Arc;

/// A volume in memory whose data ranges are given explicitly.
pub(super) struct Mem {
    pub(super) bytes: Vec<u8>,
    pub(super) data: Vec<Range<u64>>,
    /// Reads touching this offset fail.
    pub(super) bad: Option<u64>,
}

impl Volume for Mem {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size() {
            return Err(Error::read_out_of_range(
                "the test volume",
                offset,
                buf.len() as u64,
                self.size(),
            ));
        }
        if self.bad.is_some_and(|b| offset <= b && b < end) {
            return Err(Error::IoAt {
                op: "read",
                path: "the test volume".into(),
                offset,
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(())
    }
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size());
        Ok(self
            .data
            .iter()
            .find(|r| r.end > offset && r.start < end)
            .map(|r| r.start.max(offset)..r.end.min(end)))
    }
    fn describe(&self) -> String {
        "mem".into()
    }
}

/// 64 KiB: data in [4 KiB, 12 KiB) and [40 KiB, 64 KiB); the rest zero.
pub(super) fn export() -> Export {
    let mut bytes = vec![0u8; 64 << 10];
    for (i, b) in bytes.iter_mut().enumerate() {
        if (4096..12288).contains(&i) || i >= 40960 {
            *b = (i % 251) as u8 + 1;
        }
    }
    Export {
        name: "disk".into(),
        description: "a test disk".into(),
        volume: Arc::new(Mem {
            bytes,
            data: vec![4096..12288, 40960..65536],
            bad: None,
        }),
    }
}

/// Client messages, built up for one session.
#[derive(Default)]
pub(super) struct Script(pub(super) Vec<u8>);

impl Script {
    pub(super) fn flags(mut self, f: u32) -> Self {
        self.0.extend_from_slice(&f.to_be_bytes());
        self
    }
    pub(super) fn option(mut self, opt: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    pub(super) fn go(self, name: &str) -> Self {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.option(proto::OPT_GO, &d)
    }
    pub(super) fn set_meta(self, queries: &[&str]) -> Self {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(proto::OPT_SET_META_CONTEXT, &d)
    }
    pub(super) fn request(
        mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Self {
        let r = Request {
            magic: proto::REQUEST_MAGIC,
            flags,
            command,
            cookie,
            offset,
            len,
        };
        self.0.extend_from_slice(&r.encode());
        self
    }
}

pub(super) struct Outcome {
    pub(super) out: Vec<u8>,
    pub(super) handshake: Result<Handshake, Fault>,
    pub(super) transmission: Option<Result<Transmission, Fault>>,
    pub(super) stats: SessionStats,
}

pub(super) fn run(export: &Export, script: Script) -> Outcome {
    let mut r = Cursor::new(script.0);
    let mut out = Vec::new();
    let handshake = handshake(&mut r, &mut out, export);
    let mut stats = SessionStats::default();
    let transmission = match &handshake {
        Ok(Handshake::Go(n)) => {
            let client = Client {
                id: 1,
                peer: "test".into(),
            };
            let mut t = Transmitter {
                w: &mut out,
                export,
                negotiated: *n,
                client: &client,
                events: &Quiet,
                stats: &mut stats,
                piece: Vec::new(),
            };
            Some(t.run(&mut r))
        }
        _ => None,
    };
    Outcome {
        out,
        handshake,
        transmission,
        stats,
    }
}

/// Reads the server's output back.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl Reader<'_> {
    pub(super) fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    pub(super) fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    pub(super) fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    pub(super) fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    pub(super) fn greeting(&mut self) {
        assert_eq!(self.take(18), &proto::greeting());
    }
    /// One option reply: (option, type, data).
    pub(super) fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), proto::OPTION_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (opt, kind, self.take(len).to_vec())
    }
    /// Option replies up to and including the final (non-INFO, non-META) one.
    pub(super) fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = !matches!(
                r.1,
                proto::REP_INFO | proto::REP_META_CONTEXT | proto::REP_SERVER
            );
            v.push(r);
            if last {
                return v;
            }
        }
    }
    /// One structured chunk: (flags, type, cookie, payload).
    pub(super) fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), proto::STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        (flags, kind, cookie, self.take(len).to_vec())
    }
    /// A whole structured reply.
    pub(super) fn chunks(&mut self) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.0 & proto::REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }
    pub(super) fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }
}

pub(super) const FLAGS: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
