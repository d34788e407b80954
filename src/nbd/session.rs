//! One client's session: the handshake, then the transmission phase. Written over any
//! `Read`/`Write` pair so that tests can drive it from memory.

use super::proto::{self, OptionHeader, Request};
use super::{
    Client, Events, Export, MAX_EXTENTS, MAX_OPTION_LEN, MAX_OPTIONS, MAX_PAYLOAD, PREFERRED_BLOCK,
    READ_PIECE, SessionStats,
};
use crate::error::Error;
use crate::volume::is_zero;
use std::io::{self, Read, Write};

/// Why a session stopped early.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The connection failed (including a handshake timeout, or a cut message).
    Io(io::Error),
    /// The client broke the protocol in a way that leaves no safe way to go on.
    Protocol(String),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

/// The outcome of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Transmission starts.
    Go(Negotiated),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// The client closed the connection between two messages.
    Closed,
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (block status allowed).
    pub allocation: bool,
}

/// The outcome of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transmission {
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the connection between two requests.
    Closed,
}

/// Fills `buf`; `Ok(false)` when the peer closed the connection before the first byte.
fn read_message<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the connection closed in the middle of a message ({done} of {} bytes)",
                        buf.len()
                    ),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
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

fn transmission_flags() -> u16 {
    proto::FLAG_HAS_FLAGS
        | proto::FLAG_READ_ONLY
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_CAN_MULTI_CONN
}

// ---------------------------------------------------------------------------------------------
// Handshake

struct Handshaker<'a, W: Write> {
    w: &'a mut W,
    export: &'a Export,
    negotiated: Negotiated,
}

impl<W: Write> Handshaker<'_, W> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        // Every reply this server builds is far below 4 GiB.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.w
            .write_all(&proto::option_reply_header(option, kind, len))?;
        self.w.write_all(data)
    }

    /// An error reply with a message for the user.
    fn error(&mut self, option: u32, kind: u32, message: &str) -> io::Result<()> {
        let m = proto::truncate_message(message, proto::MAX_STRING);
        self.reply(option, kind, m.as_bytes())
    }

    fn ack(&mut self, option: u32) -> io::Result<()> {
        self.reply(option, proto::REP_ACK, &[])
    }

    fn unknown_export(&mut self, option: u32, name: &[u8]) -> io::Result<()> {
        let msg = format!(
            "no export named {:?}; this server has {:?}",
            String::from_utf8_lossy(name),
            self.export.name
        );
        self.error(option, proto::REP_ERR_UNKNOWN, &msg)
    }

    fn info(&mut self, option: u32, kind: u16, payload: &[u8]) -> io::Result<()> {
        let mut d = Vec::with_capacity(2 + payload.len());
        d.extend_from_slice(&kind.to_be_bytes());
        d.extend_from_slice(payload);
        self.reply(option, proto::REP_INFO, &d)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; true when the export was accepted.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<bool> {
        let req = match proto::parse_info_request(data) {
            Ok(r) => r,
            Err(why) => {
                self.error(option, proto::REP_ERR_INVALID, why)?;
                return Ok(false);
            }
        };
        if !self.export.matches(req.name) {
            self.unknown_export(option, req.name)?;
            return Ok(false);
        }
        let mut export = [0u8; 10];
        export[0..8].copy_from_slice(&self.export.volume.size().to_be_bytes());
        export[8..10].copy_from_slice(&transmission_flags().to_be_bytes());
        self.info(option, proto::INFO_EXPORT, &export)?;
        let mut sent = Vec::new();
        for &kind in &req.requests {
            if sent.contains(&kind) {
                continue;
            }
            sent.push(kind);
            match kind {
                proto::INFO_NAME => {
                    let name = proto::truncate_message(&self.export.name, proto::MAX_STRING);
                    self.info(option, kind, name.as_bytes())?;
                }
                proto::INFO_DESCRIPTION if !self.export.description.is_empty() => {
                    let d = proto::truncate_message(&self.export.description, proto::MAX_STRING);
                    self.info(option, kind, d.as_bytes())?;
                }
                proto::INFO_BLOCK_SIZE => {
                    let mut b = [0u8; 12];
                    b[0..4].copy_from_slice(&1u32.to_be_bytes());
                    b[4..8].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    b[8..12].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    self.info(option, kind, &b)?;
                }
                _ => {}
            }
        }
        self.ack(option)?;
        Ok(true)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // Setting replaces the previous selection, even when it fails.
            self.negotiated.allocation = false;
            if !self.negotiated.structured {
                return self.error(
                    option,
                    proto::REP_ERR_INVALID,
                    "negotiate structured replies before selecting metadata contexts",
                );
            }
        }
        let req = match proto::parse_meta_request(data) {
            Ok(r) => r,
            Err(why) => return self.error(option, proto::REP_ERR_INVALID, why),
        };
        if !self.export.matches(req.name) {
            return self.unknown_export(option, req.name);
        }
        let full = proto::META_BASE_ALLOCATION.as_bytes();
        let selected = if set {
            req.queries.contains(&full)
        } else {
            // Listing: no query lists everything; `base:` is a wildcard for the namespace.
            req.queries.is_empty() || req.queries.iter().any(|q| *q == full || *q == b"base:")
        };
        if selected {
            let mut d = proto::META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            if !set {
                // The id in a listing is reserved and should be zero.
                d = vec![0; 4];
            }
            d.extend_from_slice(full);
            self.reply(option, proto::REP_META_CONTEXT, &d)?;
            if set {
                self.negotiated.allocation = true;
            }
        }
        self.ack(option)
    }
}

