//! Repository addresses: what a `REPO` argument names.
//!
//! A repository is a local directory or a prefix in an S3 bucket:
//!
//! - `s3:https://HOST[:PORT]/BUCKET[/PREFIX]` and `s3:http://…` (restic's form) name a bucket
//!   and a prefix inside it; `s3:HOST[:PORT]/BUCKET[/PREFIX]` means https, as in restic.
//!   `s3://BUCKET` (the AWS command line's form) is refused with the spelling to use instead.
//! - Other tools' remote addresses (`sftp:user@host:/path`, `rest:http://…`, URLs) are
//!   recognised so that they are refused with a clear error instead of becoming a local
//!   directory named `sftp:user@host:` (which `init` used to create).
//! - `local:PATH` is an explicit local path, for a directory whose name starts like an address;
//!   anything else is a local path.
//!
//! A path whose first component merely contains a colon (`backup:2024`, or a Windows drive
//! `C:\repo`) is local: only the schemes below are addresses.

use crate::error::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};

/// Address prefixes of remote repositories volback does not serve, as restic and URLs spell
/// them.
const REMOTE_SCHEMES: &[&str] = &[
    "sftp:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:", "http:", "https:", "ftp:",
    "smb:", "file:",
];

/// Explicit local prefix.
const LOCAL_PREFIX: &str = "local:";

/// The S3 prefix (restic's spelling).
const S3_PREFIX: &str = "s3:";

/// Where a repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// A prefix in a bucket of an S3-compatible object store.
    S3(S3Location),
}

/// A bucket and a prefix on an S3 endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Location {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or address as written (an IPv6 address keeps its brackets).
    pub host: String,
    pub port: Option<u16>,
    pub bucket: String,
    /// Key prefix of every object of the repository, without leading or trailing `/`; empty
    /// for a repository at the top of the bucket.
    pub prefix: String,
}

impl S3Location {
    /// `http://host:port`, the endpoint requests go to.
    pub fn endpoint(&self) -> String {
        match self.port {
            Some(p) => format!("{}://{}:{p}", self.scheme, self.host),
            None => format!("{}://{}", self.scheme, self.host),
        }
    }

    /// Whether the endpoint is Amazon's (virtual-host-style requests); every other host gets
    /// path-style requests, which S3-compatible servers (Garage, MinIO, Ceph) expect.
    pub fn is_aws(&self) -> bool {
        let host = self.host.to_ascii_lowercase();
        host == "amazonaws.com" || host.ends_with(".amazonaws.com")
    }
}

