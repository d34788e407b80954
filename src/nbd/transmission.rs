//! The transmission phase: reads (simple, or structured with holes), block status, and
//! refusals of everything that would write.

use super::handshake::Negotiated;
use super::proto::{self, Request};
use super::session::{Fault, read_message};
use super::{Client, Events, Export, MAX_EXTENTS, MAX_PAYLOAD, READ_PIECE, SessionStats};
use crate::error::Error;
use crate::volume::is_zero;
use std::io::{self, Read, Write};

/// The outcome of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transmission {
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the connection between two requests.
    Closed,
}

/// Reads and throws away `len` bytes (the payload of a refused write) without buffering
/// them.
fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let n = io::copy(&mut r.by_ref().take(len), &mut io::sink())?;
    if n < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the connection closed during a write payload ({n} of {len} bytes)"),
        ));
    }
    Ok(())
}

/// The transmission phase of one client.
pub(crate) struct Transmitter<'a, W: Write> {
    pub w: &'a mut W,
    pub export: &'a Export,
    pub negotiated: Negotiated,
    pub client: &'a Client,
    pub events: &'a dyn Events,
    pub stats: &'a mut SessionStats,
    /// The buffer reads are read into (at most [`READ_PIECE`]).
    pub piece: Vec<u8>,
}

/// The result of one request: `Ok` when the connection can go on.
type Reply = Result<(), Fault>;

