//! Journal repair before the store opens, and the read-only check of the data directory.
//!
//! It owns reading fjall's journal files (`<data>/N.jnl`) and table files
//! (`<data>/keyspaces/*/tables/*`) byte by byte, without fjall: a journal is a run of
//! batches, each `Start{item_count, seqno}`, that many `Item`/`Clear` entries and
//! `End(xxh3 of the entries, "FJL\x03")`; a table is a run of blocks, each a header
//! (`"LSM\x03"`, type, xxh3-128 of the data, lengths, and the header's own checksum)
//! followed by its data. fjall refuses to open a journal with a bad checksum and silently
//! cuts a malformed tail; [`repair`] instead keeps every batch before the first damaged
//! one, copies the damaged file aside into `<data>/damaged/<time>/` (it never deletes),
//! truncates the journal at the end of the last good batch and moves later journal files
//! aside, then says exactly what it dropped. [`check`] finds the same without writing.
//! It must never run while a store is open on the directory, and never decide anything
//! about partitions: it knows batches and bytes, not channels.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// The directory damaged files are moved or copied into, under the data directory.
pub const DAMAGED_DIR: &str = "damaged";

/// fjall's journal entry tags.
const TAG_START: u8 = 1;
const TAG_ITEM: u8 = 2;
const TAG_END: u8 = 3;
const TAG_CLEAR: u8 = 4;
/// The trailer after every batch's checksum (fjall's `file::MAGIC_BYTES`).
const JOURNAL_MAGIC: &[u8; 4] = b"FJL\x03";
/// The magic at the start of every table block header (lsm-tree's `file::MAGIC_BYTES`).
const BLOCK_MAGIC: &[u8; 4] = b"LSM\x03";
/// Magic, type, data checksum (u128), data length, uncompressed length, header checksum.
const BLOCK_HEADER_LEN: usize = 4 + 1 + 16 + 4 + 4 + 4;

/// Why a batch could not be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFault {
    /// The file ends inside the batch (a journal cut short).
    Cut,
    /// The batch is whole but its checksum does not match its entries.
    Checksum,
    /// The bytes are not a batch: a wrong tag, trailer, value type or compression.
    Malformed,
    /// The journal's end (zeros) is followed by more non-zero bytes.
    TrailingBytes,
}

impl std::fmt::Display for BatchFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BatchFault::Cut => "cut short (the file ends inside the batch)",
            BatchFault::Checksum => "checksum mismatch",
            BatchFault::Malformed => "malformed entry",
            BatchFault::TrailingBytes => "bytes after the journal's end",
        })
    }
}

/// The first damage in one journal file, and what cutting there drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalDamage {
    /// The journal file.
    pub file: PathBuf,
    /// Byte offset of the first damaged batch: the journal is cut here.
    pub at: u64,
    /// What is wrong with it.
    pub fault: BatchFault,
    /// Batches kept before it.
    pub kept_batches: u64,
    /// Batches dropped: the damaged one (when anything of it was readable) and every
    /// whole batch recognised after it in this file.
    pub dropped_batches: u64,
    /// Bytes dropped: from `at` to the end of a cut file, else to its last non-zero byte.
    pub dropped_bytes: u64,
    /// The seqnos of the dropped batches whose start could be read (oldest first).
    pub dropped_seqnos: Vec<u64>,
}

/// A journal file after the damaged one: dropped whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaterJournal {
    /// The file.
    pub file: PathBuf,
    /// Whole batches it holds.
    pub batches: u64,
    /// Bytes it holds (up to its last non-zero byte).
    pub bytes: u64,
    /// Their seqnos.
    pub seqnos: Vec<u64>,
}

/// A table file with a block that fails its checksum or cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDamage {
    /// The table file.
    pub file: PathBuf,
    /// Byte offset of the bad block.
    pub at: u64,
    /// What is wrong.
    pub what: &'static str,
}