impl fmt::Display for S3Location {
    /// The address as volback parses it: `s3:http://host:port/bucket/prefix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{S3_PREFIX}{}/{}", self.endpoint(), self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// What `arg` names: a local directory or an S3 bucket and prefix; an error for addresses of
/// stores volback cannot serve and for malformed S3 addresses.
pub fn parse(arg: &Path) -> Result<Location> {
    let Some(text) = arg.to_str() else {
        // Not UTF-8: no scheme of ours, an ordinary local path.
        return Ok(Location::Local(arg.to_path_buf()));
    };
    if let Some(rest) = text.strip_prefix(LOCAL_PREFIX) {
        if rest.is_empty() {
            return Err(Error::InvalidArgument(
                "\"local:\" names no directory: give local:PATH".into(),
            ));
        }
        // Relative paths get "./" so that the result never reads as an address again.
        let rest = Path::new(rest);
        return Ok(Location::Local(if rest.is_relative() {
            Path::new(".").join(rest)
        } else {
            rest.to_path_buf()
        }));
    }
    let lower = text.to_ascii_lowercase();
    if lower.starts_with(S3_PREFIX) {
        return parse_s3(text, &text[S3_PREFIX.len()..]).map(Location::S3);
    }
    if let Some(scheme) = REMOTE_SCHEMES.iter().find(|s| lower.starts_with(**s)) {
        return Err(Error::InvalidArgument(format!(
            "{text:?} is a remote repository address ({}), and volback stores repositories only \
             in local directories and S3 buckets (s3:https://HOST/BUCKET[/PREFIX]); for a local \
             directory of that name, write local:{text}",
            scheme.trim_end_matches(':'),
        )));
    }
    Ok(Location::Local(arg.to_path_buf()))
}

/// The local directory that `arg` names, for the operations that need one; an S3 address or
/// another remote address is an error naming it.
pub fn local_path(arg: &Path) -> Result<PathBuf> {
    match parse(arg)? {
        Location::Local(p) => Ok(p),
        Location::S3(loc) => Err(Error::InvalidArgument(format!(
            "{loc} is an S3 repository, and this operation works only on repositories in local \
             directories; for a local directory of that name, write local:{}",
            arg.display()
        ))),
    }
}

/// Parses what follows `s3:` in `text`.
fn parse_s3(text: &str, rest: &str) -> Result<S3Location> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "{text:?} is not a valid S3 repository address ({why}); write \
             s3:https://HOST[:PORT]/BUCKET[/PREFIX] or s3:http://HOST[:PORT]/BUCKET[/PREFIX]"
        ))
    };
    if let Some(bucket) = rest.strip_prefix("//") {
        let bucket = bucket.split('/').next().unwrap_or_default();
        let bucket = if bucket.is_empty() { "BUCKET" } else { bucket };
        return Err(Error::InvalidArgument(format!(
            "{text:?} is the AWS command line's spelling, which does not say where the server \
             is; for a bucket on Amazon S3 write s3:https://s3.amazonaws.com/{bucket} (or \
             s3:https://s3.REGION.amazonaws.com/{bucket}), for another server \
             s3:https://HOST[:PORT]/{bucket}"
        )));
    }
    let lower = rest.to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("https://") {
        ("https", &rest["https://".len()..])
    } else if lower.starts_with("http://") {
        ("http", &rest["http://".len()..])
    } else if lower.contains("://") {
        return Err(bad("only http and https endpoints are served"));
    } else {
        ("https", rest)
    };
    if rest.contains(['?', '#']) {
        return Err(bad(
            "query strings and fragments are not part of an S3 address",
        ));
    }
    if rest.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("control characters and backslashes are not allowed"));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = parse_authority(authority).map_err(|why| bad(&why))?;
    let path = path.strip_suffix('/').unwrap_or(path);
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    check_bucket(bucket).map_err(|why| bad(&why))?;
    if !prefix.is_empty() {
        for part in prefix.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(bad(&format!(
                    "the prefix {prefix:?} has an empty, \".\" or \"..\" component"
                )));
            }
        }
    }
    Ok(S3Location {
        scheme: scheme.to_string(),
        host: host.to_string(),
        port,
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    })
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn parse_authority(authority: &str) -> std::result::Result<(&str, Option<u16>), String> {
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains('@') {
        return Err(
            "credentials do not belong in the address: use AWS_ACCESS_KEY_ID and \
                    AWS_SECRET_ACCESS_KEY or a profile"
                .into(),
        );
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| "an IPv6 address without its closing \"]\"".to_string())?;
        let (host, after) = authority.split_at(end + 1);
        let inner = &host[1..host.len() - 1];
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(format!("{host:?} is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(format!("unexpected {after:?} after the host")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !host.starts_with('[')
        && (host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_'))
    {
        return Err(format!("{host:?} is not a host name"));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(format!("{p:?} is not a port number")),
        },
    };
    Ok((host, port))
}

/// S3's bucket naming rules (3–63 characters: lower-case letters, digits, `.` and `-`,
/// starting and ending with a letter or digit).
fn check_bucket(bucket: &str) -> std::result::Result<(), String> {
    if bucket.is_empty() {
        return Err("no bucket".into());
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !bucket.chars().all(ok_char)
        || !ends_ok(bucket.chars().next())
        || !ends_ok(bucket.chars().last())
    {
        return Err(format!(
            "{bucket:?} is not a bucket name: 3 to 63 lower-case letters, digits, '.' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn remote_addresses_are_refused_by_name() {
        for a in [
            "s3:http://127.0.0.1:3900/bucket",
            "S3:https://s3.amazonaws.com/bbb/prefix",
            "sftp:user@host:/srv/repo",
            "rest:http://host:8000/",
            "https://example.org/repo",
            "file:///srv/repo",
        ] {
            let e = local_path(Path::new(a)).unwrap_err().to_string();
            assert!(
                e.to_ascii_lowercase().contains(&a.to_ascii_lowercase()),
                "{e}"
            );
            assert!(e.contains("local directories"), "{e}");
        }
    }

    #[test]
    fn local_paths_stay_local() {
        for a in [
            "/srv/repo",
            "repo",
            "./s3:bucket",
            "backup:2024",
            "C:\\repo",
            "c:/repo",
            "s3",
            "",
        ] {
            assert_eq!(local_path(Path::new(a)).unwrap(), PathBuf::from(a), "{a}");
        }
        let odd = local_path(Path::new("local:s3:odd")).unwrap();
        assert_eq!(odd, Path::new(".").join("s3:odd"));
        // Resolving the answer again keeps it (init opens what it created).
        assert_eq!(local_path(&odd).unwrap(), odd);
        assert_eq!(
            local_path(Path::new("local:/srv/s3:x")).unwrap(),
            PathBuf::from("/srv/s3:x")
        );
        assert!(local_path(Path::new("local:")).is_err());
    }

    proptest! {
        /// Any text: an answer, never a panic; a local answer is the text itself unless it
        /// had the explicit prefix, and resolving it again gives it back.
        #[test]
        fn any_text_is_answered(s in ".{0,64}") {
            if let Ok(p) = local_path(Path::new(&s)) {
                if !s.starts_with(LOCAL_PREFIX) {
                    prop_assert_eq!(&p, &PathBuf::from(&s));
                }
                prop_assert_eq!(local_path(&p).unwrap(), p);
            }
        }
    }

    fn s3(text: &str) -> S3Location {
        match parse(Path::new(text)) {
            Ok(Location::S3(loc)) => loc,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn s3_addresses_are_parsed() {
        let l = s3("s3:http://127.0.0.1:3900/volback");
        assert_eq!(
            (l.scheme.as_str(), l.host.as_str(), l.port),
            ("http", "127.0.0.1", Some(3900))
        );
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("volback", ""));
        assert_eq!(l.endpoint(), "http://127.0.0.1:3900");
        assert!(!l.is_aws());
        let l = s3("S3:HTTPS://s3.eu-west-1.amazonaws.com/my-bucket/hosts/a/");
        assert_eq!((l.scheme.as_str(), l.port), ("https", None));
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("my-bucket", "hosts/a")
        );
        assert!(l.is_aws());
        assert_eq!(
            l.to_string(),
            "s3:https://s3.eu-west-1.amazonaws.com/my-bucket/hosts/a"
        );
        // restic's short form means https.
        let l = s3("s3:minio.lan:9000/bkt/p");
        assert_eq!(l.endpoint(), "https://minio.lan:9000");
        let l = s3("s3:http://[::1]:3900/bkt");
        assert_eq!(l.endpoint(), "http://[::1]:3900");
    }

    #[test]
    fn bad_s3_addresses_say_what_to_write() {
        let e = parse(Path::new("s3://my-bucket/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3:https://s3.amazonaws.com/my-bucket"), "{e}");
        for a in [
            "s3:",
            "s3:http://",
            "s3:http://host",
            "s3:http://host/",
            "s3:http://host/B",
            "s3:http://host:99999/bkt",
            "s3:http://host:x/bkt",
            "s3:http://key:secret@host/bkt",
            "s3:http://host/bkt//p",
            "s3:http://host/bkt/../p",
            "s3:http://host/bkt?x=1",
            "s3:ftp://host/bkt",
            "s3:http://[::1/bkt",
        ] {
            let e = parse(Path::new(a)).unwrap_err().to_string();
            assert!(e.contains("s3:https://"), "{a}: {e}");
        }
    }

    #[test]
    fn local_path_refuses_s3_by_name() {
        let e = local_path(Path::new("s3:http://127.0.0.1:3900/volback/p"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3:http://127.0.0.1:3900/volback/p is an S3 repository"),
            "{e}"
        );
        assert_eq!(
            parse(Path::new("local:s3:http://h/bkt")).unwrap(),
            Location::Local(Path::new(".").join("s3:http://h/bkt"))
        );
    }

    proptest! {
        /// Any text after `s3:`: an answer, never a panic; an S3 answer prints as an address
        /// that parses back to itself.
        #[test]
        fn any_s3_text_is_answered(s in "(?i:s3:(https?://)?)[a-zA-Z0-9.:/@?\\[\\]_-]{0,40}") {
            if let Ok(Location::S3(loc)) = parse(Path::new(&s)) {
                let again = parse(Path::new(&loc.to_string())).unwrap();
                prop_assert_eq!(again, Location::S3(loc));
            }
        }

        /// Well-formed locations survive printing and parsing.
        #[test]
        fn s3_locations_round_trip(
            https in any::<bool>(),
            host in "[a-z0-9][a-z0-9.-]{0,20}",
            port in proptest::option::of(1u16..),
            bucket in "[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]",
            prefix in proptest::collection::vec("[A-Za-z0-9_.=+-]{1,8}", 0..4),
        ) {
            let prefix: Vec<String> = prefix
                .into_iter()
                .filter(|p| p != "." && p != "..")
                .collect();
            let loc = S3Location {
                scheme: if https { "https" } else { "http" }.into(),
                host,
                port,
                bucket,
                prefix: prefix.join("/"),
            };
            prop_assert_eq!(parse(Path::new(&loc.to_string())).unwrap(), Location::S3(loc));
        }
    }
}
