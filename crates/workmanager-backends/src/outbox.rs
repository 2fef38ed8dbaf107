//! The outage buffer on disk (`Resilience:BufferPath`): publishes a
//! networked bus accepted while its broker was down wait here, in order, in
//! a redb file. Every push is one durable (fsynced) commit before the
//! publish is accepted, so a crash of the instance loses none of them; the
//! next run sends them once the broker answers.
//!
//! Each entry: sequence number → topic length (4 bytes, little-endian),
//! topic, event JSON.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use workmanager_core::resilience::Outbox;
use workmanager_core::CloudEvent;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

pub struct FileOutbox {
    db: Arc<Database>,
    len: Arc<AtomicUsize>,
}

fn failed(e: impl std::fmt::Display) -> String {
    format!("outbox: {e}")
}

impl FileOutbox {
    /// Opens (or creates) the file, creating parent directories.
    pub fn open(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
        }
        let db = Database::create(path)
            .map_err(|e| format!("cannot open the outbox file {}: {e}", path.display()))?;
        let tx = db.begin_write().map_err(failed)?;
        let len = tx
            .open_table(ENTRIES)
            .map_err(failed)?
            .len()
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
        if len > 0 {
            tracing::info!(
                path = %path.display(),
                waiting = len,
                "publishes buffered by an earlier run will be sent once the bus answers"
            );
        }
        Ok(Self {
            db: Arc::new(db),
            len: Arc::new(AtomicUsize::new(len as usize)),
        })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &AtomicUsize) -> Result<T, String> + Send + 'static,
    {
        let (db, len) = (self.db.clone(), self.len.clone());
        tokio::task::spawn_blocking(move || f(&db, &len))
            .await
            .map_err(failed)?
    }
}

fn encode(topic: &str, event: &CloudEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + topic.len() + 1024);
    out.extend_from_slice(&(topic.len() as u32).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    event.write_json(&mut out);
    out
}

fn decode(raw: &[u8]) -> Result<(String, CloudEvent), String> {
    let corrupt = || "outbox: an entry is corrupt".to_string();
    let (len, rest) = raw.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let len = u32::from_le_bytes(*len) as usize;
    let topic = rest.get(..len).ok_or_else(corrupt)?;
    let topic = String::from_utf8(topic.to_vec()).map_err(|_| corrupt())?;
    let json = rest.get(len..).ok_or_else(corrupt)?;
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| corrupt())?;
    Ok((topic, CloudEvent::from_input(value)))
}

#[async_trait]
impl Outbox for FileOutbox {
    async fn push(&self, topic: &str, events: &[CloudEvent]) -> Result<(), String> {
        let entries: Vec<Vec<u8>> = events.iter().map(|e| encode(topic, e)).collect();
        self.blocking(move |db, len| {
            let tx = db.begin_write().map_err(failed)?;
            {
                let mut table = tx.open_table(ENTRIES).map_err(failed)?;
                let first = match table.last().map_err(failed)? {
                    Some((k, _)) => k.value() + 1,
                    None => 1,
                };
                for (seq, entry) in (first..).zip(&entries) {
                    table.insert(seq, entry.as_slice()).map_err(failed)?;
                }
            }
            tx.commit().map_err(failed)?;
            len.fetch_add(entries.len(), Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    /// An entry that cannot be read back (it cannot be sent either) is
    /// logged and removed, so it never holds up the ones behind it.
    async fn front(&self, max: usize) -> Result<Vec<(u64, String, CloudEvent)>, String> {
        self.blocking(move |db, len| {
            let mut out = Vec::new();
            let mut unreadable = Vec::new();
            {
                let tx = db.begin_read().map_err(failed)?;
                let table = tx.open_table(ENTRIES).map_err(failed)?;
                for item in table.range::<u64>(..).map_err(failed)?.take(max) {
                    let (k, v) = item.map_err(failed)?;
                    match decode(v.value()) {
                        Ok((topic, event)) => out.push((k.value(), topic, event)),
                        Err(e) => {
                            tracing::error!(sequence = k.value(), error = %e, "an unreadable outbox entry is dropped");
                            unreadable.push(k.value());
                        }
                    }
                }
            }
            if !unreadable.is_empty() {
                let tx = db.begin_write().map_err(failed)?;
                let left = {
                    let mut table = tx.open_table(ENTRIES).map_err(failed)?;
                    for seq in unreadable {
                        table.remove(seq).map_err(failed)?;
                    }
                    table.len().map_err(failed)?
                };
                tx.commit().map_err(failed)?;
                len.store(left as usize, Ordering::SeqCst);
            }
            Ok(out)
        })
        .await
    }

    async fn remove_through(&self, last: u64) -> Result<(), String> {
        self.blocking(move |db, len| {
            let tx = db.begin_write().map_err(failed)?;
            let left = {
                let mut table = tx.open_table(ENTRIES).map_err(failed)?;
                table.retain_in(..=last, |_, _| false).map_err(failed)?;
                table.len().map_err(failed)?
            };
            tx.commit().map_err(failed)?;
            len.store(left as usize, Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(n: u64) -> CloudEvent {
        CloudEvent::from_input(json!({
            "specversion": "1.0", "id": format!("e{n}"), "source": "s", "type": "t", "data": n
        }))
    }

    /// The data of the events waiting, oldest first.
    async fn waiting(o: &FileOutbox) -> Vec<u64> {
        o.front(100)
            .await
            .unwrap()
            .iter()
            .map(|(_, _, e)| e.0["data"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn what_was_pushed_survives_a_reopen_in_order_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("outbox.redb");
        {
            let o = FileOutbox::open(&path).unwrap();
            o.push("a", &[ev(1), ev(2)]).await.unwrap();
            o.push("b", &[ev(3)]).await.unwrap();
            assert_eq!(o.len(), 3);
        }
        let o = FileOutbox::open(&path).unwrap();
        assert_eq!(o.len(), 3, "counted again on open");
        let front = o.front(10).await.unwrap();
        let got: Vec<(String, u64)> = front
            .iter()
            .map(|(_, t, e)| (t.clone(), e.0["data"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 3)]);
        assert_eq!(front[1].2, ev(2), "the event as it was pushed");
        o.remove_through(front[1].0).await.unwrap();
        assert_eq!(o.len(), 1);
        o.push("c", &[ev(4)]).await.unwrap();
        assert_eq!(waiting(&o).await, vec![3, 4], "later pushes queue behind");
        assert_eq!(o.front(1).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreadable_entry_is_dropped_and_does_not_hold_up_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let o = FileOutbox::open(&dir.path().join("outbox.redb")).unwrap();
        o.push("a", &[ev(1)]).await.unwrap();
        {
            let tx = o.db.begin_write().unwrap();
            tx.open_table(ENTRIES)
                .unwrap()
                .insert(2, &b"garbage"[..])
                .unwrap();
            tx.commit().unwrap();
        }
        o.len.store(2, Ordering::SeqCst);
        o.push("a", &[ev(3)]).await.unwrap();
        assert_eq!(waiting(&o).await, vec![1, 3]);
        assert_eq!(o.len(), 2, "the unreadable entry is gone");
    }

    #[test]
    fn a_corrupt_entry_is_an_error_not_a_panic() {
        for raw in [
            &b""[..],
            &[9, 0, 0, 0, b'a'][..],
            &[1, 0, 0, 0, b'a', b'{'][..],
        ] {
            assert!(decode(raw).is_err());
        }
        let good = encode("t", &ev(1));
        assert_eq!(decode(&good).unwrap(), ("t".to_string(), ev(1)));
    }
}
