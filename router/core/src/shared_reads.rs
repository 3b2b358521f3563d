//! Catch-up pages shared between clients: a small table of recent store reads, keyed by
//! channel, epoch and range, so many clients recovering a channel from nearby offsets read
//! each page from the store once.
//!
//! It owns the table, its in-flight reads (concurrent askers await one read) and its
//! bounds (a finished page stays for a short time; entries and bytes are capped, and a
//! full table reads without sharing). It must never hold its lock across an await, never
//! grow without bound, and never decide which messages a client gets (the caller filters).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::protocol::OpError;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::partitions::OwnedMessage;

/// A page read once and handed to every client that asks for its range.
pub(crate) type Page = Arc<Vec<OwnedMessage>>;

/// Channel, epoch, exclusive start and inclusive end of a shared read.
pub(crate) type Key = (Arc<str>, Arc<str>, u64, u64);

/// One read: in flight until its cell is set; `done` holds when it finished and its bytes.
struct Entry {
    cell: Arc<OnceCell<Page>>,
    born: Instant,
    done: Option<(Instant, usize)>,
}

struct Table {
    entries: HashMap<Key, Entry>,
    /// Bytes of the finished pages in `entries`.
    bytes: usize,
    last_sweep: Instant,
}

/// The shared-read table (see the module doc).
pub(crate) struct SharedReads {
    table: Mutex<Table>,
    /// How long a finished page is handed out.
    ttl: Duration,
    max_entries: usize,
    max_bytes: usize,
}

impl SharedReads {
    /// A table that keeps finished pages for `ttl`, at most `max_entries` reads and
    /// `max_bytes` of finished pages.
    pub(crate) fn new(ttl: Duration, max_entries: usize, max_bytes: usize) -> Self {
        let table = Table { entries: HashMap::new(), bytes: 0, last_sweep: Instant::now() };
        Self { table: Mutex::new(table), ttl, max_entries, max_bytes }
    }

    /// The page of `key`: a finished or in-flight read of it if there is one, else the
    /// result of `read`, kept for later askers. True when the page was shared (this caller
    /// did not read it). A failed read is not kept. With the table full, `read` runs
    /// unshared.
    pub(crate) async fn get<F, Fut>(&self, key: Key, read: F) -> Result<(Page, bool), OpError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Page, OpError>>,
    {
        let cell = {
            let mut t = self.table.lock().expect("shared reads");
            let now = Instant::now();
            if now.duration_since(t.last_sweep) >= self.ttl / 4 || t.entries.len() >= self.max_entries {
                self.sweep(&mut t, now);
            }
            match t.entries.get(&key) {
                Some(e) => Some(e.cell.clone()),
                None if t.entries.len() >= self.max_entries || t.bytes >= self.max_bytes => None,
                None => {
                    let cell = Arc::new(OnceCell::new());
                    t.entries.insert(key.clone(), Entry { cell: cell.clone(), born: now, done: None });
                    Some(cell)
                }
            }
        };
        let Some(cell) = cell else {
            return Ok((read().await?, false));
        };
        let mut ran = false;
        let page = cell
            .get_or_try_init(|| {
                ran = true;
                read()
            })
            .await?
            .clone();
        if ran {
            let bytes = page.iter().map(OwnedMessage::encoded_len).sum::<usize>();
            let mut t = self.table.lock().expect("shared reads");
            let counted = match t.entries.get_mut(&key) {
                Some(e) if Arc::ptr_eq(&e.cell, &cell) && e.done.is_none() => {
                    e.done = Some((Instant::now(), bytes));
                    true
                }
                _ => false,
            };
            if counted {
                t.bytes += bytes;
            }
        }
        Ok((page, !ran))
    }

    /// Drops finished pages older than the ttl, and reads in flight for far longer (their
    /// askers hold the cell; later askers start a new read).
    fn sweep(&self, t: &mut Table, now: Instant) {
        let (ttl, mut freed) = (self.ttl, 0usize);
        t.entries.retain(|_, e| {
            let keep = match e.done {
                Some((at, _)) => now.duration_since(at) < ttl,
                None => now.duration_since(e.born) < ttl * 30,
            };
            if !keep {
                freed += e.done.map_or(0, |(_, b)| b);
            }
            keep
        });
        t.bytes -= freed;
        t.last_sweep = now;
    }

    /// Reads in the table and bytes of its finished pages.
    #[cfg(test)]
    pub(crate) fn size(&self) -> (usize, usize) {
        let t = self.table.lock().expect("shared reads");
        (t.entries.len(), t.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use switchyard_store::StoredMessage;

    fn page(bytes: usize) -> Page {
        let msg = StoredMessage { ts: 0, key: None, from: None, idem: None, data: String::new() };
        let data = serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(bytes))).unwrap();
        Arc::new(vec![OwnedMessage { channel: "c".into(), epoch: "e".into(), offset: 1, msg, data }])
    }

    fn key(start: u64) -> Key {
        ("c".into(), "e".into(), start, start + 256)
    }

    /// Concurrent askers of one key await one read; a failed read is not kept.
    #[tokio::test]
    async fn concurrent_askers_await_one_read_and_failures_are_not_kept() {
        let table = SharedReads::new(Duration::from_secs(60), 16, 1 << 20);
        let reads = AtomicUsize::new(0);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let first = table.get(key(0), || async {
            reads.fetch_add(1, Ordering::SeqCst);
            rx.await.unwrap();
            Ok(page(10))
        });
        let second = table.get(key(0), || async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok(page(10))
        });
        let release = async {
            tx.send(()).unwrap();
        };
        let (a, b, ()) = tokio::join!(first, second, release);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read");
        assert_eq!((a.1, b.1), (false, true), "the second asker shared the first one's read");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let failed = table.get(key(256), || async { Err(OpError::internal("disk")) }).await;
        assert!(failed.is_err());
        let (_, shared) = table.get(key(256), || async { Ok(page(1)) }).await.unwrap();
        assert!(!shared, "a failed read is read again");
    }

    /// The table is bounded by entries and bytes (a full table reads unshared), and
    /// finished pages expire after the ttl.
    #[tokio::test]
    async fn entries_are_bounded_and_expire() {
        let table = SharedReads::new(Duration::from_millis(100), 2, 2000);
        for start in [0, 256] {
            table.get(key(start), || async { Ok(page(10)) }).await.unwrap();
        }
        assert_eq!(table.size().0, 2);
        let (_, shared) = table.get(key(512), || async { Ok(page(10)) }).await.unwrap();
        assert!(!shared);
        assert_eq!(table.size().0, 2, "a full table keeps no more entries");
        let (_, shared) = table.get(key(512), || async { Ok(page(10)) }).await.unwrap();
        assert!(!shared, "nor shares what it could not keep");
        // Expiry: once the ttl has passed, the next ask sweeps the old pages out.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            table.get(key(768), || async { Ok(page(10)) }).await.unwrap();
            if table.size().0 == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "finished pages never expired: {:?}", table.size());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Bytes: a page bigger than the budget is kept, and then the table is full.
        let bytes = SharedReads::new(Duration::from_secs(60), 100, 2000);
        bytes.get(key(0), || async { Ok(page(3000)) }).await.unwrap();
        assert!(bytes.size().1 >= 3000);
        bytes.get(key(256), || async { Ok(page(10)) }).await.unwrap();
        assert_eq!(bytes.size().0, 1, "no entry past the byte budget");
        let (_, shared) = bytes.get(key(0), || async { Ok(page(1)) }).await.unwrap();
        assert!(shared, "what is kept is still shared");
    }
}
