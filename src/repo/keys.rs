//! Passwords and key slots of an encrypted repository (format 3; docs/FORMAT.md §F3).
//!
//! An encrypted repository has one random master key. It is stored only wrapped, once per
//! password, in key slots: `keys/<slot id>`, where the slot id is 16 lowercase hex digits and
//! the document is a [`KeySlot`] (crypto/keyslot.rs). Opening tries the password against
//! every usable slot; the one that opens is the repository's [current
//! slot](crate::repo::Repository::current_slot).
//!
//! # Where a password comes from
//!
//! A [`PasswordSource`]. The command line's is [`Passwords`]: `--password-file FILE` or
//! `--password-command CMD`, else the environment variable `VOLBACK_PASSWORD_FILE`, else
//! `VOLBACK_PASSWORD`, else a prompt when the binary can ask on a terminal, else
//! [`Error::PasswordRequired`] saying how to give one (never a wait for input that cannot
//! come). A file or command gives its first line, without the line ending; an empty password
//! is refused. Environment variables that are set but empty count as unset.
//!
//! A password given for a plain repository is refused ([`Error::PasswordForPlainRepository`]):
//! a plain repository where an encrypted one was expected may have been put there to collect
//! plaintext (docs/SECURITY.md).
//!
//! # Changing slots
//!
//! Slots are written with a temporary file, fsync, rename, directory fsync, and a slot is
//! removed only once what replaces it is durable: `passwd` writes the new slot, then removes
//! the old one, so a crash leaves both passwords working. The last slot, and the slot the
//! password in use opened, are never removed. Crash tests: `VOLBACK_TEST_ABORT_AT` set to
//! `key-slot-temp` (new slot encoded, not yet published) or
//! `key-slot-written` (`passwd`: new slot durable, old one not removed yet) aborts there.
//!
//! Slots are read with bounds: at most [`MAX_SLOTS`] slot files of at most
//! [`MAX_SLOT_BYTES`] each, each parsed and checked against [`LIMITS`] before any key
//! derivation, so a hostile slot cannot make an open allocate or spin. A damaged slot is
//! skipped (and shown by `key list`) while another one opens.

use super::backend::{self, PutMode, WriteBackend};
use crate::crypto::MasterKey;
use crate::crypto::keyslot::{KdfParams, KeySlot, LIMITS, SlotError};
use crate::error::{Error, IoContext, Result, chain};
use crate::repo::{Repository, fsio};
use std::ffi::OsString;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The directory of key slots in a repository.
pub const KEYS_DIR: &str = "keys";
/// Most slot files a repository may hold (more is refused before any work).
pub const MAX_SLOTS: usize = 64;
/// Largest slot document read.
pub const MAX_SLOT_BYTES: u64 = 64 * 1024;
/// Largest password read from a file or a command (bytes of its first line).
pub const MAX_PASSWORD_BYTES: u64 = 64 * 1024;

/// How a user gives a password; ends the messages of [`Error::PasswordRequired`].
pub const HOW_TO_GIVE: &str = "give it with --password-file FILE, --password-command CMD, \
    or the environment variable VOLBACK_PASSWORD_FILE (a file holding it) or VOLBACK_PASSWORD";

/// Where the password of an encrypted repository comes from.
pub trait PasswordSource {
    /// True when the user gave a password (option, environment, command): a plain repository
    /// opened with one is refused (downgrade defence, docs/SECURITY.md).
    fn given(&self) -> bool;
    /// The password; `purpose` names what it is for, e.g. "repository /x". Errors are
    /// [`Error::PasswordRequired`] (no password, empty, command failed) or [`Error::Io`]
    /// naming the password file.
    fn password(&self, purpose: &str) -> Result<Zeroizing<String>>;
}

/// No password: plain repositories open, encrypted ones are [`Error::PasswordRequired`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPassword;

impl PasswordSource for NoPassword {
    fn given(&self) -> bool {
        false
    }

    fn password(&self, _purpose: &str) -> Result<Zeroizing<String>> {
        Err(required(format!("no password was given; {HOW_TO_GIVE}")))
    }
}

/// A password the caller already has (library callers, tests).
pub struct FixedPassword(pub Zeroizing<String>);

impl FixedPassword {
    pub fn new(password: &str) -> FixedPassword {
        FixedPassword(Zeroizing::new(password.to_string()))
    }
}

impl PasswordSource for FixedPassword {
    fn given(&self) -> bool {
        true
    }

    fn password(&self, _purpose: &str) -> Result<Zeroizing<String>> {
        check_not_empty(&self.0, "the password")?;
        Ok(self.0.clone())
    }
}

/// [`Error::PasswordRequired`] whose repository path [`with_repository`] fills in.
fn required(detail: String) -> Error {
    Error::PasswordRequired {
        path: PathBuf::new(),
        detail,
    }
}