/// Runs the handshake: greeting, client flags, then options until the client picks the
/// export, aborts or leaves.
pub(crate) fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Handshake, Fault> {
    w.write_all(&proto::greeting())?;
    w.flush()?;
    let mut b = [0u8; 4];
    if !read_message(r, &mut b)? {
        return Ok(Handshake::Closed);
    }
    let client_flags = u32::from_be_bytes(b);
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(Fault::Protocol(format!(
            "unknown client flags {client_flags:#010x} (not an NBD client?)"
        )));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut hs = Handshaker {
        w,
        export,
        negotiated: Negotiated::default(),
    };
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OptionHeader::LEN];
        if !read_message(r, &mut h)? {
            return Ok(Handshake::Closed);
        }
        let h = OptionHeader::parse(&h);
        if h.magic != proto::IHAVEOPT {
            return Err(Fault::Protocol(format!(
                "option magic {:#018x} is not IHAVEOPT",
                h.magic
            )));
        }
        if h.len > MAX_OPTION_LEN {
            let msg = format!(
                "option data of {} bytes is over this server's limit of {MAX_OPTION_LEN}",
                h.len
            );
            hs.error(h.option, proto::REP_ERR_TOO_BIG, &msg)?;
            hs.w.flush()?;
            return Err(Fault::Protocol(msg));
        }
        // Bounded by MAX_OPTION_LEN just above.
        let mut data = vec![0u8; h.len as usize];
        if !data.is_empty() && !read_message(r, &mut data)? {
            return Err(Fault::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the option data",
            )));
        }
        match h.option {
            proto::OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    // This option cannot fail politely: the protocol says to disconnect.
                    return Err(Fault::Protocol(format!(
                        "asked for export {:?}; this server has {:?}",
                        String::from_utf8_lossy(&data),
                        export.name
                    )));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.volume.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                hs.w.write_all(&reply)?;
                hs.w.flush()?;
                return Ok(Handshake::Go(hs.negotiated));
            }
            proto::OPT_ABORT => {
                hs.ack(h.option)?;
                hs.w.flush()?;
                return Ok(Handshake::Aborted);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    hs.error(
                        h.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )?;
                } else {
                    let name = proto::truncate_message(&export.name, proto::MAX_STRING);
                    let desc = proto::truncate_message(&export.description, proto::MAX_STRING);
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(desc.as_bytes());
                    hs.reply(h.option, proto::REP_SERVER, &d)?;
                    hs.ack(h.option)?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                if hs.info_or_go(h.option, &data)? && h.option == proto::OPT_GO {
                    hs.w.flush()?;
                    return Ok(Handshake::Go(hs.negotiated));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    hs.negotiated.structured = true;
                    hs.ack(h.option)?;
                } else {
                    hs.error(
                        h.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                hs.meta_context(h.option, &data)?;
            }
            other => {
                let msg = format!("option {other} is not supported by this server");
                hs.error(other, proto::REP_ERR_UNSUP, &msg)?;
            }
        }
        hs.w.flush()?;
    }
    Err(Fault::Protocol(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// The transmission phase of one client.
pub(crate) struct Transmitter<'a, W: Write> {
    pub w: &'a mut W,
    pub export: &'a Export,
    pub negotiated: Negotiated,
    pub client: &'a Client,
    pub events: &'a dyn Events,
    pub stats: &'a mut SessionStats,
    /// The buffer structured reads are read into (at most [`READ_PIECE`]).
    pub piece: Vec<u8>,
}

/// The result of one request: the connection goes on either way.
type Reply = io::Result<()>;

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
            self.w.write_all(&proto::simple_reply(code, req.cookie))
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
            self.w.write_all(&proto::simple_reply(0, req.cookie))
        }
    }

    /// A volume error while serving `req`: reported, and answered with `NBD_EIO`.
    fn volume_error(&mut self, req: &Request, offset: u64, e: Error) -> Reply {
        self.events.request_failed(self.client, &e);
        let msg = e.to_string();
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
    fn check_flags(&mut self, req: &Request, allowed: u16) -> io::Result<bool> {
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

    fn read_simple(&mut self, req: &Request) -> Reply {
        // At most MAX_PAYLOAD, checked by the caller.
        let mut buf = vec![0u8; req.len as usize];
        if let Err(e) = self.export.volume.read_at(req.offset, &mut buf) {
            return self.volume_error(req, req.offset, e);
        }
        self.w.write_all(&proto::simple_reply(0, req.cookie))?;
        self.w.write_all(&buf)?;
        self.stats.bytes_read += u64::from(req.len);
        Ok(())
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
    use crate::error::Result;
    use crate::nbd::Quiet;
    use crate::volume::Volume;
    use proptest::prelude::*;
    use std::io::Cursor;
    use std::ops::Range;
    use std::sync::Arc;

    /// A volume in memory whose data ranges are given explicitly.
    struct Mem {
        bytes: Vec<u8>,
        data: Vec<Range<u64>>,
        /// Reads touching this offset fail.
        bad: Option<u64>,
    }

    impl Volume for Mem {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let end = offset + buf.len() as u64;
            if end > self.size() {
                return Err(Error::InvalidArgument("past the end".into()));
            }
            if self.bad.is_some_and(|b| offset <= b && b < end) {
                return Err(Error::InvalidArgument("bad sector".into()));
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
    fn export() -> Export {
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
    struct Script(Vec<u8>);

    impl Script {
        fn flags(mut self, f: u32) -> Self {
            self.0.extend_from_slice(&f.to_be_bytes());
            self
        }
        fn option(mut self, opt: u32, data: &[u8]) -> Self {
            self.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            self.0.extend_from_slice(&opt.to_be_bytes());
            self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
            self.0.extend_from_slice(data);
            self
        }
        fn go(self, name: &str) -> Self {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&1u16.to_be_bytes());
            d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
            self.option(proto::OPT_GO, &d)
        }
        fn set_meta(self, queries: &[&str]) -> Self {
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.option(proto::OPT_SET_META_CONTEXT, &d)
        }
        fn request(mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Self {
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

    struct Outcome {
        out: Vec<u8>,
        handshake: Result<Handshake, Fault>,
        transmission: Option<Result<Transmission, Fault>>,
        stats: SessionStats,
    }

    fn run(export: &Export, script: Script) -> Outcome {
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
    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        }
        fn u16(&mut self) -> u16 {
            u16::from_be_bytes(self.take(2).try_into().unwrap())
        }
        fn u32(&mut self) -> u32 {
            u32::from_be_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_be_bytes(self.take(8).try_into().unwrap())
        }
        fn greeting(&mut self) {
            assert_eq!(self.take(18), &proto::greeting());
        }
        /// One option reply: (option, type, data).
        fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
            assert_eq!(self.u64(), proto::OPTION_REPLY_MAGIC);
            let opt = self.u32();
            let kind = self.u32();
            let len = self.u32() as usize;
            (opt, kind, self.take(len).to_vec())
        }
        /// Option replies up to and including the final (non-INFO, non-META) one.
        fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
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
        fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
            assert_eq!(self.u32(), proto::STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let len = self.u32() as usize;
            (flags, kind, cookie, self.take(len).to_vec())
        }
        /// A whole structured reply.
        fn chunks(&mut self) -> Vec<(u16, u16, u64, Vec<u8>)> {
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
        fn simple(&mut self) -> (u32, u64) {
            assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
            (self.u32(), self.u64())
        }
    }

    const FLAGS: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

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
    fn block_status_needs_a_context() {
        let e = export();
        let script = Script::default()
            .flags(FLAGS)
            .set_meta(&["base:allocation"])
            .go("disk")
            .request(proto::CMD_BLOCK_STATUS, 0, 5, 0, 4096);
        let o = run(&e, script);
        let mut rd = Reader(&o.out);
        rd.greeting();
        let meta = rd.opt_replies();
        assert_eq!(
            meta[0].1,
            proto::REP_ERR_INVALID,
            "no structured replies yet"
        );
        rd.opt_replies();
        assert_eq!(rd.simple(), (proto::EINVAL, 5));
    }

    #[test]
    fn options_list_unknown_and_too_big() {
        let e = export();
        let script = Script::default()
            .flags(FLAGS)
            .option(proto::OPT_LIST, &[])
            .option(99, b"whatever")
            .go("nope")
            .option(proto::OPT_ABORT, &[]);
        let o = run(&e, script);
        assert!(matches!(o.handshake, Ok(Handshake::Aborted)));
        let mut rd = Reader(&o.out);
        rd.greeting();
        let list = rd.opt_replies();
        assert_eq!(list[0].1, proto::REP_SERVER);
        assert_eq!(&list[0].2[0..4], &4u32.to_be_bytes());
        assert_eq!(&list[0].2[4..], b"diska test disk");
        assert_eq!(list[1].1, proto::REP_ACK);
        assert_eq!(rd.opt_reply().1, proto::REP_ERR_UNSUP);
        assert_eq!(rd.opt_reply().1, proto::REP_ERR_UNKNOWN);
        assert_eq!(rd.opt_reply().1, proto::REP_ACK);

        let mut s = Script::default().flags(FLAGS);
        s.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        s.0.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        s.0.extend_from_slice(&u32::MAX.to_be_bytes());
        let o = run(&e, s);
        assert!(matches!(o.handshake, Err(Fault::Protocol(_))));
        let mut rd = Reader(&o.out);
        rd.greeting();
        assert_eq!(rd.opt_reply().1, proto::REP_ERR_TOO_BIG);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let e = export();
        for (flags, pad) in [(FLAGS, 0), (proto::FLAG_C_FIXED_NEWSTYLE, 124)] {
            let o = run(
                &e,
                Script::default()
                    .flags(flags)
                    .option(proto::OPT_EXPORT_NAME, b"disk"),
            );
            assert!(matches!(o.handshake, Ok(Handshake::Go(_))));
            assert_eq!(o.out.len(), 18 + 8 + 2 + pad);
        }
        let o = run(
            &e,
            Script::default()
                .flags(FLAGS)
                .option(proto::OPT_EXPORT_NAME, b"other"),
        );
        assert!(matches!(o.handshake, Err(Fault::Protocol(_))));
        let o = run(&e, Script::default().flags(0x8000_0000));
        assert!(matches!(o.handshake, Err(Fault::Protocol(_))));
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