/// What [`check`] found, or what [`repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Journal files read, oldest first.
    pub journals: Vec<PathBuf>,
    /// Whole batches kept over all journals.
    pub kept_batches: u64,
    /// The first damage found in the journals, if any.
    pub damage: Option<JournalDamage>,
    /// Journal files after the damaged one (dropped whole).
    pub later: Vec<LaterJournal>,
    /// Damaged table files (only [`check`] reads tables).
    pub tables: Vec<TableDamage>,
    /// Table files read.
    pub tables_checked: u64,
    /// Where [`repair`] put the damaged files (None when nothing was damaged).
    pub moved_to: Option<PathBuf>,
    /// [`check`] only: a running node holds the store's lock, so the journal's last batch
    /// may be in flight (a cut last batch is then not damage).
    pub in_use: bool,
}

impl Report {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_none() && self.tables.is_empty()
    }

    /// Batches dropped from the journals: the damaged file's and every later file's.
    pub fn dropped_batches(&self) -> u64 {
        self.damage.as_ref().map_or(0, |d| d.dropped_batches) + self.later.iter().map(|l| l.batches).sum::<u64>()
    }

    /// Bytes dropped from the journals.
    pub fn dropped_bytes(&self) -> u64 {
        self.damage.as_ref().map_or(0, |d| d.dropped_bytes) + self.later.iter().map(|l| l.bytes).sum::<u64>()
    }

    /// The seqnos of the dropped batches that could be read, oldest first.
    pub fn dropped_seqnos(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.damage.iter().flat_map(|d| d.dropped_seqnos.iter().copied()).collect();
        out.extend(self.later.iter().flat_map(|l| l.seqnos.iter().copied()));
        out
    }
}

impl std::fmt::Display for Report {
    /// What an operator reads from `switchyard store check|repair`: one line per finding.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.in_use {
            writeln!(f, "note: a running node has this store open; a cut last batch may be a write in flight")?;
        }
        writeln!(f, "journal: {} file(s), {} whole batch(es) kept", self.journals.len(), self.kept_batches)?;
        match &self.damage {
            None => writeln!(f, "journal: intact")?,
            Some(d) => {
                writeln!(
                    f,
                    "journal: DAMAGED {} at byte {}: {}; batches after byte {} are dropped: {} batch(es), {} bytes in this file",
                    d.file.display(),
                    d.at,
                    d.fault,
                    d.at,
                    d.dropped_batches,
                    d.dropped_bytes
                )?;
                for l in &self.later {
                    writeln!(
                        f,
                        "journal: later file {} is dropped whole: {} batch(es), {} bytes",
                        l.file.display(),
                        l.batches,
                        l.bytes
                    )?;
                }
                writeln!(
                    f,
                    "journal: dropped in all: {} batch(es), {} bytes, seqnos {:?}",
                    self.dropped_batches(),
                    self.dropped_bytes(),
                    self.dropped_seqnos()
                )?;
            }
        }
        if let Some(to) = &self.moved_to {
            writeln!(f, "journal: repaired; the damaged file(s) are kept in {}", to.display())?;
        }
        if self.tables_checked > 0 || !self.tables.is_empty() {
            writeln!(f, "tables: {} file(s) read, {} damaged", self.tables_checked, self.tables.len())?;
        }
        for t in &self.tables {
            writeln!(f, "tables: DAMAGED {} at byte {}: {}", t.file.display(), t.at, t.what)?;
        }
        Ok(())
    }
}

/// Errors reading or repairing the data directory.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct RepairError {
    /// What was being done.
    pub what: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The I/O error.
    pub source: io::Error,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RepairError {
    let path = path.to_path_buf();
    move |source| RepairError { what, path, source }
}

// === journal parsing ===

/// One batch read whole and checked.
struct GoodBatch {
    end: usize,
    seqno: u64,
}

