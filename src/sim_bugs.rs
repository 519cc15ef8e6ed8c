//! Bugs the simulator switches on, one at a time, to prove it finds them (issue #11.9).
//!
//! They are compiled in only with the `sim-bugs` cargo feature (enabled by `citycard-sim`'s
//! `bugs` feature, never by the server): without it [`active`] is the constant `false` and the
//! hooks compile away. The switch is per thread, so seeds run in parallel threads of one test
//! binary do not see each other's bug.

/// An injectable bug; each names the hook that implements it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// `Journal::commit` returns before its data sync: answers go out for records a crash
    /// can still lose (journal/mod.rs, `write_and_sync`).
    AckBeforeSync,
    /// The ATC freshness check is `>=` instead of `>`: the card's last ATC is decided again
    /// (engine/auth.rs, `atc_use`).
    AtcOffByOne,
    /// The (terminal, op_ref) lookup forgets the overlay and reads only sled: a staff operation
    /// retried before sled has it is executed again (engine/walk.rs, `op_entry`).
    ForgetOverlay,
    /// A sled batch records its applied_seq (and digest) but leaves the changed cards for the
    /// next batch: applied_seq is persisted before its data (engine/persist.rs, `seal`).
    AppliedSeqBeforeData,
    /// Recovery leaves a torn tail's bytes in place instead of zeroing them
    /// (journal/mod.rs, `open_at`).
    TornTailKept,
    /// Replay starts one record late: `seq <= applied_seq + 1` is skipped instead of
    /// `seq <= applied_seq` (engine/open.rs, `open`).
    ReplaySkipsOne,
    /// A confirmed PostgreSQL commit releases the next group commit's replies too, before
    /// PostgreSQL has their records (replicate/flow.rs, `release`).
    ReleaseEarly,
}

impl Bug {
    pub const ALL: [Bug; 7] = [
        Bug::AckBeforeSync,
        Bug::AtcOffByOne,
        Bug::ForgetOverlay,
        Bug::AppliedSeqBeforeData,
        Bug::TornTailKept,
        Bug::ReplaySkipsOne,
        Bug::ReleaseEarly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeSync => "ack-before-sync",
            Bug::AtcOffByOne => "atc-off-by-one",
            Bug::ForgetOverlay => "forget-overlay",
            Bug::AppliedSeqBeforeData => "applied-seq-before-data",
            Bug::TornTailKept => "torn-tail-kept",
            Bug::ReplaySkipsOne => "replay-skips-one",
            Bug::ReleaseEarly => "release-early",
        }
    }

    pub fn parse(name: &str) -> Result<Bug, String> {
        Bug::ALL.into_iter().find(|b| b.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown bug {name:?}; one of {}", names.join(", "))
        })
    }
}

/// Whether the hooks are compiled in.
pub const COMPILED: bool = cfg!(feature = "sim-bugs");

#[cfg(feature = "sim-bugs")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Bug>> = const { std::cell::Cell::new(None) };
}

/// Switches a bug on for this thread (`None`: off). Without the feature, nothing happens.
pub fn set(bug: Option<Bug>) {
    #[cfg(feature = "sim-bugs")]
    ACTIVE.with(|a| a.set(bug));
    #[cfg(not(feature = "sim-bugs"))]
    let _ = bug;
}

/// Whether `bug` is switched on for this thread; always `false` without the feature.
#[inline(always)]
pub fn active(bug: Bug) -> bool {
    #[cfg(feature = "sim-bugs")]
    {
        ACTIVE.with(|a| a.get() == Some(bug))
    }
    #[cfg(not(feature = "sim-bugs"))]
    {
        let _ = bug;
        false
    }
}
