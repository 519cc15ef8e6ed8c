//! What a data directory records about its place in the replicated pair: `data/replication`,
//! two lines, `role primary|standby` and `generation N`, written durably.
//!
//! The generation is the fence: it is raised in PostgreSQL by `citycard promote`, and a
//! primary whose recorded generation is lower than PostgreSQL's may neither commit nor answer.

use std::path::{Path, PathBuf};

use super::ReplicateError;

/// The file in the data directory.
pub const SITE_FILE: &str = "replication";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    pub role: Role,
    pub generation: u64,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SITE_FILE)
}

impl Site {
    /// The recorded site, or None for a data directory never replicated.
    pub fn load(data_dir: &Path) -> Result<Option<Site>, ReplicateError> {
        let path = path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ReplicateError::Site(format!("{}: {e}", path.display()))),
        };
        let bad = |why: &str| ReplicateError::Site(format!("{}: {why}", path.display()));
        let mut role = None;
        let mut generation = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("role", "primary")) => role = Some(Role::Primary),
                Some(("role", "standby")) => role = Some(Role::Standby),
                Some(("generation", n)) => {
                    generation = Some(n.trim().parse::<u64>().map_err(|_| bad("bad generation"))?)
                }
                _ if line.trim().is_empty() => {}
                _ => return Err(bad("unknown line")),
            }
        }
        match (role, generation) {
            (Some(role), Some(generation)) => Ok(Some(Site { role, generation })),
            _ => Err(bad("needs a role and a generation line")),
        }
    }

    pub fn store(&self, data_dir: &Path) -> Result<(), ReplicateError> {
        let role = match self.role {
            Role::Primary => "primary",
            Role::Standby => "standby",
        };
        let text = format!("role {role}\ngeneration {}\n", self.generation);
        let path = path(data_dir);
        crate::durable_write(&path, text.as_bytes())
            .map_err(|e| ReplicateError::Site(format!("{}: {e}", path.display())))
    }
}

/// A data directory that is a standby, or a replicated primary, refuses to serve without
/// `[replicate]`: serving it alone would fork its journal from the other site's.
pub fn refuse_unreplicated_standby(data_dir: &Path) -> Result<(), ReplicateError> {
    match Site::load(data_dir)? {
        Some(Site { role: Role::Standby, .. }) => Err(ReplicateError::Site(format!(
            "{} is a standby's data directory: run `citycard promote` first",
            data_dir.display()
        ))),
        Some(Site { role: Role::Primary, generation }) => Err(ReplicateError::Site(format!(
            "{} is replicated (generation {generation}) but no [replicate] section is              configured: serving it alone would fork it from the other site; configure              [replicate], or remove {} to leave replication for good",
            data_dir.display(),
            path(data_dir).display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        assert!(matches!(Site::load(dir.path()), Ok(None)));
        let site = Site { role: Role::Standby, generation: 7 };
        assert!(site.store(dir.path()).is_ok());
        assert_eq!(Site::load(dir.path()).ok().flatten(), Some(site));
        let _ = std::fs::write(path(dir.path()), "role primary\ngeneration x\n");
        assert!(Site::load(dir.path()).is_err());
    }
}
