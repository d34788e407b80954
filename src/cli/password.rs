//! Passwords on the command line: the repository password source every command that opens a
//! repository uses ([`source`]), the first password of `init` and the new password of
//! `key add` / `key passwd` ([`new_password`]). A prompt only when standard input and
//! standard error are terminals; otherwise a clear error, never a wait.

use super::args::{NewPasswordArgs, PasswordArgs};
use anyhow::{Result, bail};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use volback::Error;
use volback::repo::Repository;
use volback::repo::keys::{HOW_TO_GIVE, PasswordSource, Passwords, read_password_file};
use zeroize::Zeroizing;

/// True when a password can be asked for: standard input and standard error are terminals.
pub fn can_prompt() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks once on the terminal (without echo).
fn ask(prompt: &str) -> volback::Result<Zeroizing<String>> {
    rpassword::prompt_password(prompt)
        .map(Zeroizing::new)
        .map_err(|e| Error::PasswordRequired {
            path: PathBuf::new(),
            detail: format!("cannot read it from the terminal: {e}"),
        })
}

/// The repository password source the options and the environment describe, asking on the
/// terminal when there is one and nothing was given.
pub fn source(a: &PasswordArgs) -> Result<Passwords> {
    let p = Passwords::from_env(a.password_file.clone(), a.password_command.clone())?;
    Ok(match can_prompt() {
        true => p.with_prompt(Box::new(|purpose| {
            ask(&format!("password for {purpose}: "))
        })),
        false => p,
    })
}

/// Opens the repository at `repo` with the password the options and environment give.
pub fn open(repo: &Path, a: &PasswordArgs) -> Result<Repository> {
    Ok(Repository::open_with(repo, &source(a)?)?)
}

/// Asks twice on the terminal; the two must match and not be empty.
fn ask_twice(what: &str) -> Result<Zeroizing<String>> {
    let first = ask(&format!("{what}: "))?;
    if first.is_empty() {
        bail!("the password is empty; an empty password is refused");
    }
    let second = ask("repeat it: ")?;
    if *first != *second {
        bail!("the two passwords differ; nothing was changed");
    }
    Ok(first)
}

/// The first password of a new repository: the repository password options and
/// environment, else asked twice on a terminal.
pub fn init_password(a: &PasswordArgs, repo: &Path) -> Result<Zeroizing<String>> {
    let p = Passwords::from_env(a.password_file.clone(), a.password_command.clone())?;
    if p.given() {
        return Ok(p.password(&format!("new repository {}", repo.display()))?);
    }
    if can_prompt() {
        return ask_twice(&format!("password for new repository {}", repo.display()));
    }
    bail!(
        "a new repository is encrypted and needs a password, and there is no terminal to ask \
         for one; {HOW_TO_GIVE} (or create a plain repository with --no-encryption)"
    )
}

/// The new password of `key add` / `key passwd`: `--new-password-file`, else
/// `VOLBACK_NEW_PASSWORD`, else asked twice on a terminal.
pub fn new_password(a: &NewPasswordArgs, repo: &Path) -> Result<Zeroizing<String>> {
    if let Some(f) = &a.new_password_file {
        return Ok(read_password_file(f, "--new-password-file")?);
    }
    if let Some(v) = std::env::var_os("VOLBACK_NEW_PASSWORD").filter(|v| !v.is_empty()) {
        let Ok(v) = v.into_string() else {
            bail!("VOLBACK_NEW_PASSWORD is not UTF-8 text");
        };
        return Ok(Zeroizing::new(v));
    }
    if can_prompt() {
        return ask_twice(&format!("new password for repository {}", repo.display()));
    }
    bail!(
        "no new password was given and there is no terminal to ask for one; give it with \
         --new-password-file FILE or the environment variable VOLBACK_NEW_PASSWORD"
    )
}
