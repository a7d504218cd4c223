//! The migrations' records on disk: one `<id>.migration.json` per migration in
//! `migrations/` under the agent's state directory, replaced atomically (written to a temporary file, fsync'd,
//! renamed, the directory fsync'd), so a crash leaves either the old record or the new.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::record::{MigrationId, MigrationRecord};

const SUFFIX: &str = ".migration.json";

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal in `state_dir/migrations` (made if missing).
    pub fn new(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("migrations");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn path(&self, id: &MigrationId) -> PathBuf {
        self.dir.join(format!("{id}{SUFFIX}"))
    }

    /// Writes the record durably (mode 600: it holds the peer's token).
    pub fn save(&self, record: &MigrationRecord) -> Result<()> {
        let path = self.path(record.id());
        let tmp = self.dir.join(format!(".{}{SUFFIX}.tmp", record.id()));
        let text = serde_json::to_vec_pretty(record).context("serializing the record")?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing {}", self.dir.display()))?;
        Ok(())
    }

    /// Every record; an unreadable one is reported and skipped (kept on disk for people).
    pub fn load_all(&self) -> Vec<MigrationRecord> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let is_record = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'));
            if !is_record {
                continue;
            }
            match fs::read(&path)
                .context("reading")
                .and_then(|text| serde_json::from_slice(&text).context("parsing"))
            {
                Ok(record) => out.push(record),
                Err(err) => tracing::warn!("skipping the record {}: {err:#}", path.display()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_record_loads_back_and_a_torn_one_is_skipped() {
        let dir = std::env::temp_dir().join(format!("movarto-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let journal = Journal::new(&dir).expect("journal");
        let record: MigrationRecord =
            serde_json::from_str(super::super::tests::RECORD).expect("record");
        journal.save(&record).expect("save");
        journal.save(&record).expect("save again");
        fs::write(dir.join("migrations/torn.migration.json"), b"{\"spec\":").expect("torn");
        let loaded = journal.load_all();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id(), record.id());
        let _ = fs::remove_dir_all(&dir);
    }
}
