//! The `sfdisk --dump` text format ("sfdisk script"), as util-linux's libfdisk writes and
//! reads it:
//!
//! ```text
//! label: gpt
//! label-id: 28986345-F6AB-234F-AC77-F1FF90598E5C
//! device: /dev/sdb
//! unit: sectors
//! first-lba: 2048
//! last-lba: 131038
//! sector-size: 512
//!
//! /dev/sdb1 : start=        2048, size=       16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=FF2EF2E1-51C2-1C4B-983F-4BBC6D2A5883, name="root fs"
//! ```
//!
//! Header lines are `name: value` (`label`, `label-id`, `device`, `unit`, `first-lba`,
//! `last-lba`, `table-length`, `grain`, `sector-size`); `table-length` only appears when it
//! is not 128. A partition line is `[device :] key=value, …` with `start`, `size` (sectors),
//! `type` (MBR hex byte or GPT GUID; `Id` is an old spelling), `uuid`, `name` (quoted, bytes
//! outside printable ASCII and `"\`$` written as `\xNN`), `attrs` (quoted GPT attribute
//! text) and the flag `bootable`. The partition number is the trailing digits of the device
//! name. Lines starting with `#` are comments.
//!
//! volback reads the subset a dump uses: explicit `start` and `size` in sectors. The free
//! form of hand-written scripts (sizes with units, defaults, `+`) is `sfdisk`'s job.

use crate::probe::{ProbeReport, TableKind, partition_node};

/// A parsed or generated dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub label: TableKind,
    /// `0x1234abcd` for MBR, a GUID for GPT.
    pub label_id: Option<String>,
    pub device: Option<String>,
    pub first_lba: Option<u64>,
    pub last_lba: Option<u64>,
    pub table_length: Option<u32>,
    pub sector_size: Option<u32>,
    pub partitions: Vec<ScriptPartition>,
}

/// One partition line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptPartition {
    /// 1-based partition number.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// MBR type in hex (`83`) or GPT type GUID, as written (shortcut letters accepted).
    pub type_id: String,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub attrs: Option<String>,
    pub bootable: bool,
}

/// A parse error: 1-based line number and what is wrong.
pub type ParseError = (usize, ScriptError);

/// What is wrong with a script or with a table that a script cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error(
        "{field}={value:?} is not a number of sectors (volback reads only what `sfdisk --dump` \
         writes)"
    )]
    NotSectors { field: String, value: String },
    #[error("partition {number} has no {field}=")]
    MissingField { number: u32, field: &'static str },
    #[error("unknown field {0:?}")]
    UnknownField(String),
    /// Any other line or value that cannot be read; the text says which.
    #[error("{0}")]
    Invalid(String),
}

/// `ScriptError::Invalid(format!(...))` in short.
macro_rules! invalid {
    ($($arg:tt)*) => {
        ScriptError::Invalid(format!($($arg)*))
    };
}

const HEADERS: &[&str] = &[
    "label",
    "label-id",
    "device",
    "unit",
    "first-lba",
    "last-lba",
    "table-length",
    "grain",
    "sector-size",
];

/// Escapes a name the way libfdisk's `fputs_quoted` does, quotes included.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for &b in s.as_bytes() {
        if b == b'"' || b == b'\\' || b == b'`' || b == b'$' || !(0x20..0x7F).contains(&b) {
            out.push_str(&format!("\\x{b:02x}"));
        } else {
            out.push(b as char);
        }
    }
    out.push('"');
    out
}

/// Decodes `\xNN` escapes (libfdisk's `unhexmangle_string`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1] == b'x'
            && let Ok(hex) = std::str::from_utf8(&b[i + 2..i + 4])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_u64(v: &str, what: &str) -> Result<u64, ScriptError> {
    v.parse::<u64>().map_err(|_| ScriptError::NotSectors {
        field: what.to_string(),
        value: v.to_string(),
    })
}

