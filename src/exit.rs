//! Exit codes: which way `tally serve` (or `tally visits`) failed, from
//! sysexits.h, so a restart loop or an operator can tell a bad setting from
//! a damaged volume from a volume another process holds, and none of them
//! from a crash (1). [`CODES`] is printed after `tally --help`;
//! docs/exit-codes.md has the same table.

use crate::config::EXIT_CONFIG;
use crate::peers::PeersError;
use crate::serve::StartError;
use crate::store::StoreError;
use crate::store::file::FileError;
use crate::store::lock::LockError;

/// A data file is corrupt or not in a format tally reads (`EX_DATAERR`).
pub const DATAERR: u8 = 65;
/// The data directory or a file in it cannot be created or written
/// (`EX_CANTCREAT`).
pub const CANTCREAT: u8 = 73;
/// Reading the data directory failed (`EX_IOERR`).
pub const IOERR: u8 = 74;
/// Another process holds the data directory's lock: retrying later can
/// work (`EX_TEMPFAIL`).
pub const TEMPFAIL: u8 = 75;

/// Every exit code with its meaning.
pub const CODES: &[(u8, &str)] = &[
    (0, "stopped by SIGTERM or SIGINT after draining"),
    (
        1,
        "any other failure (a port already taken, the DNS configuration, a crash)",
    ),
    (
        EXIT_CONFIG,
        "a setting is unknown, unreadable or invalid (EX_USAGE)",
    ),
    (
        DATAERR,
        "a data file is corrupt, truncated or not tally's, or visits.state is missing from a directory that served one, or links to nothing (EX_DATAERR)",
    ),
    (
        CANTCREAT,
        "the data directory or a file in it cannot be created or written (EX_CANTCREAT)",
    ),
    (IOERR, "a data file could not be read (EX_IOERR)"),
    (
        TEMPFAIL,
        "another tally process holds the data directory's lock (EX_TEMPFAIL)",
    ),
];

/// The exit code for a failed start.
pub fn of_start(error: &StartError) -> u8 {
    match error {
        StartError::Identity(_) | StartError::TokenFile { .. } | StartError::EmptyToken(_) => {
            EXIT_CONFIG
        }
        StartError::Store(error) => of_store(error),
        StartError::Peers(error) => of_peers(error),
        StartError::Discovery(_) | StartError::Listen { .. } => 1,
    }
}

/// Exhaustive on purpose: a new way for the store to fail needs its code.
pub fn of_store(error: &StoreError) -> u8 {
    match error {
        // `Identity`: this pod's identity does not fit the file's format.
        // `Lost`, `Dangling`: the directory's files are not what its past
        // says they should be; `Exists`: `new-incarnation` on a counter.
        StoreError::Corrupt { .. }
        | StoreError::Identity { .. }
        | StoreError::Lost { .. }
        | StoreError::Dangling { .. }
        | StoreError::Exists { .. } => DATAERR,
        StoreError::Read { .. } => IOERR,
        StoreError::Lock(LockError::Held { .. }) => TEMPFAIL,
        StoreError::Lock(LockError::Io { .. })
        | StoreError::DataDir { .. }
        | StoreError::Init { .. } => CANTCREAT,
        // A running store's failures; none ends the process today, but if
        // one ever does, it is an I/O failure.
        StoreError::Unavailable(_) | StoreError::Stalled(_) | StoreError::Closed => IOERR,
    }
}

/// `peers.state` is the data directory's too: the same codes.
pub fn of_peers(error: &PeersError) -> u8 {
    match error {
        PeersError::File(FileError::Corrupt { .. }) | PeersError::BadState { .. } => DATAERR,
        PeersError::File(FileError::Io { .. }) => IOERR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_list_every_exit_code() {
        let docs = include_str!("../docs/exit-codes.md");
        for (code, _) in CODES {
            let row = format!("| `{code}` |");
            assert!(
                docs.lines().any(|l| l.starts_with(&row)),
                "docs/exit-codes.md has no row for {code}"
            );
        }
    }
}
