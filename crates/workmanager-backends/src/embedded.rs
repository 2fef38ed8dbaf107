//! The embedded state store: one redb file, no set-up. Every commit is
//! durable (fsynced) before it returns, so a write that was acknowledged
//! survives a crash. redb holds an exclusive lock on the file, so one
//! process owns it: the store reports itself as not shared.
//!
//! Each value is stored as an 8-byte little-endian version followed by the
//! payload; the version starts at 1 and grows with every write of the key.
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use workmanager_core::store::Version;
use workmanager_core::{Precondition, StateStore, StoreError, Versioned, WriteOp};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database file, creating parent directories.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot open state file {}: {e}", path.display()))
        })?;
        // Make sure the table exists so reads never see "no such table".
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(KV).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn split(raw: &[u8]) -> Result<(Version, &[u8]), StoreError> {
    if raw.len() < 8 {
        return Err(StoreError::Corrupt(
            "stored value shorter than its version header".into(),
        ));
    }
    let (head, payload) = raw.split_at(8);
    let mut v = [0u8; 8];
    v.copy_from_slice(head);
    Ok((u64::from_le_bytes(v), payload))
}

/// The key's current version, after checking the write's precondition on it.
fn checked_version(
    table: &redb::Table<&str, &[u8]>,
    key: &str,
    pre: Precondition,
) -> Result<Option<Version>, StoreError> {
    let current = match table.get(key).map_err(unavailable)? {
        Some(raw) => Some(split(raw.value())?.0),
        None => None,
    };
    check(key, current, pre)?;
    Ok(current)
}

fn check(key: &str, current: Option<Version>, pre: Precondition) -> Result<(), StoreError> {
    let ok = match pre {
        Precondition::None => true,
        Precondition::Absent => current.is_none(),
        Precondition::Version(v) => current == Some(v),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict(key.to_string()))
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn shared(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(unavailable))
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(KV).map_err(unavailable)?;
            match table.get(key.as_str()).map_err(unavailable)? {
                None => Ok(None),
                Some(raw) => {
                    let (version, payload) = split(raw.value())?;
                    Ok(Some(Versioned {
                        value: payload.to_vec(),
                        version,
                    }))
                }
            }
        })
        .await
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Version>>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            let mut versions = Vec::with_capacity(ops.len());
            {
                let mut table = tx.open_table(KV).map_err(unavailable)?;
                for op in &ops {
                    match op {
                        WriteOp::Put { key, value, pre } => {
                            let current = checked_version(&table, key, *pre)?;
                            let next = current.unwrap_or(0) + 1;
                            let mut buf = Vec::with_capacity(8 + value.len());
                            buf.extend_from_slice(&next.to_le_bytes());
                            buf.extend_from_slice(value);
                            table
                                .insert(key.as_str(), buf.as_slice())
                                .map_err(unavailable)?;
                            versions.push(Some(next));
                        }
                        WriteOp::Delete { key, pre } => {
                            checked_version(&table, key, *pre)?;
                            table.remove(key.as_str()).map_err(unavailable)?;
                            versions.push(None);
                        }
                    }
                }
            }
            // An error above drops `tx` uncommitted: all or nothing.
            tx.commit().map_err(unavailable)?;
            Ok(versions)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(KV).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in table.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, _) = item.map_err(unavailable)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push(k.to_string());
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store_suite as suite;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("sub/state.redb")).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn put_get_versions_and_cas() {
        suite::put_get_versions_and_cas(&store().1).await;
    }

    #[tokio::test]
    async fn commit_is_all_or_nothing() {
        suite::commit_is_all_or_nothing(&store().1).await;
    }

    #[tokio::test]
    async fn list_by_prefix_and_delete() {
        suite::list_by_prefix_and_delete(&store().1).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_cas_has_one_winner() {
        let (_d, s) = store();
        suite::concurrent_cas_has_one_winner(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_creates_have_one_winner() {
        let (_d, s) = store();
        suite::concurrent_creates_have_one_winner(Arc::new(s)).await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.put("k", b"v".to_vec(), Precondition::None).await.unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v");
    }
}