/// Why parsing stopped at a batch boundary.
enum Stop {
    /// The journal ends cleanly here (end of file, or zeros to the end).
    End,
    /// A damaged batch; its seqno when its start could be read.
    Bad(BatchFault, Option<u64>),
}

fn take(buf: &[u8], pos: &mut usize, n: usize) -> Result<std::ops::Range<usize>, BatchFault> {
    let end = pos.checked_add(n).ok_or(BatchFault::Malformed)?;
    if end > buf.len() {
        return Err(BatchFault::Cut);
    }
    let r = *pos..end;
    *pos = end;
    Ok(r)
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes(b.try_into().expect("2 bytes"))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Reads the batch starting at `pos` (whose first byte is a Start tag): its end and seqno,
/// or why it is not whole.
fn parse_batch(buf: &[u8], pos: usize) -> Result<GoodBatch, (BatchFault, Option<u64>)> {
    let mut p = pos;
    let start = take(buf, &mut p, 13).map_err(|f| (f, None))?;
    if buf[start.start] != TAG_START {
        return Err((BatchFault::Malformed, None));
    }
    let count = le_u32(&buf[start.start + 1..start.start + 5]);
    let seqno = le_u64(&buf[start.start + 5..start.end]);
    let fail = |f| (f, Some(seqno));
    let mut hasher = Xxh3::new();
    for _ in 0..count {
        let entry_start = p;
        let tag = buf[take(buf, &mut p, 1).map_err(fail)?.start];
        match tag {
            TAG_ITEM => {
                let head = take(buf, &mut p, 1 + 1 + 8 + 2 + 4 + 4).map_err(fail)?;
                let h = &buf[head];
                if !matches!(h[0], 0 | 1 | 2 | 4) || h[1] > 1 {
                    return Err(fail(BatchFault::Malformed));
                }
                let key_len = le_u16(&h[10..12]) as usize;
                let on_disk = le_u32(&h[16..20]) as usize;
                take(buf, &mut p, key_len + on_disk).map_err(fail)?;
            }
            TAG_CLEAR => {
                take(buf, &mut p, 8).map_err(fail)?;
            }
            _ => return Err(fail(BatchFault::Malformed)),
        }
        hasher.update(&buf[entry_start..p]);
    }
    let end = take(buf, &mut p, 13).map_err(fail)?;
    if buf[end.start] != TAG_END || &buf[end.start + 9..end.end] != JOURNAL_MAGIC {
        return Err(fail(BatchFault::Malformed));
    }
    if hasher.digest() != le_u64(&buf[end.start + 1..end.start + 9]) {
        return Err(fail(BatchFault::Checksum));
    }
    Ok(GoodBatch { end: p, seqno })
}

/// What one journal file holds.
struct FileScan {
    /// Whole batches before the first damage (or the end).
    good: u64,
    /// End of the last good batch.
    good_end: usize,
    /// The first damage, if any.
    stop: Option<(BatchFault, Option<u64>)>,
    /// After the first damage: whole batches recognised (resynchronising byte by byte).
    after: Vec<u64>,
    /// Offset after the last non-zero byte.
    data_end: usize,
}

fn scan_journal(buf: &[u8]) -> FileScan {
    let data_end = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut pos = 0;
    let mut good = 0;
    let stop = loop {
        if pos >= data_end {
            break Stop::End;
        }
        if buf[pos] == 0 {
            // fjall pre-allocates journals with zeros: a zero where a batch would start is
            // the end, unless more data follows.
            break Stop::Bad(BatchFault::TrailingBytes, None);
        }
        if buf[pos] != TAG_START {
            break Stop::Bad(BatchFault::Malformed, None);
        }
        match parse_batch(buf, pos) {
            Ok(b) => {
                good += 1;
                pos = b.end;
            }
            Err((fault, seqno)) => break Stop::Bad(fault, seqno),
        }
    };
    let good_end = pos;
    let stop = match stop {
        Stop::End => None,
        Stop::Bad(f, s) => Some((f, s)),
    };
    let mut after = Vec::new();
    if stop.is_some() {
        let mut p = good_end + 1;
        while p < data_end {
            if buf[p] == TAG_START {
                if let Ok(b) = parse_batch(buf, p) {
                    after.push(b.seqno);
                    p = b.end;
                    continue;
                }
            }
            p += 1;
        }
    }
    FileScan { good, good_end, stop, after, data_end }
}

/// The journal files of `dir`, oldest first (fjall names them `<id>.jnl`).
fn journal_files(dir: &Path) -> Result<Vec<PathBuf>, RepairError> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot read the data directory", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("cannot read the data directory", dir))?;
        let path = entry.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let (Some(id), true) = (id, path.is_file()) {
            files.push((id, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// One whole batch of a journal file, where it lies: for tools and tests that damage or
/// inspect a journal on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAt {
    /// Offset of its Start entry.
    pub at: u64,
    /// Offset just past its End entry.
    pub end: u64,
    /// Its seqno.
    pub seqno: u64,
}

/// The journal files of `dir`, oldest first, each with its whole batches up to the first
/// damage or the end.
pub fn journal_batches(dir: &Path) -> Result<Vec<(PathBuf, Vec<BatchAt>)>, RepairError> {
    let mut out = Vec::new();
    for file in journal_files(dir)? {
        let (buf, _) = read_journal(&file).map_err(io_err("cannot read journal", &file))?;
        let mut batches = Vec::new();
        let mut p = 0;
        while p < buf.len() && buf[p] == TAG_START {
            let Ok(b) = parse_batch(&buf, p) else { break };
            batches.push(BatchAt { at: p as u64, end: b.end as u64, seqno: b.seqno });
            p = b.end;
        }
        out.push((file, batches));
    }
    Ok(out)
}

/// Zero bytes at the end of a cut journal that still count as the cut batch's: fewer than
/// this after the last non-zero byte means the file ends at its data (fjall pre-allocates
/// 64 MiB, so a journal that was not cut ends in far more zeros).
const CUT_SLACK: u64 = 4096;

/// A journal file's bytes up to its last non-zero byte (fjall pre-allocates journals with
/// zeros; those are found from the end and never read into memory), and the file's length.
fn read_journal(path: &Path) -> io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    const STEP: u64 = 1 << 20;
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; STEP as usize];
    while end > 0 {
        let start = end.saturating_sub(STEP);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|&b| b != 0) {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    let mut data = vec![0u8; end as usize];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut data)?;
    Ok((data, len))
}

/// Reads every journal file of `dir` and finds the first damage; nothing is written.
fn scan_journals(dir: &Path) -> Result<Report, RepairError> {
    let files = journal_files(dir)?;
    let mut report = Report { journals: files.clone(), ..Report::default() };
    for file in &files {
        let (buf, file_len) = read_journal(file).map_err(io_err("cannot read journal", file))?;
        let scan = scan_journal(&buf);
        if report.damage.is_some() {
            // After the damaged file: dropped whole.
            let mut seqnos = Vec::new();
            let mut p = 0;
            while p < scan.data_end {
                match parse_batch(&buf, p) {
                    Ok(b) => {
                        seqnos.push(b.seqno);
                        p = b.end;
                    }
                    Err(_) => p += 1,
                }
            }
            report.later.push(LaterJournal {
                file: file.clone(),
                batches: seqnos.len() as u64,
                bytes: scan.data_end as u64,
                seqnos,
            });
            continue;
        }
        report.kept_batches += scan.good;
        if let Some((fault, seqno)) = scan.stop {
            let mut dropped_seqnos: Vec<u64> = seqno.into_iter().collect();
            dropped_seqnos.extend(&scan.after);
            // The damaged batch counts when its start was readable (a batch was there).
            let damaged_batch = u64::from(fault != BatchFault::TrailingBytes);
            report.damage = Some(JournalDamage {
                file: file.clone(),
                at: scan.good_end as u64,
                fault,
                kept_batches: scan.good,
                dropped_batches: damaged_batch + scan.after.len() as u64,
                // A file cut short ends (nearly) at its data: its last bytes are the cut
                // batch's, zeros or not. Otherwise the zeros after the data are fjall's
                // pre-allocation, not dropped data.
                dropped_bytes: if fault == BatchFault::Cut && file_len - (scan.data_end as u64) < CUT_SLACK {
                    file_len - scan.good_end as u64
                } else {
                    (scan.data_end - scan.good_end) as u64
                },
                dropped_seqnos,
            });
        }
    }
    Ok(report)
}

// === tables ===

/// The sections of a table file that are runs of blocks (the others, `table_version` and
/// `linked_blob_files`, are small plain records).
const BLOCK_SECTIONS: &[&[u8]] = &[b"data", b"tli", b"index", b"filter", b"filter_tli", b"meta"];

/// Checks one table file: its table of contents (trailer and checksum), then every block
/// of every block section: the header's own checksum and the data's checksum.
fn check_table(buf: &[u8]) -> Option<(u64, &'static str)> {
    let Ok(archive) = sfa::Reader::from_reader(&mut io::Cursor::new(buf)) else {
        return Some((buf.len() as u64, "the table of contents (at the end of the file) is unreadable"));
    };
    for section in archive.toc().iter().filter(|s| BLOCK_SECTIONS.contains(&s.name())) {
        let (start, end) = (section.pos() as usize, (section.pos() + section.len()) as usize);
        if end > buf.len() {
            return Some((start as u64, "a section runs past the end of the file"));
        }
        if let Some((at, what)) = check_blocks(&buf[start..end]) {
            return Some((start as u64 + at, what));
        }
    }
    None
}

/// Checks a run of blocks against their checksums.
fn check_blocks(buf: &[u8]) -> Option<(u64, &'static str)> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let Some(h) = buf.get(pos..pos + BLOCK_HEADER_LEN) else {
            return Some((pos as u64, "the section ends inside a block header"));
        };
        if &h[..4] != BLOCK_MAGIC {
            return Some((pos as u64, "not a block header (bad magic)"));
        }
        let header_sum = xxh3_128(&h[..BLOCK_HEADER_LEN - 4]) as u32;
        if header_sum != le_u32(&h[BLOCK_HEADER_LEN - 4..]) {
            return Some((pos as u64, "block header checksum mismatch"));
        }
        let sum = u128::from_le_bytes(h[5..21].try_into().expect("16 bytes"));
        let len = le_u32(&h[21..25]) as usize;
        let data_start = pos + BLOCK_HEADER_LEN;
        let Some(data) = buf.get(data_start..data_start + len) else {
            return Some((pos as u64, "the section ends inside a block"));
        };
        if xxh3_128(data) != sum {
            return Some((pos as u64, "block checksum mismatch"));
        }
        pos = data_start + len;
    }
    None
}