/// Fills the repository path of an [`Error::PasswordRequired`] a [`PasswordSource`] returned
/// without one.
pub(crate) fn with_repository(e: Error, root: &Path) -> Error {
    match e {
        Error::PasswordRequired { path, detail } if path.as_os_str().is_empty() => {
            Error::PasswordRequired {
                path: root.to_path_buf(),
                detail,
            }
        }
        e => e,
    }
}

fn check_not_empty(password: &str, what: &str) -> Result<()> {
    if password.is_empty() {
        return Err(required(format!(
            "{what} is empty; an empty password is refused"
        )));
    }
    Ok(())
}

/// The password in `bytes`: its first line, without `\n` or `\r\n`. `what` names where it
/// came from in the error ("--password-file /x"). Refused when empty or not UTF-8.
pub fn first_line(bytes: &[u8], what: &str) -> Result<Zeroizing<String>> {
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(n) => &bytes[..n],
        None => bytes,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line)
        .map_err(|_| required(format!("the password from {what} is not UTF-8 text")))?;
    check_not_empty(text, &format!("the password from {what}"))?;
    Ok(Zeroizing::new(text.to_string()))
}

/// The password in file `path` (its first line). The file may be a pipe (`/dev/stdin`):
/// reading stops at the first line end. `what` names the option ("--password-file").
pub fn read_password_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    let file = std::fs::File::open(path).ctx("read the password file", path)?;
    let mut line = Zeroizing::new(Vec::new());
    std::io::BufReader::new(file.take(MAX_PASSWORD_BYTES))
        .read_until(b'\n', &mut line)
        .ctx("read the password file", path)?;
    first_line(&line, &format!("{what} {}", path.display()))
}

/// The password `command` prints (the first line of its output), run through the platform
/// shell ([`crate::platform::shell`]).
pub fn run_password_command(command: &str) -> Result<Zeroizing<String>> {
    let out = crate::platform::shell::run_capture(command)
        .map_err(|e| required(format!("cannot run the password command `{command}`: {e}")))?;
    if !out.status.success() {
        return Err(required(format!(
            "the password command `{command}` failed ({})",
            out.status
        )));
    }
    first_line(&out.stdout, &format!("the password command `{command}`"))
}

/// Where [`Passwords`] takes the password from.
enum Origin {
    File { path: PathBuf, what: &'static str },
    Command(String),
    Value(Zeroizing<String>),
}

/// A function that asks the user for a password on a terminal (`purpose` says what for).
pub type Prompt = Box<dyn Fn(&str) -> Result<Zeroizing<String>> + Send + Sync>;

/// The command line's password source (module doc, "Where a password comes from"). The
/// password is fetched once, when first asked for, and kept.
pub struct Passwords {
    origin: Option<Origin>,
    prompt: Option<Prompt>,
    cache: Mutex<Option<Zeroizing<String>>>,
}

/// An environment variable's value; unset, empty and non-UTF-8 values are told apart.
fn env_text(value: Option<OsString>, name: &str) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .into_string()
            .map(Some)
            .map_err(|_| Error::InvalidArgument(format!("{name} is not UTF-8 text"))),
    }
}

impl Passwords {
    /// The source the options and environment values describe, in order of precedence:
    /// `file` (`--password-file`) or `command` (`--password-command`; both at once is an
    /// error), then `env_file` (`VOLBACK_PASSWORD_FILE`), then `env` (`VOLBACK_PASSWORD`).
    pub fn new(
        file: Option<PathBuf>,
        command: Option<String>,
        env_file: Option<OsString>,
        env: Option<OsString>,
    ) -> Result<Passwords> {
        let origin = match (file, command) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "--password-file and --password-command cannot be given together".into(),
                ));
            }
            (Some(path), None) => Some(Origin::File {
                path,
                what: "--password-file",
            }),
            (None, Some(c)) if c.trim().is_empty() => {
                return Err(Error::InvalidArgument("--password-command is empty".into()));
            }
            (None, Some(c)) => Some(Origin::Command(c)),
            (None, None) => {
                let env_file = match env_file {
                    Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
                    _ => None,
                };
                match env_file {
                    Some(path) => Some(Origin::File {
                        path,
                        what: "VOLBACK_PASSWORD_FILE",
                    }),
                    None => {
                        env_text(env, "VOLBACK_PASSWORD")?.map(|v| Origin::Value(Zeroizing::new(v)))
                    }
                }
            }
        };
        Ok(Passwords {
            origin,
            prompt: None,
            cache: Mutex::new(None),
        })
    }

    /// [`Passwords::new`] with `VOLBACK_PASSWORD_FILE` and `VOLBACK_PASSWORD` from the
    /// environment.
    pub fn from_env(file: Option<PathBuf>, command: Option<String>) -> Result<Passwords> {
        Passwords::new(
            file,
            command,
            std::env::var_os("VOLBACK_PASSWORD_FILE"),
            std::env::var_os("VOLBACK_PASSWORD"),
        )
    }

    /// Asks with `prompt` when no password was given (the binary passes one only when
    /// standard input and standard error are terminals).
    pub fn with_prompt(mut self, prompt: Prompt) -> Passwords {
        self.prompt = Some(prompt);
        self
    }

    /// Where the password comes from, for messages: "--password-file", "VOLBACK_PASSWORD"…;
    /// `None` when none was given.
    pub fn origin(&self) -> Option<&'static str> {
        self.origin.as_ref().map(|o| match o {
            Origin::File { what, .. } => *what,
            Origin::Command(_) => "--password-command",
            Origin::Value(_) => "VOLBACK_PASSWORD",
        })
    }

    /// The password fetched so far, if any (`mount` hands a typed one to its server).
    pub fn cached(&self) -> Option<Zeroizing<String>> {
        self.cache.lock().ok().and_then(|c| c.clone())
    }

    fn fetch(&self, purpose: &str) -> Result<Zeroizing<String>> {
        match &self.origin {
            Some(Origin::File { path, what }) => read_password_file(path, what),
            Some(Origin::Command(c)) => run_password_command(c),
            Some(Origin::Value(v)) => {
                check_not_empty(v, "VOLBACK_PASSWORD")?;
                Ok(v.clone())
            }
            None => match &self.prompt {
                Some(prompt) => {
                    let p = prompt(purpose)?;
                    check_not_empty(&p, "the password typed")?;
                    Ok(p)
                }
                None => Err(required(format!(
                    "no password was given and there is no terminal to ask for one; {HOW_TO_GIVE}"
                ))),
            },
        }
    }
}

