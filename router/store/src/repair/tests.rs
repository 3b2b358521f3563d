//! Journal repair and the data-directory check on real fjall journals and tables, damaged
//! by hand: a flipped byte, a cut file, a damaged table block. Test code only.

use super::*;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};

/// Writes `n` batches of one key each (`k0000`.., value of `len` bytes) and fsyncs each;
/// the database is dropped without flushing its memtable, so they live in the journal.
fn journal_with(dir: &Path, n: usize, len: usize) {
    let db = Database::builder(dir).open().unwrap();
    let ks = db.keyspace("t", KeyspaceCreateOptions::default).unwrap();
    for i in 0..n {
        ks.insert(format!("k{i:04}"), vec![b'a' + (i % 26) as u8; len]).unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
    }
}

/// The keys fjall serves after opening `dir`.
fn keys(dir: &Path) -> usize {
    let db = Database::builder(dir).open().unwrap();
    let ks = db.keyspace("t", KeyspaceCreateOptions::default).unwrap();
    ks.iter().count()
}

fn only_journal(dir: &Path) -> PathBuf {
    let files = journal_files(dir).unwrap();
    assert_eq!(files.len(), 1, "one journal file: {files:?}");
    files[0].clone()
}

/// The start offsets of the whole batches of a journal file.
fn batch_offsets(buf: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < buf.len() && buf[p] == TAG_START {
        let b = parse_batch(buf, p).expect("an intact journal");
        out.push(p);
        p = b.end;
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut buf = fs::read(path).unwrap();
    buf[at] ^= 0x5a;
    fs::write(path, buf).unwrap();
}

fn damaged_copies(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in fs::read_dir(dir.join(DAMAGED_DIR)).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[test]
fn an_intact_journal_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 20, 100);
    let file = only_journal(dir.path());
    let before = (fs::read(&file).unwrap(), fs::metadata(&file).unwrap().modified().unwrap());
    let report = repair(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.kept_batches, 20);
    assert_eq!((fs::read(&file).unwrap(), fs::metadata(&file).unwrap().modified().unwrap()), before);
    assert!(!dir.path().join(DAMAGED_DIR).exists(), "nothing moved aside");
    assert_eq!(keys(dir.path()), 20);
}

#[test]
fn an_empty_or_missing_directory_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    assert!(repair(&dir.path().join("none")).unwrap().is_clean());
    assert!(check(dir.path()).unwrap().is_clean());
    assert!(check(&dir.path().join("none")).is_err(), "check names a missing directory");
}

#[test]
fn a_flipped_byte_in_the_last_batch_drops_only_that_batch() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 30, 100);
    let file = only_journal(dir.path());
    let offsets = batch_offsets(&fs::read(&file).unwrap());
    assert_eq!(offsets.len(), 30);
    // A byte of the last batch's value: its checksum fails (fjall would refuse to open).
    flip(&file, offsets[29] + 13 + 40);
    let checked = check(dir.path()).unwrap();
    let damage = checked.damage.clone().expect("check finds the damage");
    assert_eq!(
        (damage.fault, damage.at, damage.kept_batches, damage.dropped_batches),
        (BatchFault::Checksum, offsets[29] as u64, 29, 1)
    );
    assert!(!dir.path().join(DAMAGED_DIR).exists(), "check writes nothing");
    let damaged_bytes = fs::read(&file).unwrap();
    let repaired = repair(dir.path()).unwrap();
    assert_eq!(repaired.damage, checked.damage, "repair drops what check said it would");
    assert_eq!(repaired.dropped_batches(), 1);
    assert_eq!(repaired.dropped_seqnos().len(), 1);
    assert_eq!(fs::metadata(&file).unwrap().len(), offsets[29] as u64, "cut at the end of the last good batch");
    let copies = damaged_copies(dir.path());
    assert_eq!(copies.len(), 1);
    assert!(fs::read(&copies[0]).unwrap() == damaged_bytes, "the copy is the whole damaged file, as it was");
    assert_eq!(keys(dir.path()), 29);
    // Opened and written again: the next start finds nothing to repair.
    journal_with(dir.path(), 3, 10);
    assert!(repair(dir.path()).unwrap().is_clean());
}

