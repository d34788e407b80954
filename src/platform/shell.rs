//! Running a user's command through the platform shell: `sh -c CMD` on Unix, `cmd /C CMD` on
//! Windows. Used by `--password-command` (the password is the first line of its output).
//!
//! The command inherits standard input and standard error, so it can ask on the terminal
//! (a pinentry, a hardware token) and report its own errors; its standard output is captured.

use std::io::{self, Read};
use std::process::{Command, ExitStatus, Stdio};

/// The most bytes of output kept from a command; a password is the first line of it.
pub const MAX_OUTPUT: u64 = 64 * 1024;

/// What a command wrote on its standard output (at most [`MAX_OUTPUT`] bytes) and how it
/// ended.
#[derive(Debug)]
pub struct CommandOutput {
    pub stdout: zeroize::Zeroizing<Vec<u8>>,
    pub status: ExitStatus,
}

/// The platform shell invocation for `command`.
fn shell(command: &str) -> Command {
    #[cfg(windows)]
    {
        let mut c = Command::new("cmd");
        c.arg("/C").arg(command);
        c
    }
    #[cfg(not(windows))]
    {
        let mut c = Command::new("sh");
        c.arg("-c").arg(command);
        c
    }
}

/// Runs `command` through the shell and waits for it. An error only when it cannot be
/// started or its output cannot be read; a failing command is a non-success `status`.
pub fn run_capture(command: &str) -> io::Result<CommandOutput> {
    let mut child = shell(command)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = zeroize::Zeroizing::new(Vec::new());
    let read = match child.stdout.take() {
        Some(out) => out.take(MAX_OUTPUT).read_to_end(&mut stdout).map(|_| ()),
        None => Ok(()),
    };
    // Waited for even when reading failed, so no zombie is left; the pipe is closed by now,
    // so a command still writing gets EPIPE rather than blocking.
    let status = child.wait()?;
    read?;
    Ok(CommandOutput { stdout, status })
}

/// The commands are `sh` syntax: Unix only.
#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_and_status() {
        let out = run_capture("printf 'secret\\nsecond line\\n'").unwrap();
        assert!(out.status.success());
        assert_eq!(&out.stdout[..], b"secret\nsecond line\n");
        let out = run_capture("echo x; exit 3").unwrap();
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn output_is_bounded() {
        let out = run_capture("head -c 200000 /dev/zero").unwrap();
        assert_eq!(out.stdout.len() as u64, MAX_OUTPUT);
    }
}
