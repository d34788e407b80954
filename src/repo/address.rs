//! Repository addresses: what a `REPO` argument names.
//!
//! Today a repository is a local directory. Other tools' remote addresses (restic's
//! `s3:https://host/bucket`, `sftp:user@host:/path`, `rest:http://…`, and URLs) are
//! recognised so that they are refused with a clear error instead of becoming a local
//! directory named `s3:https:` (which `init` used to create). `local:PATH` is an explicit
//! local path, for a directory whose name starts like an address.
//!
//! A path whose first component merely contains a colon (`backup:2024`, or a Windows drive
//! `C:\repo`) is local: only the schemes below are addresses.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Address prefixes of remote repositories, as restic and URLs spell them.
const REMOTE_SCHEMES: &[&str] = &[
    "s3:", "sftp:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:", "http:", "https:",
    "ftp:", "smb:", "file:",
];

/// Explicit local prefix.
const LOCAL_PREFIX: &str = "local:";

/// The local directory that `arg` names, or an error naming what volback cannot serve.
pub fn local_path(arg: &Path) -> Result<PathBuf> {
    let Some(text) = arg.to_str() else {
        // Not UTF-8: no scheme of ours, an ordinary local path.
        return Ok(arg.to_path_buf());
    };
    if let Some(rest) = text.strip_prefix(LOCAL_PREFIX) {
        if rest.is_empty() {
            return Err(Error::InvalidArgument(
                "\"local:\" names no directory: give local:PATH".into(),
            ));
        }
        // Relative paths get "./" so that the result never reads as an address again.
        let rest = Path::new(rest);
        return Ok(if rest.is_relative() {
            Path::new(".").join(rest)
        } else {
            rest.to_path_buf()
        });
    }
    let lower = text.to_ascii_lowercase();
    if let Some(scheme) = REMOTE_SCHEMES.iter().find(|s| lower.starts_with(**s)) {
        return Err(Error::InvalidArgument(format!(
            "{text:?} is a remote repository address ({}), and this volback stores \
             repositories only in local directories; for a local directory of that name, \
             write local:{text}",
            scheme.trim_end_matches(':'),
        )));
    }
    Ok(arg.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn remote_addresses_are_refused_by_name() {
        for a in [
            "s3:http://127.0.0.1:3900/bucket",
            "S3:https://s3.amazonaws.com/b/prefix",
            "sftp:user@host:/srv/repo",
            "rest:http://host:8000/",
            "https://example.org/repo",
            "file:///srv/repo",
        ] {
            let e = local_path(Path::new(a)).unwrap_err().to_string();
            assert!(e.contains(a), "{e}");
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
}
