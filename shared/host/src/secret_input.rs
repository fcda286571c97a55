//! Names, phone numbers and PINs given as a bare flag (`--name`, `--phone`, `--pin`, ...): read
//! from stdin, one line each in the order the command asks for them, with a prompt on stderr
//! and, for a PIN, no echo when stdin is a terminal. A command line stays in shell history and
//! is readable by every user in `/proc/PID/cmdline`; stdin is neither. A value given inline
//! still works for scripts, with a warning.

use std::io::{IsTerminal, Write};

/// Whether a value read from a terminal is shown as it is typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Names and phone numbers.
    On,
    /// PINs.
    Off,
}

/// Why a bare flag's value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretInputError {
    /// Reading stdin (or switching the terminal's echo) failed.
    #[error("cannot read the {what} ({flag}) from stdin: {source}")]
    Read {
        /// The flag.
        flag: String,
        /// What the value is.
        what: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// Stdin ended before this flag's line.
    #[error(
        "{flag} was given without a value, so the {what} is read from stdin, but stdin ended first: send one line per such flag ({order})"
    )]
    Ended {
        /// The flag.
        flag: String,
        /// What the value is.
        what: String,
        /// The order the command reads bare flags in.
        order: &'static str,
    },
}

/// Reads the values of one command's bare flags.
pub struct SecretInput {
    program: &'static str,
    order: &'static str,
    terminal: bool,
}

impl SecretInput {
    /// For `program` (named in warnings), whose bare flags are read in `order` (said when
    /// stdin ends early, e.g. "name, then phone, then PIN").
    pub fn new(program: &'static str, order: &'static str) -> SecretInput {
        SecretInput {
            program,
            order,
            terminal: std::io::stdin().is_terminal(),
        }
    }

    /// The flag's value: `given` as typed on the command line (with a warning), else one line
    /// of stdin.
    pub fn value(
        &self,
        flag: &str,
        what: &str,
        given: Option<String>,
        echo: Echo,
    ) -> Result<String, SecretInputError> {
        if let Some(v) = given {
            eprintln!(
                "{}: warning: {flag} VALUE stays in shell history and is visible to other users in /proc; give {flag} alone and type the value, or pipe it on stdin",
                self.program
            );
            return Ok(v);
        }
        let line = if self.terminal {
            eprint!("{what}: ");
            let _ = std::io::stderr().flush();
            let line = if echo == Echo::Off {
                read_line_without_echo()
            } else {
                read_stdin_line()
            };
            if echo == Echo::Off {
                eprintln!();
            }
            line
        } else {
            read_stdin_line()
        };
        match line {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(SecretInputError::Ended {
                flag: flag.to_owned(),
                what: what.to_owned(),
                order: self.order,
            }),
            Err(source) => Err(SecretInputError::Read {
                flag: flag.to_owned(),
                what: what.to_owned(),
                source,
            }),
        }
    }
}

/// One line of stdin without surrounding whitespace; `None` at end of input.
fn read_stdin_line() -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim().to_owned()))
}

/// One line from the terminal on stdin with echo off, restored afterwards.
fn read_line_without_echo() -> std::io::Result<Option<String>> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Flush, &quiet)?;
    let line = read_stdin_line();
    tcsetattr(&stdin, OptionalActions::Now, &saved)?;
    line
}
