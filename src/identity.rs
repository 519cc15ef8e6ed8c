//! Terminal identity: the role (certificate subject OU) and the terminal id (subject CN) that
//! the server reads from a client certificate and the keys tooling writes into one.

use std::fmt;
use std::str::FromStr;

use crate::keys::KeysError;

/// The kind of terminal a client certificate belongs to (certificate subject OU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Reader,
    Kiosk,
    Counter,
    /// A monitoring system (Prometheus): may scrape the admin listener over TLS, may not open
    /// a terminal connection (the terminal listener closes it right after the handshake).
    Monitor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Reader, Role::Kiosk, Role::Counter, Role::Monitor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Kiosk => "kiosk",
            Role::Counter => "counter",
            Role::Monitor => "monitor",
        }
    }

    /// True for the roles that speak the terminal protocol.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Role::Monitor)
    }
}

impl FromStr for Role {
    type Err = KeysError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(Role::Reader),
            "kiosk" => Ok(Role::Kiosk),
            "counter" => Ok(Role::Counter),
            "monitor" => Ok(Role::Monitor),
            other => Err(KeysError::InvalidRole(other.to_string())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated terminal id: 1..=32 bytes of `[A-Za-z0-9._-]` (certificate subject CN, and
/// the file stem under `terminals/`). Ids `.` and `..` are rejected as well.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TerminalId(String);

impl TerminalId {
    pub const MAX_LEN: usize = 32;

    pub fn new(id: impl Into<String>) -> Result<Self, KeysError> {
        let id = id.into();
        let valid_chars =
            id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if id.is_empty() || id.len() > Self::MAX_LEN || !valid_chars || id == "." || id == ".." {
            return Err(KeysError::InvalidTerminalId(id));
        }
        Ok(TerminalId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TerminalId {
    type Err = KeysError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TerminalId::new(s)
    }
}

impl AsRef<str> for TerminalId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