/// The table files of every keyspace (`<data>/keyspaces/<id>/tables/<n>`).
fn table_files(dir: &Path) -> Result<Vec<PathBuf>, RepairError> {
    let mut out = Vec::new();
    let keyspaces = dir.join("keyspaces");
    let Ok(entries) = fs::read_dir(&keyspaces) else {
        return Ok(out);
    };
    for ks in entries {
        let ks = ks.map_err(io_err("cannot read", &keyspaces))?;
        let tables = ks.path().join("tables");
        let Ok(files) = fs::read_dir(&tables) else {
            continue;
        };
        for f in files {
            let f = f.map_err(io_err("cannot read", &tables))?;
            if f.path().is_file() && f.file_name().to_str().is_some_and(|n| n.parse::<u64>().is_ok()) {
                out.push(f.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the data directory without writing anything: the journals' first damage and
/// what repairing it would drop, and every table file's blocks against their checksums.
pub fn check(dir: &Path) -> Result<Report, RepairError> {
    // A mistyped directory is an error, not an intact store.
    fs::read_dir(dir).map_err(io_err("cannot read the data directory", dir))?;
    let in_use = matches!(lock(dir), Err(e) if e.source.kind() == io::ErrorKind::WouldBlock);
    let mut report = scan_journals(dir)?;
    report.in_use = in_use;
    for file in table_files(dir)? {
        let buf = fs::read(&file).map_err(io_err("cannot read table", &file))?;
        report.tables_checked += 1;
        if let Some((at, what)) = check_table(&buf) {
            report.tables.push(TableDamage { file, at, what });
        }
    }
    Ok(report)
}

/// A name for this repair's directory under `damaged/`: the UTC time, and a suffix when
/// that name is taken.
fn damaged_dir(dir: &Path) -> PathBuf {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    let base = dir.join(DAMAGED_DIR);
    let mut path = base.join(&now);
    let mut n = 1;
    while path.exists() {
        path = base.join(format!("{now}-{n}"));
        n += 1;
    }
    path
}

/// What start-up recovery does before fjall opens `dir`: when a journal is damaged, copy
/// it into `damaged/<time>/`, cut it at the end of its last good batch, and move every
/// later journal file there too. A clean directory is not written at all. Tables are not
/// read here (that is [`check`]; a damaged table is found by the reads that hit it).
pub fn repair(dir: &Path) -> Result<Report, RepairError> {
    let _lock = lock(dir)?;
    let mut report = scan_journals(dir)?;
    let Some(damage) = &report.damage else {
        return Ok(report);
    };
    let aside = damaged_dir(dir);
    fs::create_dir_all(&aside).map_err(io_err("cannot create", &aside))?;
    let name = |p: &Path| aside.join(p.file_name().expect("journal files have names"));
    let copy = name(&damage.file);
    fs::copy(&damage.file, &copy).map_err(io_err("cannot copy the damaged journal to", &copy))?;
    fsync(&copy)?;
    for later in &report.later {
        let to = name(&later.file);
        fs::rename(&later.file, &to).map_err(io_err("cannot move a later journal to", &to))?;
    }
    let file = fs::OpenOptions::new().write(true).open(&damage.file).map_err(io_err("cannot open", &damage.file))?;
    file.set_len(damage.at).map_err(io_err("cannot truncate", &damage.file))?;
    file.sync_all().map_err(io_err("cannot fsync", &damage.file))?;
    fsync_dir(&aside)?;
    fsync_dir(dir)?;
    report.moved_to = Some(aside);
    Ok(report)
}

/// Takes the lock fjall takes on the store (`<dir>/lock`), so a repair never runs under a
/// node that has the store open; None when there is no store yet.
// Start-up only (before the node serves, like fjall's own open, which sleeps the same way)
// or the CLI: never on a runtime worker that routes.
#[allow(clippy::disallowed_methods)]
fn lock(dir: &Path) -> Result<Option<fs::File>, RepairError> {
    let path = dir.join("lock");
    let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot open the store's lock file", &path)(e)),
    };
    // As fjall does: a store closed a moment ago (its last threads ending) may still hold
    // the lock for a few milliseconds, so try three times, 100 ms apart.
    for attempt in 1..=3 {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) if attempt < 3 => std::thread::sleep(Duration::from_millis(100)),
            Err(fs::TryLockError::WouldBlock) => break,
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &path)(e)),
        }
    }
    Err(RepairError {
        what: "a running node holds the store's lock",
        path,
        source: io::Error::from(io::ErrorKind::WouldBlock),
    })
}

fn fsync(path: &Path) -> Result<(), RepairError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err("cannot fsync", path))
}

fn fsync_dir(path: &Path) -> Result<(), RepairError> {
    fsync(path)
}

#[cfg(test)]
mod tests;
