//! Exit codes, named once: `mqseal --help`, the README and scripts rely on
//! these numbers, so they are an enum rather than literals spread over the
//! subcommands.

use mqseal_controller::session::SessionError;

/// How `mqseal` ends. Ordered from best to worst: when one run has several
/// outcomes (a broadcast), the worst one is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// Everything asked for was done.
    Ok = 0,
    /// A local problem: config, files, store.
    Local = 1,
    /// The command line or the command itself is wrong.
    Usage = 2,
    /// A device answered with a failure, or refused the command.
    Failed = 3,
    /// No authenticated answer in time.
    TimedOut = 4,
    /// The broker could not be reached, or refused the login.
    Broker = 5,
    /// `mqseal audit verify`: a stored record does not verify.
    Unverified = 6,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The exit codes as `--help` states them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes: 0 success, 1 local error (config, files, store), 2 usage,
3 the device answered with a failure, 4 timeout (no authenticated answer),
5 broker unreachable or login refused, 6 an audit record does not verify.";

/// A failure with its exit code.
pub struct Failure {
    /// How the process ends.
    pub exit: Exit,
    /// What went wrong, for a person.
    pub message: String,
}

impl Failure {
    /// A local problem (exit 1).
    pub fn local(message: impl std::fmt::Display) -> Failure {
        Failure { exit: Exit::Local, message: message.to_string() }
    }

    /// A usage problem (exit 2).
    pub fn usage(message: impl std::fmt::Display) -> Failure {
        Failure { exit: Exit::Usage, message: message.to_string() }
    }
}

impl From<SessionError> for Failure {
    fn from(e: SessionError) -> Failure {
        match e {
            SessionError::Client(c) => Failure::local(c),
            e @ SessionError::Journal(_) => Failure::local(e),
            e @ SessionError::InvalidCommand(_) => Failure::usage(e),
            other => Failure { exit: Exit::Broker, message: other.to_string() },
        }
    }
}
