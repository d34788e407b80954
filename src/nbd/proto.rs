//! NBD wire format: every magic number and code this server uses, the parsers for what a
//! client sends, and the encoders for what the server sends. All integers are big-endian.
//!
//! Numbers are those of the NBD protocol document (`doc/proto.md` of
//! github.com/NetworkBlockDevice/nbd); the names follow it.

use crate::bytes::{be_u16, be_u32, be_u64};

// ---------------------------------------------------------------------------------------------
// Handshake

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of a newstyle greeting, and the first 8 of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types in `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The one metadata context this server offers, and the id it is given.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Transmission

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

// ---------------------------------------------------------------------------------------------
// Parsing

/// A bounds-checked reader over the data of one option.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Fields { data, at: 0 }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let b = self.data.get(self.at..end)?;
        self.at = end;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| be_u16(b, 0))
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| be_u32(b, 0))
    }

    /// A string of `len` bytes, at most [`MAX_STRING`].
    fn string(&mut self, len: u32) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok().filter(|&l| l <= MAX_STRING)?;
        self.bytes(len)
    }

    fn rest(&self) -> usize {
        self.data.len() - self.at
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// Requested `NBD_INFO_*` types, in the client's order.
    pub requests: Vec<u16>,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: name length, name, count, count × u16.
/// The data must end exactly after the list.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let mut f = Fields::new(data);
    let len = f.u32().ok_or("shorter than a name length")?;
    let name = f
        .string(len)
        .ok_or("export name longer than the option or than 4096 bytes")?;
    let count = f.u16().ok_or("no information request count")?;
    if f.rest() != usize::from(count) * 2 {
        return Err("information request count does not match the option length");
    }
    let mut requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        requests.push(f.u16().ok_or("information request list is cut short")?);
    }
    Ok(InfoRequest { name, requests })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub name: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

/// Parses meta context option data: name length, name, query count, then each query as a
/// length and a string. The data must end exactly after the last query.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest<'_>, &'static str> {
    let mut f = Fields::new(data);
    let len = f.u32().ok_or("shorter than a name length")?;
    let name = f
        .string(len)
        .ok_or("export name longer than the option or than 4096 bytes")?;
    let count = f.u32().ok_or("no query count")?;
    // Each query takes at least its 4-byte length: a count beyond that is a lie, and the
    // check bounds the allocation below by the (bounded) option length.
    if u64::from(count) * 4 > f.rest() as u64 {
        return Err("query count does not fit in the option");
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let qlen = f.u32().ok_or("query list is cut short")?;
        queries.push(
            f.string(qlen)
                .ok_or("query longer than the option or than 4096 bytes")?,
        );
    }
    if f.rest() != 0 {
        return Err("bytes after the last query");
    }
    Ok(MetaRequest { name, queries })
}

/// An option header: `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8; Self::LEN]) -> OptionHeader {
        OptionHeader {
            magic: be_u64(b, 0),
            option: be_u32(b, 8),
            len: be_u32(b, 12),
        }
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Request {
        Request {
            magic: be_u32(b, 0),
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        }
    }

    /// The header as a client sends it (for tests).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option reply header; `len` bytes of data follow.
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply header (the data of a successful read follows).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Cuts `message` to at most `max` bytes on a character boundary.
pub fn truncate_message(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_data(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn info_request_round_trip() {
        let d = info_data(b"disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, b"disk");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        let empty = info_data(b"", &[]);
        assert_eq!(parse_info_request(&empty).unwrap().name, b"");
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        let mut d = info_data(b"disk", &[1, 2]);
        d.push(0);
        assert!(parse_info_request(&d).is_err(), "trailing byte");
        let d = info_data(b"disk", &[1, 2]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err(), "cut list");
        let mut d = info_data(b"disk", &[]);
        d[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&d).is_err(), "name length past the end");
        let long = vec![b'a'; MAX_STRING + 1];
        assert!(
            parse_info_request(&info_data(&long, &[])).is_err(),
            "name too long"
        );
    }

    #[test]
    fn meta_request_round_trip_and_errors() {
        let d = meta_data(b"", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(
            r.queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
        let mut d = meta_data(b"x", &[b"base:"]);
        d[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&d).is_err(), "absurd query count");
        let d = meta_data(b"x", &[b"base:"]);
        assert!(parse_meta_request(&d[..d.len() - 1]).is_err(), "cut query");
    }

    #[test]
    fn request_round_trip() {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_REQ_ONE,
            command: CMD_BLOCK_STATUS,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), r);
    }

    #[test]
    fn message_truncation_keeps_characters_whole() {
        assert_eq!(truncate_message("héllo", 2), "h");
        assert_eq!(truncate_message("héllo", 3), "hé");
        assert_eq!(truncate_message("abc", 10), "abc");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
        }

        #[test]
        fn mutated_meta_requests_never_panic(
            pos in 0usize..64, byte in any::<u8>(), cut in 0usize..64,
        ) {
            let mut d = meta_data(b"export", &[b"base:allocation", b"base:"]);
            let i = pos % d.len();
            d[i] = byte;
            d.truncate(d.len() - cut % d.len());
            let _ = parse_meta_request(&d);
            let mut d = info_data(b"export", &[0, 1, 2, 3]);
            let i = pos % d.len();
            d[i] = byte;
            d.truncate(d.len() - cut % d.len());
            let _ = parse_info_request(&d);
        }
    }
}