impl Script {
    /// The dump of a probed partition table. Partitions a dump cannot express (a GPT entry
    /// that ends before it starts) are left out with a warning.
    pub fn from_report(report: &ProbeReport) -> Result<(Script, Vec<String>), ScriptError> {
        let t = report
            .partition_table
            .as_ref()
            .ok_or(ScriptError::Invalid("it has no partition table".into()))?;
        let mut warnings = Vec::new();
        let mut script = Script {
            label: t.kind,
            label_id: Some(t.id.clone()),
            device: Some(report.source.clone()),
            first_lba: None,
            last_lba: None,
            table_length: None,
            sector_size: Some(t.sector_size),
            partitions: Vec::new(),
        };
        if t.kind == TableKind::Gpt {
            let g = t
                .gpt
                .as_ref()
                .ok_or(ScriptError::Invalid("the GPT details are missing".into()))?;
            if t.id.is_empty() {
                return Err(invalid!(
                    "neither GPT header is usable (primary: {}; backup: {})",
                    g.primary.detail.as_deref().unwrap_or("?"),
                    g.backup.detail.as_deref().unwrap_or("?")
                ));
            }
            script.first_lba = Some(g.first_usable_lba);
            script.last_lba = Some(g.last_usable_lba);
            script.table_length = Some(g.entry_count);
        }
        for p in &t.partitions {
            if p.size_sectors == 0 {
                warnings.push(format!(
                    "partition {} is left out of the dump: {}",
                    p.number,
                    p.warnings.join("; ")
                ));
                continue;
            }
            script.partitions.push(ScriptPartition {
                number: p.number,
                start: p.start_sector,
                size: p.size_sectors,
                type_id: p.type_id.clone(),
                uuid: if t.kind == TableKind::Gpt {
                    p.uuid.clone()
                } else {
                    None
                },
                name: p.name.clone(),
                attrs: p.attrs.clone(),
                bootable: p.bootable,
            });
        }
        Ok((script, warnings))
    }