impl<W: Write> Transmitter<'_, W> {
    fn size(&self) -> u64 {
        self.export.volume.size()
    }

    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[&[u8]]) -> Reply {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        // Payloads are at most READ_PIECE + 8 or MAX_EXTENTS × 8 + 4 bytes.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.w
            .write_all(&proto::chunk_header(flags, kind, cookie, len))?;
        for p in payload {
            self.w.write_all(p)?;
        }
        Ok(())
    }

    /// Answers `req` with an error: a structured error chunk with `message` when structured
    /// replies were negotiated, a simple reply otherwise.
    fn error(&mut self, req: &Request, code: u32, message: &str) -> Reply {
        self.stats.errors += 1;
        if self.negotiated.structured {
            let m = proto::truncate_message(message, proto::MAX_STRING);
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m.as_bytes());
            self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                req.cookie,
                &[&p],
            )
        } else {
            Ok(self.w.write_all(&proto::simple_reply(code, req.cookie))?)
        }
    }

    /// Answers `req` with success and no payload.
    fn ok(&mut self, req: &Request) -> Reply {
        if self.negotiated.structured {
            self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                &[],
            )
        } else {
            Ok(self.w.write_all(&proto::simple_reply(0, req.cookie))?)
        }
    }

    /// A volume error while serving `req`: reported, and answered with `NBD_EIO`.
    fn volume_error(&mut self, req: &Request, offset: u64, e: Error) -> Reply {
        self.events.request_failed(self.client, &e);
        let msg = crate::error::chain(&e);
        if self.negotiated.structured {
            self.stats.errors += 1;
            let m = proto::truncate_message(&msg, proto::MAX_STRING);
            let mut p = proto::EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m.as_bytes());
            p.extend_from_slice(&offset.to_be_bytes());
            self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR_OFFSET,
                req.cookie,
                &[&p],
            )
        } else {
            self.error(req, proto::EIO, &msg)
        }
    }

    /// Checks that `[offset, offset + len)` lies within the export.
    fn in_bounds(&self, req: &Request) -> bool {
        req.offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= self.size())
    }

    /// Rejects flags not in `allowed`; true when the request may go on.
    fn check_flags(&mut self, req: &Request, allowed: u16) -> Result<bool, Fault> {
        if req.flags & !allowed != 0 {
            let msg = format!(
                "command flags {:#06x} are not supported for command {}",
                req.flags & !allowed,
                req.command
            );
            self.error(req, proto::EINVAL, &msg)?;
            return Ok(false);
        }
        Ok(true)
    }

    fn out_of_bounds(&mut self, req: &Request) -> Reply {
        let msg = format!(
            "{} bytes at offset {} are past the end of the export ({} bytes)",
            req.len,
            req.offset,
            self.size()
        );
        self.error(req, proto::EINVAL, &msg)
    }

    /// The next stretch of `[pos, end)`: `(hole_end, data_end)` with
    /// `pos <= hole_end <= data_end <= end`, `[pos, hole_end)` reading as zeros and
    /// `[hole_end, data_end)` possibly data. A volume that answers outside its contract is
    /// treated as all data (always correct).
    fn stretch(&self, pos: u64, end: u64) -> crate::Result<(u64, u64)> {
        Ok(match self.export.volume.next_data(pos, end)? {
            None => (end, end),
            Some(r) if r.start >= end => (end, end),
            Some(r) if r.start >= pos && r.end > r.start => (r.start, r.end.min(end)),
            Some(_) => (pos, end),
        })
    }

    fn read(&mut self, req: &Request) -> Reply {
        if !self.check_flags(req, proto::CMD_FLAG_FUA)? {
            return Ok(());
        }
        if !self.in_bounds(req) {
            return self.out_of_bounds(req);
        }
        if req.len > MAX_PAYLOAD {
            let msg = format!(
                "read of {} bytes is over the maximum of {MAX_PAYLOAD}",
                req.len
            );
            let code = if self.negotiated.structured {
                proto::EOVERFLOW
            } else {
                proto::EINVAL
            };
            return self.error(req, code, &msg);
        }
        if self.negotiated.structured {
            self.read_structured(req)
        } else {
            self.read_simple(req)
        }
    }

    /// A simple reply. The first piece is read before the reply header goes out, so that an
    /// error there is answered with `NBD_EIO`; an error in a later piece can only close the
    /// connection (the header has promised the data). Memory stays at one piece.
    fn read_simple(&mut self, req: &Request) -> Reply {
        let end = req.offset + u64::from(req.len);
        let mut piece = std::mem::take(&mut self.piece);
        let result = (|| -> Reply {
            let mut pos = req.offset;
            piece.resize((end - pos).min(READ_PIECE as u64) as usize, 0);
            if let Err(e) = self.export.volume.read_at(pos, &mut piece) {
                return self.volume_error(req, pos, e);
            }
            self.w.write_all(&proto::simple_reply(0, req.cookie))?;
            loop {
                self.w.write_all(&piece)?;
                pos += piece.len() as u64;
                if pos >= end {
                    break;
                }
                piece.resize((end - pos).min(READ_PIECE as u64) as usize, 0);
                self.export
                    .volume
                    .read_at(pos, &mut piece)
                    .map_err(Fault::Volume)?;
            }
            self.stats.bytes_read += u64::from(req.len);
            Ok(())
        })();
        piece.clear();
        self.piece = piece;
        result
    }

    fn hole(&mut self, req: &Request, offset: u64, len: u64) -> Reply {
        // Within one request, so below MAX_PAYLOAD.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let mut p = [0u8; 12];
        p[0..8].copy_from_slice(&offset.to_be_bytes());
        p[8..12].copy_from_slice(&len.to_be_bytes());
        self.chunk(0, proto::REPLY_TYPE_OFFSET_HOLE, req.cookie, &[&p])
    }

    fn read_structured(&mut self, req: &Request) -> Reply {
        let end = req.offset + u64::from(req.len);
        let mut pos = req.offset;
        // A hole not sent yet, so that neighbouring holes and zero pieces go as one chunk.
        let mut hole: Option<(u64, u64)> = None;
        let mut piece = std::mem::take(&mut self.piece);
        let result = (|| -> Reply {
            while pos < end {
                let (hole_end, data_end) = match self.stretch(pos, end) {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some((o, l)) = hole.take() {
                            self.hole(req, o, l)?;
                        }
                        return self.volume_error(req, pos, e);
                    }
                };
                if hole_end > pos {
                    let (o, l) = hole.get_or_insert((pos, 0));
                    *l = hole_end - *o;
                    pos = hole_end;
                }
                while pos < data_end {
                    let n = (data_end - pos).min(READ_PIECE as u64) as usize;
                    piece.resize(n, 0);
                    if let Err(e) = self.export.volume.read_at(pos, &mut piece) {
                        if let Some((o, l)) = hole.take() {
                            self.hole(req, o, l)?;
                        }
                        return self.volume_error(req, pos, e);
                    }
                    if is_zero(&piece) {
                        let (o, l) = hole.get_or_insert((pos, 0));
                        *l = pos + n as u64 - *o;
                    } else {
                        if let Some((o, l)) = hole.take() {
                            self.hole(req, o, l)?;
                        }
                        self.chunk(
                            0,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            req.cookie,
                            &[&pos.to_be_bytes(), &piece],
                        )?;
                    }
                    pos += n as u64;
                }
            }
            if let Some((o, l)) = hole.take() {
                self.hole(req, o, l)?;
            }
            self.stats.bytes_read += u64::from(req.len);
            self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                &[],
            )
        })();
        piece.clear();
        self.piece = piece;
        result
    }

    fn block_status(&mut self, req: &Request) -> Reply {
        if !self.check_flags(req, proto::CMD_FLAG_REQ_ONE | proto::CMD_FLAG_FUA)? {
            return Ok(());
        }
        if !self.negotiated.allocation {
            return self.error(
                req,
                proto::EINVAL,
                "no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)",
            );
        }
        if !self.in_bounds(req) {
            return self.out_of_bounds(req);
        }
        if req.len == 0 {
            return self.error(req, proto::EINVAL, "block status of 0 bytes");
        }
        let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let end = req.offset + u64::from(req.len);
        let mut pos = req.offset;
        let mut extents: Vec<(u32, u32)> = Vec::new();
        fn push(extents: &mut Vec<(u32, u32)>, len: u64, flags: u32) {
            // Extents lie within one request, so their sum is below 4 GiB.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            match extents.last_mut() {
                Some((l, f)) if *f == flags => *l = l.saturating_add(len),
                _ => extents.push((len, flags)),
            }
        }
        while pos < end && extents.len() < MAX_EXTENTS {
            let (hole_end, data_end) = match self.stretch(pos, end) {
                Ok(s) => s,
                Err(e) if extents.is_empty() => return self.volume_error(req, pos, e),
                Err(e) => {
                    // Send what is known; the client asks again from there.
                    self.events.request_failed(self.client, &e);
                    break;
                }
            };
            if hole_end > pos {
                push(
                    &mut extents,
                    hole_end - pos,
                    proto::STATE_HOLE | proto::STATE_ZERO,
                );
                if req_one {
                    break;
                }
            }
            if data_end > hole_end {
                push(&mut extents, data_end - hole_end, 0);
                if req_one {
                    break;
                }
            }
            pos = data_end;
        }
        let mut p = Vec::with_capacity(4 + extents.len() * 8);
        p.extend_from_slice(&proto::META_BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in &extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            &[&p],
        )
    }

    /// Serves one request; `Ok(false)` after `NBD_CMD_DISC`.
    fn request<R: Read>(&mut self, r: &mut R, req: &Request) -> Result<bool, Fault> {
        match req.command {
            proto::CMD_READ => self.read(req)?,
            proto::CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    // Skipping that much would be the client's denial of service.
                    return Err(Fault::Protocol(format!(
                        "write of {} bytes is over the maximum of {MAX_PAYLOAD}",
                        req.len
                    )));
                }
                discard(r, u64::from(req.len))?;
                self.error(req, proto::EPERM, "the export is read-only")?;
            }
            proto::CMD_DISC => return Ok(false),
            proto::CMD_FLUSH => {
                if self.check_flags(req, proto::CMD_FLAG_FUA)? {
                    self.ok(req)?;
                }
            }
            proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
                self.error(req, proto::EPERM, "the export is read-only")?;
            }
            proto::CMD_CACHE => {
                if !self.check_flags(req, 0)? {
                } else if self.in_bounds(req) {
                    self.ok(req)?;
                } else {
                    self.out_of_bounds(req)?;
                }
            }
            proto::CMD_BLOCK_STATUS => self.block_status(req)?,
            other => {
                let msg = format!("command {other} is not supported by this server");
                self.error(req, proto::EINVAL, &msg)?;
            }
        }
        self.stats.requests += 1;
        self.w.flush()?;
        Ok(true)
    }

    /// Serves requests until the client disconnects.
    pub fn run<R: Read>(&mut self, r: &mut R) -> Result<Transmission, Fault> {
        loop {
            let mut h = [0u8; proto::REQUEST_LEN];
            if !read_message(r, &mut h)? {
                return Ok(Transmission::Closed);
            }
            let req = Request::parse(&h);
            if req.magic != proto::REQUEST_MAGIC {
                return Err(Fault::Protocol(format!(
                    "request magic {:#010x} is not NBD_REQUEST_MAGIC",
                    req.magic
                )));
            }
            if !self.request(r, &req)? {
                return Ok(Transmission::Disconnected);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn go_then_simple_reads() {
        let e = export();
        let script = Script::default()
            .flags(FLAGS)
            .go("disk")
            .request(proto::CMD_READ, 0, 7, 4000, 200)
            .request(proto::CMD_READ, 0, 8, 65536 - 10, 11)
            .request(proto::CMD_READ, 0, 9, 0, 16)
            .request(proto::CMD_WRITE, 0, 10, 0, 3);
        let mut script = script;
        script.0.extend_from_slice(b"abc");
        let script = script.request(proto::CMD_DISC, 0, 11, 0, 0);
        let o = run(&e, script);
        assert_eq!(o.transmission.unwrap().unwrap(), Transmission::Disconnected);
        let mut rd = Reader(&o.out);
        rd.greeting();
        let replies = rd.opt_replies();
        let (_, kind, info) = &replies[0];
        assert_eq!(*kind, proto::REP_INFO);
        assert_eq!(&info[0..2], &proto::INFO_EXPORT.to_be_bytes());
        assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 65536);
        let flags = u16::from_be_bytes(info[10..12].try_into().unwrap());
        assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
        assert!(replies.iter().any(|(_, _, d)| d.starts_with(&[0, 3])));
        assert_eq!(replies.last().unwrap().1, proto::REP_ACK);
        assert_eq!(rd.simple(), (0, 7));
        let mem = &e.volume;
        let mut want = vec![0u8; 200];
        mem.read_at(4000, &mut want).unwrap();
        assert_eq!(rd.take(200), &want[..]);
        assert_eq!(rd.simple(), (proto::EINVAL, 8), "read past the end");
        assert_eq!(rd.simple(), (0, 9));
        assert_eq!(rd.take(16), &[0u8; 16]);
        assert_eq!(rd.simple(), (proto::EPERM, 10), "write");
        assert!(rd.0.is_empty());
        assert_eq!(o.stats.requests, 4);
        assert_eq!(o.stats.errors, 2);
    }

    #[test]
    fn structured_read_sends_holes_and_data() {
        let e = export();
        let script = Script::default()
            .flags(FLAGS)
            .option(proto::OPT_STRUCTURED_REPLY, &[])
            .go("")
            .request(proto::CMD_READ, 0, 1, 0, 65536)
            .request(proto::CMD_READ, 0, 2, 0, 65537);
        let o = run(&e, script);
        assert_eq!(o.transmission.unwrap().unwrap(), Transmission::Closed);
        let mut rd = Reader(&o.out);
        rd.greeting();
        assert_eq!(rd.opt_replies().last().unwrap().1, proto::REP_ACK);
        assert_eq!(rd.opt_replies().last().unwrap().1, proto::REP_ACK);
        let mut image = vec![0xeeu8; 65536];
        let mut kinds = Vec::new();
        for (_, kind, cookie, p) in rd.chunks() {
            assert_eq!(cookie, 1);
            kinds.push(kind);
            match kind {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(p[0..8].try_into().unwrap()) as usize;
                    image[off..off + p.len() - 8].copy_from_slice(&p[8..]);
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let off = u64::from_be_bytes(p[0..8].try_into().unwrap()) as usize;
                    let len = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    image[off..off + len].fill(0);
                }
                proto::REPLY_TYPE_NONE => {}
                k => panic!("unexpected chunk type {k}"),
            }
        }
        let mut want = vec![0u8; 65536];
        e.volume.read_at(0, &mut want).unwrap();
        assert!(image == want, "reassembled read differs");
        assert_eq!(
            kinds,
            vec![
                proto::REPLY_TYPE_OFFSET_HOLE,
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_TYPE_OFFSET_HOLE,
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_TYPE_NONE
            ]
        );
        let err = rd.chunks();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].1, proto::REPLY_TYPE_ERROR);
        assert_eq!(&err[0].3[0..4], &proto::EINVAL.to_be_bytes());
    }

    #[test]
    fn block_status_reports_holes_as_hole_and_zero() {
        let e = export();
        let script = Script::default()
            .flags(FLAGS)
            .option(proto::OPT_STRUCTURED_REPLY, &[])
            .set_meta(&["base:allocation", "qemu:unknown"])
            .go("disk")
            .request(proto::CMD_BLOCK_STATUS, 0, 5, 0, 65536)
            .request(
                proto::CMD_BLOCK_STATUS,
                proto::CMD_FLAG_REQ_ONE,
                6,
                5000,
                60000,
            );
        let o = run(&e, script);
        let mut rd = Reader(&o.out);
        rd.greeting();
        rd.opt_replies();
        let meta = rd.opt_replies();
        assert_eq!(meta[0].1, proto::REP_META_CONTEXT);
        assert_eq!(&meta[0].2[4..], b"base:allocation");
        rd.opt_replies();
        let c = rd.chunks();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1, proto::REPLY_TYPE_BLOCK_STATUS);
        let p = &c[0].3;
        let words: Vec<u32> = p
            .chunks(4)
            .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(
            words,
            vec![1, 4096, 3, 8192, 0, 28672, 3, 24576, 0],
            "context id, then (length, flags) pairs"
        );
        let c = rd.chunks();
        let words: Vec<u32> = c[0]
            .3
            .chunks(4)
            .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![1, 12288 - 5000, 0], "REQ_ONE: one extent");
    }

    #[test]
    fn volume_errors_become_eio() {
        let mut e = export();
        e.volume = Arc::new(Mem {
            bytes: vec![1u8; 8192],
            data: std::iter::once(0..8192).collect(),
            bad: Some(5000),
        });
        let o = run(
            &e,
            Script::default()
                .flags(FLAGS)
                .go("disk")
                .request(proto::CMD_READ, 0, 1, 4096, 4096)
                .request(proto::CMD_READ, 0, 2, 0, 4096),
        );
        let mut rd = Reader(&o.out);
        rd.greeting();
        rd.opt_replies();
        assert_eq!(rd.simple(), (proto::EIO, 1));
        assert_eq!(rd.simple(), (0, 2), "the connection stays usable");
        assert_eq!(rd.take(4096), &[1u8; 4096][..]);

        let o = run(
            &e,
            Script::default()
                .flags(FLAGS)
                .option(proto::OPT_STRUCTURED_REPLY, &[])
                .go("disk")
                .request(proto::CMD_READ, 0, 1, 0, 8192),
        );
        let mut rd = Reader(&o.out);
        rd.greeting();
        rd.opt_replies();
        rd.opt_replies();
        let c = rd.chunks();
        assert_eq!(c.last().unwrap().1, proto::REPLY_TYPE_ERROR_OFFSET);
    }

    #[test]
    fn big_simple_reads_go_in_pieces() {
        let len = READ_PIECE * 2 + 1000;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut e = export();
        e.volume = Arc::new(Mem {
            bytes: bytes.clone(),
            data: std::iter::once(0..len as u64).collect(),
            bad: None,
        });
        let o = run(
            &e,
            Script::default()
                .flags(FLAGS)
                .go("disk")
                .request(proto::CMD_READ, 0, 1, 0, len as u32),
        );
        let mut rd = Reader(&o.out);
        rd.greeting();
        rd.opt_replies();
        assert_eq!(rd.simple(), (0, 1));
        assert!(rd.take(len) == &bytes[..]);

        // An error in the second piece: the header already said "no error", so the
        // connection is closed.
        e.volume = Arc::new(Mem {
            bytes,
            data: std::iter::once(0..len as u64).collect(),
            bad: Some(READ_PIECE as u64 + 10),
        });
        let o = run(
            &e,
            Script::default()
                .flags(FLAGS)
                .go("disk")
                .request(proto::CMD_READ, 0, 1, 0, len as u32)
                .request(proto::CMD_READ, 0, 2, 0, 10),
        );
        assert!(matches!(o.transmission, Some(Err(Fault::Volume(_)))));
        let mut rd = Reader(&o.out);
        rd.greeting();
        rd.opt_replies();
        assert_eq!(rd.simple(), (0, 1));
        assert_eq!(rd.0.len(), READ_PIECE, "only the first piece was sent");
    }

    proptest! {
        /// Whatever a client sends, the session ends (the input runs out) without panicking.
        #[test]
        fn random_client_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let e = export();
            let mut s = Script::default().flags(FLAGS);
            s.0.extend_from_slice(&tail);
            let _ = run(&e, s);
        }

        /// Valid sessions with one field mutated never panic.
        #[test]
        fn mutated_sessions_never_panic(pos in 0usize..200, byte in any::<u8>()) {
            let e = export();
            let mut s = Script::default()
                .flags(FLAGS)
                .option(proto::OPT_STRUCTURED_REPLY, &[])
                .set_meta(&["base:allocation"])
                .go("disk")
                .request(proto::CMD_BLOCK_STATUS, 0, 1, 0, 65536)
                .request(proto::CMD_READ, 0, 2, 100, 30000);
            let i = pos % s.0.len();
            s.0[i] = byte;
            let _ = run(&e, s);
        }
    }
}
