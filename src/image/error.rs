//! Errors of the pure on-disk structure parsers (VHD footer and dynamic header, VHDX headers,
//! region and metadata tables, qcow2 header). A parser sees bytes, not a file: its error names
//! the field and the field's offset inside the structure. The format's check turns it into an
//! [`Error::Corrupt`] or [`Error::UnsupportedImage`] naming the file
//! ([`ImageFile::rejected`](super::file::ImageFile::rejected)).

#[cfg(doc)]
use crate::error::Error;

/// Why a parser rejected a structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// The bytes end before the structure does.
    #[error("{structure} is {len} bytes, expected {need}")]
    Short {
        structure: &'static str,
        len: usize,
        need: usize,
    },
    /// The signature (cookie, magic) is not there.
    #[error("no {magic} {field} at offset {offset}")]
    Magic {
        field: &'static str,
        offset: usize,
        /// The expected signature, quoted as the specification spells it.
        magic: &'static str,
    },
    /// The stored checksum does not match the bytes.
    #[error(
        "{algorithm} mismatch (stored {stored:#010x}, computed {computed:#010x}, field at offset \
         {offset})"
    )]
    Checksum {
        /// "checksum" or "CRC-32C".
        algorithm: &'static str,
        offset: usize,
        stored: u32,
        computed: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("{field} at offset {offset}: {detail}")]
    Field {
        field: &'static str,
        offset: usize,
        detail: String,
    },
    /// The structure is valid but uses a feature volback does not handle.
    #[error("{detail}")]
    Unsupported {
        field: &'static str,
        offset: usize,
        detail: String,
    },
}

impl ParseError {
    /// A [`ParseError::Field`].
    pub fn field(field: &'static str, offset: usize, detail: impl Into<String>) -> ParseError {
        ParseError::Field {
            field,
            offset,
            detail: detail.into(),
        }
    }

    /// A [`ParseError::Unsupported`].
    pub fn unsupported(field: &'static str, offset: usize, detail: impl Into<String>) -> Self {
        ParseError::Unsupported {
            field,
            offset,
            detail: detail.into(),
        }
    }

    /// Checks that `b` holds at least `need` bytes of `structure`.
    pub fn need(structure: &'static str, b: &[u8], need: usize) -> Result<(), ParseError> {
        if b.len() < need {
            return Err(ParseError::Short {
                structure,
                len: b.len(),
                need,
            });
        }
        Ok(())
    }

    /// Checks that `b` holds `magic` at `offset` (`b` is long enough).
    pub fn magic(
        field: &'static str,
        b: &[u8],
        offset: usize,
        magic: &[u8],
        quoted: &'static str,
    ) -> Result<(), ParseError> {
        if &b[offset..offset + magic.len()] != magic {
            return Err(ParseError::Magic {
                field,
                offset,
                magic: quoted,
            });
        }
        Ok(())
    }

    /// Checks a stored 32-bit checksum at `offset` against the `computed` one.
    pub fn checksum(
        algorithm: &'static str,
        offset: usize,
        stored: u32,
        computed: u32,
    ) -> Result<(), ParseError> {
        if stored != computed {
            return Err(ParseError::Checksum {
                algorithm,
                offset,
                stored,
                computed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field_and_offset() {
        let e = ParseError::magic("cookie", b"xxxxxxxx", 0, b"conectix", "\"conectix\"");
        assert_eq!(
            e.unwrap_err().to_string(),
            "no \"conectix\" cookie at offset 0"
        );
        let e = ParseError::checksum("CRC-32C", 4, 1, 2).unwrap_err();
        assert!(e.to_string().contains("CRC-32C mismatch"), "{e}");
        assert!(e.to_string().contains("offset 4"), "{e}");
        let e = ParseError::field("version", 12, "unknown version 9");
        assert_eq!(e.to_string(), "version at offset 12: unknown version 9");
        assert_eq!(
            ParseError::need("footer", &[0; 3], 512)
                .unwrap_err()
                .to_string(),
            "footer is 3 bytes, expected 512"
        );
    }
}