impl PasswordSource for Passwords {
    fn given(&self) -> bool {
        self.origin.is_some()
    }

    fn password(&self, purpose: &str) -> Result<Zeroizing<String>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::internal("password source", "lock poisoned"))?;
        if let Some(p) = cache.as_ref() {
            return Ok(p.clone());
        }
        let p = self.fetch(purpose)?;
        *cache = Some(p.clone());
        Ok(p)
    }
}

/// True for a slot id: 16 lowercase hex digits (anything else in `keys/` is not a slot).
pub fn is_slot_id(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One slot file as read: its document, or why it cannot be used.
struct SlotFile {
    id: String,
    slot: std::result::Result<KeySlot, String>,
}

/// Every slot of the repository in `b`, sorted by id, each parsed and checked (not
/// unwrapped). More than [`MAX_SLOTS`] is an error; a damaged slot is returned as such.
fn read_slots(b: &dyn WriteBackend) -> Result<Vec<SlotFile>> {
    let root = b.display_path("");
    let mut ids = Vec::new();
    b.list(KEYS_DIR, &mut |m| {
        let name = backend::base_name(&m.name);
        if is_slot_id(name) {
            ids.push(name.to_string());
        }
        if ids.len() > MAX_SLOTS {
            return Err(Error::KeySlot {
                path: root.clone(),
                detail: format!(
                    "{} holds more than {MAX_SLOTS} key slots; refusing to try them",
                    b.display_path(KEYS_DIR).display()
                ),
            });
        }
        Ok(())
    })?;
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let key = backend::key(KEYS_DIR, &id);
        let slot = match b.get(&key, MAX_SLOT_BYTES, &format!("key slot {id}")) {
            Ok(bytes) => KeySlot::parse(&bytes).map_err(|e| e.to_string()),
            // A slot that vanished meanwhile (removed by another process) is not one.
            Err(e) if fsio::is_not_found(&e) => continue,
            Err(e @ (Error::Corrupt { .. } | Error::NotRegularFile { .. })) => Err(chain(&e)),
            Err(e) => return Err(e),
        };
        out.push(SlotFile { id, slot });
    }
    Ok(out)
}

/// What [`unlock`] found: the master key and the slot that gave it.
#[derive(Debug)]
pub(crate) struct Unlocked {
    pub master: MasterKey,
    pub slot: String,
}

/// Opens the master key of the repository at `root` (config id `repo_id`) with the password
/// from `source`: every usable slot is tried, in id order.
pub(crate) fn unlock(
    b: &dyn WriteBackend,
    repo_id: &str,
    source: &dyn PasswordSource,
) -> Result<Unlocked> {
    let root = &b.display_path("");
    let slots = read_slots(b)?;
    let mut problems: Vec<String> = Vec::new();
    let mut usable = Vec::new();
    for s in &slots {
        match &s.slot {
            Ok(slot) => usable.push((s.id.as_str(), slot)),
            Err(e) => problems.push(format!("slot {}: {e}", s.id)),
        }
    }
    if usable.is_empty() {
        let detail = if slots.is_empty() {
            format!(
                "{} holds no key slot: the repository cannot be opened",
                b.display_path(KEYS_DIR).display()
            )
        } else {
            format!("no usable key slot ({})", problems.join("; "))
        };
        return Err(Error::KeySlot {
            path: root.to_path_buf(),
            detail,
        });
    }
    let password = source
        .password(&format!("repository {}", root.display()))
        .map_err(|e| with_repository(e, root))?;
    for (id, slot) in &usable {
        match slot.unwrap_key(password.as_bytes(), repo_id, id) {
            Ok(master) => {
                return Ok(Unlocked {
                    master,
                    slot: id.to_string(),
                });
            }
            // parse() checked what unwrap_key checks besides the password.
            Err(SlotError::WrongPassword | SlotError::Invalid(_) | SlotError::Random(_)) => {}
        }
    }
    Err(Error::WrongPassword {
        path: root.to_path_buf(),
        slots: usable.len(),
    })
}

