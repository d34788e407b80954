//! What the handshake and transmission phases share: reading whole messages, the reasons a
//! session stops early, and the transmission flags of the export.

use super::proto;
use crate::error::Error;
use std::io::{self, Read};

/// Why a session stopped early.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The connection failed (including a handshake timeout, or a cut message).
    Io(io::Error),
    /// The client broke the protocol in a way that leaves no safe way to go on.
    Protocol(String),
    /// The volume failed after a simple reply had started: the protocol has no way to
    /// report the error but closing the connection.
    Volume(Error),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

/// The transmission flags of every export: read-only, flush (a no-op) and multi-connection
/// (nothing is cached per connection).
pub(crate) fn transmission_flags() -> u16 {
    proto::FLAG_HAS_FLAGS
        | proto::FLAG_READ_ONLY
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_CAN_MULTI_CONN
}

/// Fills `buf`; `Ok(false)` when the peer closed the connection before the first byte.
pub(crate) fn read_message<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
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
