//! The handshake: fixed newstyle negotiation of the export, structured replies and metadata
//! contexts.

use super::proto::{self, OptionHeader};
use super::session::{Fault, read_message, transmission_flags};
use super::{Export, MAX_OPTION_LEN, MAX_OPTIONS, MAX_PAYLOAD, PREFERRED_BLOCK};
use std::io::{self, Read, Write};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::*;

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
}