/// What `key list` shows of a slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotInfo {
    /// The slot id (its file name in `keys/`).
    pub id: String,
    /// When it was written (RFC 3339), as the slot says; `None` for a damaged slot.
    pub created: Option<String>,
    /// Its Argon2id parameters; `None` for a damaged slot.
    pub params: Option<KdfParams>,
    /// True for the slot the password in use opened.
    pub current: bool,
    /// Why the slot cannot be used (damaged, parameters outside the limits), if it cannot.
    pub problem: Option<String>,
}

/// The master key of an open encrypted repository.
fn master(repo: &Repository) -> Result<&MasterKey> {
    repo.master_key().ok_or_else(|| Error::KeySlot {
        path: repo.root().to_path_buf(),
        detail: "the repository is not encrypted: it has no key slots".into(),
    })
}

/// The slots of an encrypted repository, in id order.
pub fn list_slots(repo: &Repository) -> Result<Vec<SlotInfo>> {
    master(repo)?;
    let current = repo.current_slot();
    Ok(read_slots(repo.backend().as_ref())?
        .into_iter()
        .map(|s| {
            let is_current = current == Some(s.id.as_str());
            match s.slot {
                Ok(slot) => SlotInfo {
                    params: slot.params().ok(),
                    created: Some(slot.created),
                    id: s.id,
                    current: is_current,
                    problem: None,
                },
                Err(e) => SlotInfo {
                    id: s.id,
                    created: None,
                    params: None,
                    current: is_current,
                    problem: Some(e),
                },
            }
        })
        .collect())
}

/// Checks a new password and its parameters before anything is written.
fn check_new(password: &str, params: &KdfParams) -> Result<()> {
    if password.is_empty() {
        return Err(Error::InvalidArgument(
            "the new password is empty; an empty password is refused".into(),
        ));
    }
    params
        .check()
        .map_err(|e| Error::InvalidArgument(format!("key derivation parameters: {e}")))
}

/// Writes a new slot wrapping `master` under `password` in `root/keys/` (crash-safe, module
/// doc) and returns its id.
pub(crate) fn write_slot(
    b: &dyn WriteBackend,
    repo_id: &str,
    master: &MasterKey,
    password: &str,
    params: KdfParams,
) -> Result<String> {
    check_new(password, &params)?;
    let root = &b.display_path("");
    let (id, dest) = loop {
        let id = fsio::random_hex(8);
        let dest = backend::key(KEYS_DIR, &id);
        if matches!(b.head(&dest), Ok(None)) {
            break (id, dest);
        }
    };
    let created = crate::time::rfc3339(crate::time::now_unix());
    let slot =
        KeySlot::wrap(master, password.as_bytes(), params, repo_id, &id, created).map_err(|e| {
            Error::KeySlot {
                path: root.to_path_buf(),
                detail: format!("cannot write a new slot: {e}"),
            }
        })?;
    let json = serde_json::to_vec_pretty(&slot)
        .map_err(|e| Error::internal("key slots", format!("cannot encode a slot: {e}")))?;
    crate::prune::AbortPoint::from_env().at("key-slot-temp");
    b.put(&dest, &json, PutMode::Overwrite)?;
    Ok(id)
}

/// Removes slot `id` and makes the removal durable.
fn delete_slot(b: &dyn WriteBackend, id: &str) -> Result<()> {
    let key = backend::key(KEYS_DIR, id);
    match b.delete(&key)? {
        true => Ok(()),
        false => Err(Error::io(
            "remove",
            b.display_path(&key),
            std::io::ErrorKind::NotFound.into(),
        )),
    }
}

/// Adds a slot opened by `new_password`; returns its id. The repository must be open (with
/// another slot's password).
pub fn add_slot(repo: &Repository, new_password: &str, params: KdfParams) -> Result<String> {
    let master = master(repo)?;
    check_new(new_password, &params)?;
    let slots = read_slots(repo.backend().as_ref())?;
    if slots.len() >= MAX_SLOTS {
        return Err(Error::KeySlot {
            path: repo.root().to_path_buf(),
            detail: format!("it already has {MAX_SLOTS} slots, the most a repository may hold"),
        });
    }
    repo.backend().sweep_stale()?;
    write_slot(
        repo.backend().as_ref(),
        &repo.config().id,
        master,
        new_password,
        params,
    )
}