    /// The text `sfdisk --dump` would print.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("label: {}\n", self.label.name()));
        if let Some(id) = &self.label_id {
            s.push_str(&format!("label-id: {id}\n"));
        }
        if let Some(d) = &self.device {
            s.push_str(&format!("device: {d}\n"));
        }
        s.push_str("unit: sectors\n");
        if self.label == TableKind::Gpt {
            if let Some(v) = self.first_lba {
                s.push_str(&format!("first-lba: {v}\n"));
            }
            if let Some(v) = self.last_lba {
                s.push_str(&format!("last-lba: {v}\n"));
            }
            if let Some(v) = self.table_length
                && v != crate::probe::gpt::DEFAULT_ENTRY_COUNT
            {
                s.push_str(&format!("table-length: {v}\n"));
            }
        }
        if let Some(v) = self.sector_size {
            s.push_str(&format!("sector-size: {v}\n"));
        }
        if self.partitions.is_empty() {
            return s;
        }
        s.push('\n');
        for p in &self.partitions {
            let node = match &self.device {
                Some(d) => partition_node(d, p.number),
                None => p.number.to_string(),
            };
            s.push_str(&format!(
                "{node} : start={:>12}, size={:>12}, type={}",
                p.start, p.size, p.type_id
            ));
            if let Some(u) = &p.uuid {
                s.push_str(&format!(", uuid={u}"));
            }
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                s.push_str(&format!(", name={}", quote(n)));
            }
            if self.label == TableKind::Gpt
                && let Some(a) = p.attrs.as_deref().filter(|a| !a.is_empty())
            {
                s.push_str(&format!(", attrs=\"{a}\""));
            }
            if p.bootable {
                s.push_str(", bootable");
            }
            s.push('\n');
        }
        s
    }

    /// Parses a dump.
    pub fn parse(text: &str) -> Result<Script, ParseError> {
        let mut label = None;
        let mut script = Script {
            label: TableKind::Dos,
            label_id: None,
            device: None,
            first_lba: None,
            last_lba: None,
            table_length: None,
            sector_size: None,
            partitions: Vec::new(),
        };
        let mut next_number = 1u32;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, value)) = line.split_once(':')
                && !line.contains('=')
                && HEADERS.contains(&name.trim())
            {
                let value = value.trim();
                let num = |v: &str| {
                    v.parse::<u64>()
                        .map_err(|_| (n, invalid!("{name}: {v:?} is not a number")))
                };
                match name.trim() {
                    "label" => {
                        label = Some(match value {
                            "dos" | "mbr" => TableKind::Dos,
                            "gpt" => TableKind::Gpt,
                            other => {
                                return Err((
                                    n,
                                    invalid!("label {other:?} is not supported (dos or gpt)"),
                                ));
                            }
                        })
                    }
                    "label-id" => script.label_id = Some(value.to_string()),
                    "device" => script.device = Some(value.to_string()),
                    "unit" if value != "sectors" => {
                        return Err((n, invalid!("unit {value:?} is not supported (sectors)")));
                    }
                    "first-lba" => script.first_lba = Some(num(value)?),
                    "last-lba" => script.last_lba = Some(num(value)?),
                    "table-length" => {
                        let v = num(value)?;
                        script.table_length = Some(
                            u32::try_from(v)
                                .ok()
                                .filter(|&v| v > 0)
                                .ok_or((n, invalid!("table-length {v} is out of range")))?,
                        )
                    }
                    "sector-size" => {
                        let v = num(value)?;
                        if !(512..=65536).contains(&v) || !v.is_power_of_two() {
                            return Err((n, invalid!("sector-size {v} is not supported")));
                        }
                        script.sector_size = Some(v as u32);
                    }
                    // unit: sectors; grain: alignment of new partitions, irrelevant to a dump.
                    _ => {}
                }
                continue;
            }
            if line.split_once(':').is_some_and(|(a, _)| !a.contains('=')) && !line.contains('=') {
                return Err((n, invalid!("unknown header {line:?}")));
            }
            let p = parse_partition_line(line, next_number).map_err(|e| (n, e))?;
            if script.partitions.iter().any(|q| q.number == p.number) {
                return Err((n, invalid!("partition {} appears twice", p.number)));
            }
            next_number = p.number + 1;
            script.partitions.push(p);
        }
        script.label = label.ok_or((0, invalid!("no \"label:\" line (dos or gpt)")))?;
        Ok(script)
    }
}