#[test]
fn a_cut_journal_drops_the_cut_batch_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 10, 200);
    let file = only_journal(dir.path());
    let buf = fs::read(&file).unwrap();
    let offsets = batch_offsets(&buf);
    let cut = offsets[9] + 50;
    fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(cut as u64).unwrap();
    let report = repair(dir.path()).unwrap();
    let damage = report.damage.expect("damage");
    assert_eq!(
        (damage.fault, damage.kept_batches, damage.dropped_batches, damage.dropped_bytes),
        (BatchFault::Cut, 9, 1, 50)
    );
    assert_eq!(keys(dir.path()), 9);
}

#[test]
fn damage_in_the_middle_drops_every_batch_from_it_on() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 40, 64);
    let file = only_journal(dir.path());
    let offsets = batch_offsets(&fs::read(&file).unwrap());
    flip(&file, offsets[10] + 13 + 30);
    let report = repair(dir.path()).unwrap();
    let damage = report.damage.clone().expect("damage");
    assert_eq!(
        (damage.kept_batches, damage.dropped_batches),
        (10, 30),
        "the damaged batch and the 29 intact ones after it"
    );
    assert_eq!(report.dropped_seqnos().len(), 30);
    assert!(report.dropped_seqnos().windows(2).all(|w| w[0] < w[1]), "seqnos oldest first");
    assert_eq!(keys(dir.path()), 10);
}

#[test]
fn a_broken_tag_or_trailer_is_damage_not_a_silent_end() {
    for at in [0usize, 12] {
        // 0: the Start tag of the last batch (fjall would end the journal there silently);
        // 12 past the batch's End: a byte of its "FJL" trailer.
        let dir = tempfile::tempdir().unwrap();
        journal_with(dir.path(), 5, 16);
        let file = only_journal(dir.path());
        let buf = fs::read(&file).unwrap();
        let offsets = batch_offsets(&buf);
        let end = parse_batch(&buf, offsets[4]).unwrap().end;
        flip(&file, if at == 0 { offsets[4] } else { end - 2 });
        let report = check(dir.path()).unwrap();
        let damage = report.damage.expect("damage");
        assert_eq!((damage.fault, damage.kept_batches), (BatchFault::Malformed, 4), "flip at {at}");
    }
}

#[test]
fn data_after_zeros_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 5, 16);
    let file = only_journal(dir.path());
    let buf = fs::read(&file).unwrap();
    let offsets = batch_offsets(&buf);
    // Zero the fourth batch's first bytes: the journal seems to end there, but more follows.
    let mut zeroed = buf.clone();
    zeroed[offsets[3]..offsets[3] + 13].fill(0);
    fs::write(&file, zeroed).unwrap();
    let report = check(dir.path()).unwrap();
    let damage = report.damage.expect("damage");
    assert_eq!((damage.fault, damage.kept_batches, damage.dropped_batches), (BatchFault::TrailingBytes, 3, 1));
}

#[test]
fn later_journal_files_are_moved_aside_whole() {
    let dir = tempfile::tempdir().unwrap();
    journal_with(dir.path(), 5, 16);
    let first = only_journal(dir.path());
    // A later journal: a copy of the first under the next id (its batches are whole).
    let later = dir.path().join(format!("{}.jnl", journal_files(dir.path()).unwrap().len() + 100));
    fs::copy(&first, &later).unwrap();
    let offsets = batch_offsets(&fs::read(&first).unwrap());
    flip(&first, offsets[2] + 13 + 20);
    let report = repair(dir.path()).unwrap();
    assert_eq!(report.later.len(), 1);
    assert_eq!(report.later[0].batches, 5);
    assert_eq!(report.dropped_batches(), 3 + 5);
    assert!(!later.exists(), "the later file left the data directory");
    assert_eq!(damaged_copies(dir.path()).len(), 2, "the damaged file's copy and the later file");
}

#[test]
fn check_finds_a_damaged_table_block() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db.keyspace("t", KeyspaceCreateOptions::default).unwrap();
        for i in 0..2000u32 {
            ks.insert(format!("k{i:06}"), vec![b'x'; 100]).unwrap();
        }
        ks.rotate_memtable_and_wait().unwrap();
    }
    let clean = check(dir.path()).unwrap();
    assert!(clean.tables_checked >= 1 && clean.is_clean(), "{clean:?}");
    let table = table_files(dir.path()).unwrap().into_iter().max_by_key(|f| fs::metadata(f).unwrap().len()).unwrap();
    flip(&table, 200);
    let report = check(dir.path()).unwrap();
    assert_eq!(report.tables.len(), 1, "{report:?}");
    assert_eq!(report.tables[0].file, table);
    assert!(report.damage.is_none(), "the journal is fine");
}