/// Removes slot `id`. Refused for the last slot and for the slot the repository was opened
/// with (open it with another password to remove that one, or use [`change_password`]).
pub fn remove_slot(repo: &Repository, id: &str) -> Result<()> {
    master(repo)?;
    let err = |detail: String| Error::KeySlot {
        path: repo.root().to_path_buf(),
        detail,
    };
    let slots = read_slots(repo.backend().as_ref())?;
    if !is_slot_id(id) || !slots.iter().any(|s| s.id == id) {
        return Err(err(format!(
            "it has no slot {id:?} (`volback key list` shows the slot ids)"
        )));
    }
    let usable_others = slots
        .iter()
        .filter(|s| s.id != id && s.slot.is_ok())
        .count();
    if usable_others == 0 {
        return Err(err(format!(
            "slot {id} is the last usable slot; without it the repository could not be opened"
        )));
    }
    if repo.current_slot() == Some(id) {
        return Err(err(format!(
            "slot {id} is the one this password opened; to remove it, use another slot's \
             password, or change the password with `volback key passwd`"
        )));
    }
    delete_slot(repo.backend().as_ref(), id)
}

/// Replaces the slot the repository was opened with by a new one opened by `new`; returns
/// the new slot's id. The new slot is durable before the old one is removed. The
/// [`Repository`] value still names the old slot as current: reopen to use the new one.
pub fn change_password(repo: &Repository, new: &str, params: KdfParams) -> Result<String> {
    let master = master(repo)?;
    let Some(old) = repo.current_slot() else {
        return Err(Error::internal(
            "key slots",
            "an encrypted repository was opened without a slot",
        ));
    };
    check_new(new, &params)?;
    repo.backend().sweep_stale()?;
    let id = write_slot(
        repo.backend().as_ref(),
        &repo.config().id,
        master,
        new,
        params,
    )?;
    crate::prune::AbortPoint::from_env().at("key-slot-written");
    delete_slot(repo.backend().as_ref(), old)?;
    Ok(id)
}

/// The smallest parameters [`LIMITS`] allows for one lane: what tests use.
pub const TEST_KDF: KdfParams = KdfParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
};