/// Parses `[device :] start=…, size=…, …`.
fn parse_partition_line(line: &str, default_number: u32) -> Result<ScriptPartition, ScriptError> {
    let eq = line.find('=');
    let (number, mut rest) = match line.find(':') {
        Some(c) if eq.is_none_or(|e| c < e) => {
            let dev = line[..c].trim();
            let digits = dev.len() - dev.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            let number = if digits == 0 {
                default_number
            } else {
                dev[dev.len() - digits..]
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| invalid!("partition number in {dev:?} is out of range"))?
            };
            (number, &line[c + 1..])
        }
        _ => (default_number, line),
    };
    let mut p = ScriptPartition {
        number,
        start: u64::MAX,
        size: u64::MAX,
        type_id: String::new(),
        uuid: None,
        name: None,
        attrs: None,
        bootable: false,
    };
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',', ';']);
        if rest.is_empty() {
            break;
        }
        if rest
            .get(..8)
            .is_some_and(|k| k.eq_ignore_ascii_case("bootable"))
        {
            p.bootable = true;
            rest = &rest[8..];
            continue;
        }
        let Some(eq) = rest.find('=') else {
            return Err(invalid!("cannot read {rest:?} (expected key=value)"));
        };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| invalid!("{key}= has no closing quote"))?;
            value = q[..end].to_string();
            rest = &q[end + 1..];
        } else {
            let end = rest.find([',', ';', ' ', '\t']).unwrap_or(rest.len());
            value = rest[..end].to_string();
            rest = &rest[end..];
        }
        match key.as_str() {
            "start" => p.start = parse_u64(&value, "start")?,
            "size" => p.size = parse_u64(&value, "size")?,
            "type" | "id" => p.type_id = value,
            "uuid" => p.uuid = Some(value),
            "name" => p.name = Some(unescape(&value)),
            "attrs" => p.attrs = Some(value),
            other => return Err(ScriptError::UnknownField(other.to_string())),
        }
    }
    if p.start == u64::MAX {
        return Err(ScriptError::MissingField {
            number,
            field: "start",
        });
    }
    if p.size == u64::MAX {
        return Err(ScriptError::MissingField {
            number,
            field: "size",
        });
    }
    if p.type_id.is_empty() {
        return Err(ScriptError::MissingField {
            number,
            field: "type",
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GPT_DUMP: &str = "label: gpt
label-id: 28986345-F6AB-234F-AC77-F1FF90598E5C
device: g.img
unit: sectors
first-lba: 2048
last-lba: 131038
sector-size: 512

g.img1 : start=        2048, size=       16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=FF2EF2E1-51C2-1C4B-983F-4BBC6D2A5883, name=\"root fs\"
g.img3 : start=       26624, size=        8192, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, uuid=F733AF2A-CB2D-8248-8DD6-C3C1C972E43C, attrs=\"RequiredPartition LegacyBIOSBootable GUID:60\"
";

    const DOS_DUMP: &str = "label: dos
label-id: 0x57350c0b
device: /dev/loop0
unit: sectors
sector-size: 512

/dev/loop0p1 : start=        2048, size=       16384, type=83, bootable
/dev/loop0p3 : start=       26624, size=      104448, type=5
/dev/loop0p5 : start=       28672, size=        8192, type=83
";

    #[test]
    fn sfdisk_dumps_round_trip() {
        for text in [GPT_DUMP, DOS_DUMP] {
            let s = Script::parse(text).unwrap();
            assert_eq!(s.render(), text);
        }
        let s = Script::parse(GPT_DUMP).unwrap();
        assert_eq!(s.partitions[1].number, 3);
        assert_eq!(s.partitions[0].name.as_deref(), Some("root fs"));
        let d = Script::parse(DOS_DUMP).unwrap();
        assert!(d.partitions[0].bootable);
        assert_eq!(d.partitions[2].number, 5);
    }

    #[test]
    fn names_are_escaped_like_libfdisk() {
        let q = quote("a \"b\" $c ü");
        assert_eq!(q, "\"a \\x22b\\x22 \\x24c \\xc3\\xbc\"");
        assert_eq!(unescape(&q[1..q.len() - 1]), "a \"b\" $c ü");
    }

    #[test]
    fn errors_name_the_line() {
        let e = Script::parse("label: gpt\n1 : start=2048, size=10MiB, type=L\n").unwrap_err();
        assert_eq!(e.0, 2);
        assert!(e.1.to_string().contains("size"), "{e:?}");
        let e = Script::parse("label: zfs\n").unwrap_err();
        assert_eq!(e.0, 1);
        let e = Script::parse("1 : start=1, size=2, type=83\n").unwrap_err();
        assert!(e.1.to_string().contains("label"), "{e:?}");
        let e =
            Script::parse("label: dos\n1 : start=1, size=2, type=83, colour=red\n").unwrap_err();
        assert!(e.1.to_string().contains("colour"), "{e:?}");
        let e = Script::parse("label: dos\nbogus: 3\n").unwrap_err();
        assert!(e.1.to_string().contains("unknown header"), "{e:?}");
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC{0,200}") {
            let _ = Script::parse(&s);
        }

        #[test]
        fn random_lines_never_panic(lines in proptest::collection::vec("[a-z0-9=:,\" \\\\x-]{0,60}", 0..10)) {
            let text = format!("label: gpt\n{}", lines.join("\n"));
            let _ = Script::parse(&text);
        }
    }
}