const _: () = assert!(*LIMITS.memory_kib.start() <= TEST_KDF.memory_kib);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{EncryptionInit, InitOptions};

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    fn init_encrypted(path: &Path, password: &str) -> Repository {
        let opts = InitOptions {
            encryption: Some(EncryptionInit {
                password: Zeroizing::new(password.into()),
                kdf: TEST_KDF,
            }),
            ..InitOptions::default()
        };
        Repository::init(path, &opts).unwrap()
    }

    fn open(path: &Path, password: &str) -> Result<Repository> {
        Repository::open_with(path, &FixedPassword::new(password))
    }

    fn slot_files(path: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path.join(KEYS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn password_sources_in_order_of_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let f1 = dir.path().join("f1");
        let f2 = dir.path().join("f2");
        std::fs::write(&f1, "from-option\n").unwrap();
        std::fs::write(&f2, "from-env-file\r\nsecond line\n").unwrap();
        let pw = |p: Passwords| p.password("test").unwrap().to_string();
        let all = Passwords::new(Some(f1.clone()), None, Some(f2.clone().into()), os("env"));
        assert_eq!(pw(all.unwrap()), "from-option");
        #[cfg(unix)]
        {
            let cmd = Passwords::new(
                None,
                Some("echo from-command".into()),
                Some(f2.clone().into()),
                os("env"),
            );
            assert_eq!(pw(cmd.unwrap()), "from-command");
        }
        let env_file = Passwords::new(None, None, Some(f2.clone().into()), os("env")).unwrap();
        assert_eq!(env_file.origin(), Some("VOLBACK_PASSWORD_FILE"));
        assert_eq!(pw(env_file), "from-env-file");
        let env = Passwords::new(None, None, None, os("from env")).unwrap();
        assert!(env.given());
        assert_eq!(pw(env), "from env");
        // Set but empty environment variables count as unset.
        let none = Passwords::new(None, None, os(""), os("")).unwrap();
        assert!(!none.given());
        let e = none.password("x").unwrap_err();
        assert!(matches!(e, Error::PasswordRequired { .. }), "{e}");
        let text = e.to_string();
        for way in [
            "--password-file",
            "--password-command",
            "VOLBACK_PASSWORD_FILE",
            "VOLBACK_PASSWORD",
            "no terminal",
        ] {
            assert!(text.contains(way), "{text}");
        }
        let both = Passwords::new(Some(f1), Some("echo x".into()), None, None);
        assert!(matches!(both, Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn the_prompt_is_asked_once_and_only_without_a_given_password() {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        let prompt: Prompt = Box::new(move |purpose| {
            assert_eq!(purpose, "repository /r");
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Zeroizing::new("typed".into()))
        });
        let p = Passwords::new(None, None, None, None)
            .unwrap()
            .with_prompt(prompt);
        assert!(!p.given(), "a prompt is not a given password");
        assert_eq!(&*p.password("repository /r").unwrap(), "typed");
        assert_eq!(&*p.password("repository /r").unwrap(), "typed");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        let empty: Prompt = Box::new(|_| Ok(Zeroizing::new(String::new())));
        let p = Passwords::new(None, None, None, None)
            .unwrap()
            .with_prompt(empty);
        assert!(matches!(
            p.password("x"),
            Err(Error::PasswordRequired { .. })
        ));
    }

    #[test]
    fn a_password_is_the_first_line_and_never_empty() {
        assert_eq!(&*first_line(b"pw\r\nmore\n", "t").unwrap(), "pw");
        assert_eq!(&*first_line(b"pw\nmore", "t").unwrap(), "pw");
        assert_eq!(&*first_line(b"p w \n", "t").unwrap(), "p w ");
        assert_eq!(&*first_line(b"no newline", "t").unwrap(), "no newline");
        for bad in [&b""[..], b"\n", b"\r\n", b"\nsecond", b"\xff\xfe\n"] {
            let e = first_line(bad, "the test").unwrap_err();
            assert!(matches!(e, Error::PasswordRequired { .. }), "{e}");
            assert!(e.to_string().contains("the test"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "\n").unwrap();
        let e = read_password_file(&f, "--password-file").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = read_password_file(&dir.path().join("missing"), "--password-file").unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        #[cfg(unix)]
        {
            let e = run_password_command("echo secret; exit 2").unwrap_err();
            assert!(e.to_string().contains("failed"), "{e}");
            let e = run_password_command("true").unwrap_err();
            assert!(e.to_string().contains("empty"), "{e}");
            assert_eq!(
                &*run_password_command("printf 'a b\\r\\nc'").unwrap(),
                "a b"
            );
        }
    }

    #[test]
    fn encrypted_repository_opens_with_its_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let r = init_encrypted(&path, "secret");
        assert_eq!(r.format_version(), 3);
        assert!(r.is_encrypted() && r.sealer().is_encrypted());
        let first = r.current_slot().unwrap().to_string();
        assert!(is_slot_id(&first));
        drop(r);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("config")).unwrap()).unwrap();
        assert_eq!(cfg["version"], 3);
        assert_eq!(cfg["encryption"]["aead"], "aes-256-gcm");
        assert_eq!(cfg["encryption"]["kdf"], "argon2id");
        assert_eq!(cfg["encryption"]["version"], 1);
        assert!(cfg["sealed"].as_str().unwrap().len() > 80);

        let r = open(&path, "secret").unwrap();
        assert_eq!(r.current_slot(), Some(first.as_str()));
        drop(r);
        let e = open(&path, "Secret").unwrap_err();
        assert!(
            matches!(e, Error::WrongPassword { slots: 1, ref path } if *path == dir.path().join("r")),
            "{e}"
        );
        let e = Repository::open(&path).unwrap_err();
        assert!(
            matches!(e, Error::PasswordRequired { ref path, .. } if *path == dir.path().join("r")),
            "{e}"
        );
        let e = Repository::open_with(&path, &FixedPassword::new("")).unwrap_err();
        assert!(matches!(e, Error::PasswordRequired { .. }), "{e}");
    }

    #[test]
    fn a_plain_repository_refuses_a_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain");
        let r = Repository::init(&path, &InitOptions::default()).unwrap();
        assert_eq!(r.format_version(), 2);
        assert!(!r.is_encrypted() && r.current_slot().is_none());
        assert!(!path.join(KEYS_DIR).exists());
        drop(r);
        let e = open(&path, "pw").unwrap_err();
        assert!(matches!(e, Error::PasswordForPlainRepository { .. }), "{e}");
        Repository::open(&path).unwrap();
        // Key commands on a plain repository: a clear error, nothing written.
        let r = Repository::open(&path).unwrap();
        assert!(matches!(list_slots(&r), Err(Error::KeySlot { .. })));
        assert!(matches!(
            add_slot(&r, "x", TEST_KDF),
            Err(Error::KeySlot { .. })
        ));
    }

    #[test]
    fn bad_init_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let enc = |pw: &str, kdf| {
            Some(EncryptionInit {
                password: Zeroizing::new(pw.into()),
                kdf,
            })
        };
        for opts in [
            InitOptions {
                encryption: enc("", TEST_KDF),
                ..InitOptions::default()
            },
            InitOptions {
                encryption: enc(
                    "x",
                    KdfParams {
                        iterations: 0,
                        ..TEST_KDF
                    },
                ),
                ..InitOptions::default()
            },
            InitOptions {
                encryption: enc("x", TEST_KDF),
                ..InitOptions::v1()
            },
            InitOptions {
                encryption: enc("x", TEST_KDF),
                chunk_hash: crate::hash::HashAlgorithm::Sha256,
                ..InitOptions::default()
            },
        ] {
            let e = Repository::init(&dir.path().join("r"), &opts).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(!dir.path().join("r").exists());
        }
    }

    #[test]
    fn slots_can_be_listed_added_removed_and_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let r = init_encrypted(&path, "one");
        let first = r.current_slot().unwrap().to_string();
        let list = list_slots(&r).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].current && list[0].problem.is_none());
        assert_eq!(list[0].params, Some(TEST_KDF));

        let second = add_slot(&r, "two", TEST_KDF).unwrap();
        assert_ne!(second, first);
        assert_eq!(slot_files(&path).len(), 2);
        drop(r);
        let r = open(&path, "two").unwrap();
        assert_eq!(r.current_slot(), Some(second.as_str()));
        let list = list_slots(&r).unwrap();
        assert_eq!(
            list.iter()
                .map(|s| (s.id.as_str(), s.current))
                .collect::<Vec<_>>(),
            {
                let mut v = vec![(first.as_str(), false), (second.as_str(), true)];
                v.sort();
                v
            }
        );
        // The slot in use is not removed; another one is.
        let e = remove_slot(&r, &second).unwrap_err();
        assert!(e.to_string().contains("key passwd"), "{e}");
        remove_slot(&r, &first).unwrap();
        assert_eq!(slot_files(&path), vec![second.clone()]);
        drop(r);
        assert!(matches!(
            open(&path, "one"),
            Err(Error::WrongPassword { .. })
        ));

        // The last slot is never removed.
        let r = open(&path, "two").unwrap();
        let e = remove_slot(&r, &second).unwrap_err();
        assert!(e.to_string().contains("last"), "{e}");
        for bad in ["../config", "0123456789abcdef", "", "ZZ"] {
            let e = remove_slot(&r, bad).unwrap_err();
            assert!(matches!(e, Error::KeySlot { .. }), "{e}");
        }
        assert!(path.join("config").exists());

        // passwd: the new password opens, the old one no longer does.
        let third = change_password(&r, "three", TEST_KDF).unwrap();
        assert_eq!(slot_files(&path), vec![third.clone()]);
        drop(r);
        assert!(matches!(
            open(&path, "two"),
            Err(Error::WrongPassword { .. })
        ));
        let r = open(&path, "three").unwrap();
        assert_eq!(r.current_slot(), Some(third.as_str()));
        // New passwords are checked before anything is written.
        assert!(matches!(
            add_slot(&r, "", TEST_KDF),
            Err(Error::InvalidArgument(_))
        ));
        let bad = KdfParams {
            memory_kib: u32::MAX,
            ..TEST_KDF
        };
        assert!(matches!(
            change_password(&r, "x", bad),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(slot_files(&path), vec![third]);
    }

    #[test]
    fn hostile_or_damaged_slots_are_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let r = init_encrypted(&path, "pw");
        let good = r.current_slot().unwrap().to_string();
        drop(r);
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join(KEYS_DIR).join(&good)).unwrap())
                .unwrap();
        let hostile = |field: &str, v: u64| {
            let mut d = doc.clone();
            d[field] = v.into();
            serde_json::to_vec(&d).unwrap()
        };
        let bytes = serde_json::to_vec(&doc).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("huge memory", hostile("memory_kib", u64::from(u32::MAX))),
            ("zero iterations", hostile("iterations", 0)),
            ("many iterations", hostile("iterations", 1 << 30)),
            ("truncated", bytes[..bytes.len() / 2].to_vec()),
            ("not json", b"\x00\x01garbage".to_vec()),
            ("huge file", vec![b' '; MAX_SLOT_BYTES as usize + 1]),
        ];
        let bad_id = "ffffffffffffffff";
        for (what, bytes) in &cases {
            std::fs::write(path.join(KEYS_DIR).join(bad_id), bytes).unwrap();
            // Beside a good slot: the good one still opens, and the bad one is listed.
            let started = std::time::Instant::now();
            let r = open(&path, "pw").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(started.elapsed().as_secs() < 5, "{what}");
            let listed = list_slots(&r).unwrap();
            let bad = listed.iter().find(|s| s.id == bad_id).unwrap();
            assert!(bad.problem.is_some() && bad.params.is_none(), "{what}");
            // Never the last usable one: the good slot cannot go while it is the only one.
            drop(r);
            // Alone: a key slot error naming the slot, without asking for the password.
            std::fs::rename(path.join(KEYS_DIR).join(&good), dir.path().join("kept")).unwrap();
            let e = Repository::open(&path).unwrap_err();
            assert!(
                matches!(e, Error::KeySlot { .. }) && e.to_string().contains(bad_id),
                "{what}: {e}"
            );
            std::fs::rename(dir.path().join("kept"), path.join(KEYS_DIR).join(&good)).unwrap();
        }
        // A symbolic link where a slot belongs is not followed.
        #[cfg(unix)]
        {
            std::fs::remove_file(path.join(KEYS_DIR).join(bad_id)).unwrap();
            std::os::unix::fs::symlink(
                path.join(KEYS_DIR).join(&good),
                path.join(KEYS_DIR).join(bad_id),
            )
            .unwrap();
            let r = open(&path, "pw").unwrap();
            assert_eq!(r.current_slot(), Some(good.as_str()));
            let listed = list_slots(&r).unwrap();
            assert!(listed.iter().any(|s| s.id == bad_id && s.problem.is_some()));
        }
        // Too many slot files: refused before reading them.
        for i in 0..=MAX_SLOTS {
            std::fs::write(path.join(KEYS_DIR).join(format!("{i:016x}")), b"{}").unwrap();
        }
        let e = open(&path, "pw").unwrap_err();
        assert!(
            matches!(e, Error::KeySlot { .. }) && e.to_string().contains("more than"),
            "{e}"
        );
        // No slot at all.
        std::fs::remove_dir_all(path.join(KEYS_DIR)).unwrap();
        std::fs::create_dir(path.join(KEYS_DIR)).unwrap();
        let e = open(&path, "pw").unwrap_err();
        assert!(matches!(e, Error::KeySlot { .. }), "{e}");
    }

    #[test]
    fn a_changed_config_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        drop(init_encrypted(&path, "pw"));
        let cfg_path = path.join("config");
        let original = std::fs::read(&cfg_path).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&original).unwrap();
        let write = |d: &serde_json::Value| {
            std::fs::write(&cfg_path, serde_json::to_vec_pretty(d).unwrap()).unwrap()
        };
        let mut d = doc.clone();
        d["zstd_level"] = 19.into();
        write(&d);
        let e = open(&path, "pw").unwrap_err();
        assert!(e.to_string().contains("config was changed"), "{e}");
        let mut d = doc.clone();
        d["id"] = "00112233445566778899aabbccddeeff".into();
        write(&d);
        // Another repository id: the slots no longer open (their AAD names the id).
        assert!(open(&path, "pw").is_err());
        let mut d = doc.clone();
        let mut sealed = d["sealed"].as_str().unwrap().to_string();
        let last = if sealed.ends_with('0') { "1" } else { "0" };
        sealed.replace_range(sealed.len() - 1.., last);
        d["sealed"] = sealed.into();
        write(&d);
        let e = open(&path, "pw").unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        let mut d = doc.clone();
        d["encryption"]["version"] = 2.into();
        write(&d);
        let e = open(&path, "pw").unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
        // Downgrades: version 2 with encryption fields is damage; without them it is a
        // plain repository, which a password refuses.
        let mut d = doc.clone();
        d["version"] = 2.into();
        write(&d);
        assert!(matches!(
            Repository::open(&path),
            Err(Error::Corrupt { .. })
        ));
        let mut d = doc.clone();
        d["version"] = 2.into();
        d.as_object_mut().unwrap().remove("encryption");
        d.as_object_mut().unwrap().remove("sealed");
        write(&d);
        let e = open(&path, "pw").unwrap_err();
        assert!(matches!(e, Error::PasswordForPlainRepository { .. }), "{e}");
        let mut d = doc.clone();
        d.as_object_mut().unwrap().remove("sealed");
        write(&d);
        assert!(matches!(open(&path, "pw"), Err(Error::Corrupt { .. })));
        std::fs::write(&cfg_path, &original).unwrap();
        open(&path, "pw").unwrap();
    }

    /// Runs in a child process of [`crash_points_keep_a_password_working`]: does the slot
    /// change named by `VOLBACK_KEYS_CRASH_OP` in the repository `VOLBACK_KEYS_CRASH_REPO`,
    /// where `VOLBACK_TEST_ABORT_AT` aborts it. Does nothing in a normal test run.
    #[test]
    fn crash_child() {
        let (Some(repo), Some(op)) = (
            std::env::var_os("VOLBACK_KEYS_CRASH_REPO"),
            std::env::var("VOLBACK_KEYS_CRASH_OP").ok(),
        ) else {
            return;
        };
        let r = open(Path::new(&repo), "old").unwrap();
        match op.as_str() {
            "add" => drop(add_slot(&r, "new", TEST_KDF)),
            _ => drop(change_password(&r, "new", TEST_KDF)),
        }
        panic!("the abort point was not reached");
    }

    #[test]
    fn crash_points_keep_a_password_working() {
        let exe = std::env::current_exe().unwrap();
        for (op, point, old_opens, new_opens) in [
            ("add", "key-slot-temp", true, false),
            ("passwd", "key-slot-temp", true, false),
            ("passwd", "key-slot-written", true, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r");
            drop(init_encrypted(&path, "old"));
            let status = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "repo::keys::tests::crash_child",
                    "--test-threads=1",
                ])
                .env("VOLBACK_KEYS_CRASH_REPO", &path)
                .env("VOLBACK_KEYS_CRASH_OP", op)
                .env("VOLBACK_TEST_ABORT_AT", point)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!status.success(), "{op} {point}: the child did not abort");
            let files = slot_files(&path);
            let temps = files.iter().filter(|f| f.starts_with(".tmp-")).count();
            // Slots are published whole (a temporary file renamed): none is left behind.
            assert_eq!(temps, 0, "{op} {point}: {files:?}");
            assert_eq!(open(&path, "old").is_ok(), old_opens, "{op} {point}");
            assert_eq!(open(&path, "new").is_ok(), new_opens, "{op} {point}");
            // The next change cleans the leftover temporary file and works.
            let r = open(&path, "old").unwrap();
            add_slot(&r, "again", TEST_KDF).unwrap();
            assert!(
                slot_files(&path).iter().all(|f| is_slot_id(f)),
                "{op} {point}"
            );
        }
    }
}
