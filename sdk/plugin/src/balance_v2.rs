//! ABI v2 for balancing: fixed-size little-endian records for nodes and partitions, node
//! ids interned as indices (nodes sorted by id), each partition's current followers as
//! indices, and a compact answer: an owner index per partition and, optionally, its
//! followers. `README.md` ("ABI v2: balancing") specifies the layout byte for byte; this
//! module is its one implementation, used by both sides:
//!
//! - host side: [`BalanceEncoder`] keeps the last encoded input and rewrites only the
//!   records whose fields changed (a steady cluster re-encodes almost nothing), and
//!   [`decode_output`] reads and checks the guest's answer against it;
//! - guest side: [`parse_input`] views the input without copying (a [`BalanceView`] reads
//!   [`Node`] and [`Partition`] records in place), [`encode_output`] writes a
//!   [`Placement`], and [`export_balance!`](crate::export_balance) glues a plain function to
//!   them;
//! - natively, [`call_balance`] runs a policy through the whole byte path, for plugin tests.
//!
//! It must never do I/O: it is compiled for wasm32 too.

use std::borrow::Cow;

use serde::de::DeserializeOwned;

use crate::balance::NONE;
use crate::guest::{parse_params, IntoGuestResult};
use crate::{BalanceDecision, BalanceInput, BalancePlan, GuestResult, ReplicaInput};

/// `kind` of a balance call in the v2 input header.
pub const KIND_BALANCE: u32 = 3;
/// Input header length.
pub const HEADER_LEN: usize = 48;
/// One node record.
pub const NODE_LEN: usize = 48;
/// One partition record.
pub const PARTITION_LEN: usize = 32;
/// Output header length.
pub const OUTPUT_HEADER_LEN: usize = 16;

/// One live node, exactly as it lies in the input buffer (48 bytes, little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Node {
    /// Relative capacity (1.0 = a standard node).
    pub weight: f64,
    /// Messages per second over all its partitions.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Client connections.
    pub connections: u64,
    /// Where its id lies in the input (read it with [`BalanceView::node_id`]).
    id_off: u32,
    /// Length of its id.
    id_len: u32,
    /// Where its zone lies (read it with [`BalanceView::zone`]).
    zone_off: u32,
    /// Length of its zone.
    zone_len: u32,
}

/// One partition, exactly as it lies in the input buffer (32 bytes, little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Partition {
    /// Messages per second.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Subscribers (connections) on its channels.
    pub connections: u64,
    /// Index of its live owner in the node table, or [`NONE`] (no owner, a departed or a
    /// draining one: it must be placed, and placing it is not a move).
    pub owner: u32,
    /// Zero.
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == NODE_LEN && std::mem::align_of::<Node>() == 8);
const _: () = assert!(std::mem::size_of::<Partition>() == PARTITION_LEN && std::mem::align_of::<Partition>() == 8);

impl Partition {
    /// The live owner's index, if any.
    pub fn owner(&self) -> Option<usize> {
        (self.owner != NONE).then_some(self.owner as usize)
    }
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` at `at` unless they are already there; true when it wrote.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> bool {
    let slot = &mut buf[at..at + bytes.len()];
    if slot == bytes {
        return false;
    }
    slot.copy_from_slice(bytes);
    true
}

fn get32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn get64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

// === host side: the input ===

/// The host's encoder of balance inputs: it keeps the last input it encoded and, when the
/// shape (node ids, partition count, replicas, params) is the same, rewrites only the
/// records whose fields changed; owner and follower ids are interned through the last
/// round's answers, so an unchanged partition costs one string comparison.
#[derive(Debug, Default)]
pub struct BalanceEncoder {
    /// The encoded input, exactly as the guest gets it.
    buf: Vec<u8>,
    /// Node ids in index order (sorted, unique), as last encoded.
    ids: Vec<String>,
    /// Node id → index (FxHash: node ids are few and chosen by operators, not clients).
    index: crate::fx::FxHashMap<String, u32>,
    /// Per partition: the owner id last encoded (None = no owner) and its index.
    owners: Vec<(Option<String>, u32)>,
    /// Per partition: the owner index and follower ids its follower row was encoded from.
    followers: Vec<(u32, Vec<String>)>,
    params: String,
    replicas: u32,
    /// Where the follower table starts.
    followers_at: usize,
    /// Records (node, partition, follower row) written by the last [`BalanceEncoder::encode`].
    rewritten: usize,
}

impl BalanceEncoder {
    /// Encodes one round's input (`replicas.replicas` is capped to `1..=max(nodes, 1)`) and
    /// returns the bytes. `replicas.followers` may be shorter than the partitions (missing
    /// rows have no followers).
    pub fn encode(&mut self, params: &str, input: &BalanceInput, replicas: &ReplicaInput) -> &[u8] {
        let mut order: Vec<usize> = (0..input.nodes.len()).collect();
        order.sort_by(|&a, &b| input.nodes[a].id.cmp(&input.nodes[b].id).then(a.cmp(&b)));
        order.dedup_by(|a, b| input.nodes[*a].id == input.nodes[*b].id);
        let want = replicas.replicas.clamp(1, (order.len() as u32).max(1));
        let same_shape = self.params == params
            && self.replicas == want
            && self.owners.len() == input.partitions.len()
            && self.ids.len() == order.len()
            && order.iter().zip(&self.ids).all(|(&i, id)| input.nodes[i].id == *id)
            && self.zones_match(input, &order);
        if !same_shape {
            self.reshape(params, input, &order, want);
        }
        self.rewritten = 0;
        put64(&mut self.buf, 8, input.now_ms);
        put32(&mut self.buf, 32, input.max_moves);
        for (i, &n) in order.iter().enumerate() {
            let node = &input.nodes[n];
            let at = HEADER_LEN + NODE_LEN * i;
            let mut rec = [0u8; 32];
            rec[0..8].copy_from_slice(&node.weight.to_le_bytes());
            rec[8..16].copy_from_slice(&node.msg_rate.to_le_bytes());
            rec[16..24].copy_from_slice(&node.bytes.to_le_bytes());
            rec[24..32].copy_from_slice(&node.connections.to_le_bytes());
            self.rewritten += put(&mut self.buf, at, &rec) as usize;
        }
        let partitions_at = HEADER_LEN + NODE_LEN * self.ids.len();
        for (j, p) in input.partitions.iter().enumerate() {
            let cached = &mut self.owners[j];
            if cached.0 != p.owner {
                let idx = p.owner.as_deref().and_then(|o| self.index.get(o).copied()).unwrap_or(NONE);
                *cached = (p.owner.clone(), idx);
            }
            let mut rec = [0u8; PARTITION_LEN];
            rec[0..8].copy_from_slice(&p.msg_rate.to_le_bytes());
            rec[8..16].copy_from_slice(&p.bytes.to_le_bytes());
            rec[16..24].copy_from_slice(&p.connections.to_le_bytes());
            rec[24..28].copy_from_slice(&cached.1.to_le_bytes());
            self.rewritten += put(&mut self.buf, partitions_at + PARTITION_LEN * j, &rec) as usize;
        }
        let slots = want as usize - 1;
        if slots > 0 {
            let empty = Vec::new();
            for j in 0..input.partitions.len() {
                let now = replicas.followers.get(j).unwrap_or(&empty);
                let owner = self.owners[j].1;
                if self.followers[j].0 == owner && self.followers[j].1 == *now {
                    continue;
                }
                // Live followers other than the shown owner, in order; then empty slots.
                let mut row = vec![NONE; slots];
                let live = now.iter().filter_map(|f| self.index.get(f.as_str()).copied()).filter(|&f| f != owner);
                let mut k = 0;
                for f in live {
                    if k < slots && !row[..k].contains(&f) {
                        row[k] = f;
                        k += 1;
                    }
                }
                let at = self.followers_at + 4 * slots * j;
                let bytes: Vec<u8> = row.iter().flat_map(|f| f.to_le_bytes()).collect();
                self.rewritten += put(&mut self.buf, at, &bytes) as usize;
                self.followers[j] = (owner, now.clone());
            }
        }
        &self.buf
    }

    fn zones_match(&self, input: &BalanceInput, order: &[usize]) -> bool {
        order.iter().enumerate().all(|(i, &n)| {
            let at = HEADER_LEN + NODE_LEN * i;
            let (off, len) = (get32(&self.buf, at + 40).unwrap_or(0) as usize, get32(&self.buf, at + 44).unwrap_or(0));
            self.buf.get(off..off + len as usize) == Some(input.nodes[n].zone.as_bytes())
        })
    }

    /// A full rebuild: a new layout (nodes, partitions, replicas or params changed).
    fn reshape(&mut self, params: &str, input: &BalanceInput, order: &[usize], want: u32) {
        let (n, p, slots) = (order.len(), input.partitions.len(), want as usize - 1);
        self.ids = order.iter().map(|&i| input.nodes[i].id.clone()).collect();
        self.index = self.ids.iter().enumerate().map(|(i, id)| (id.clone(), i as u32)).collect();
        self.owners = vec![(None, NONE); p];
        // A follower row that never matches, so the first encode writes every row.
        self.followers = vec![(NONE, vec![String::new()]); p];
        self.params = params.to_string();
        self.replicas = want;
        self.followers_at = HEADER_LEN + NODE_LEN * n + PARTITION_LEN * p;
        let strings_at = self.followers_at + 4 * slots * p;
        let strings: usize = order.iter().map(|&i| input.nodes[i].id.len() + input.nodes[i].zone.len()).sum();
        self.buf = vec![0u8; strings_at + params.len() + strings];
        let buf = &mut self.buf;
        put32(buf, 0, crate::v2::ABI);
        put32(buf, 4, KIND_BALANCE);
        put32(buf, 16, strings_at as u32);
        put32(buf, 20, params.len() as u32);
        put32(buf, 24, u32::try_from(n).expect("nodes fit u32"));
        put32(buf, 28, u32::try_from(p).expect("partitions fit u32"));
        put32(buf, 36, want);
        put32(buf, 40, self.followers_at as u32);
        buf[strings_at..strings_at + params.len()].copy_from_slice(params.as_bytes());
        let mut at = strings_at + params.len();
        for (i, &node) in order.iter().enumerate() {
            let r = HEADER_LEN + NODE_LEN * i;
            for (k, s) in [&input.nodes[node].id, &input.nodes[node].zone].into_iter().enumerate() {
                put32(buf, r + 32 + 8 * k, at as u32);
                put32(buf, r + 36 + 8 * k, s.len() as u32);
                buf[at..at + s.len()].copy_from_slice(s.as_bytes());
                at += s.len();
            }
        }
        for j in 0..p {
            put32(buf, HEADER_LEN + NODE_LEN * n + PARTITION_LEN * j + 24, NONE);
        }
        for f in &mut buf[self.followers_at..strings_at] {
            *f = 0xff;
        }
    }

    /// The last encoded input.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Node ids in index order, as last encoded.
    pub fn node_ids(&self) -> &[String] {
        &self.ids
    }

    /// Each partition's owner index as last encoded ([`NONE`]: no live owner).
    pub fn owner_indices(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.owners.iter().map(|o| o.1)
    }

    /// Follower slots per partition (`replicas - 1`) as last encoded.
    pub fn follower_slots(&self) -> usize {
        self.replicas.saturating_sub(1) as usize
    }

    /// Records (node, partition, follower row) the last encode had to write.
    pub fn rewritten(&self) -> usize {
        self.rewritten
    }
}

// === guest side: the input ===

/// What a v2 balancing policy sees: the live nodes (by index, sorted by id), every
/// partition with its load, current owner and current followers, the move budget and the
/// wanted number of copies.
#[derive(Debug, Clone)]
pub struct BalanceView<'a> {
    buf: &'a [u8],
    params: &'a str,
    now_ms: u64,
    max_moves: u32,
    replicas: u32,
    nodes: Cow<'a, [Node]>,
    partitions: Cow<'a, [Partition]>,
    followers: Cow<'a, [u32]>,
}

impl<'a> BalanceView<'a> {
    /// Live nodes; node `i` has index `i`, ids ascending and unique.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Every partition, indexed by partition id.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// Id of node `i` ("" when out of range).
    pub fn node_id(&self, i: usize) -> &'a str {
        self.nodes.get(i).map_or("", |n| self.str_at(n.id_off, n.id_len))
    }

    /// Failure zone of node `i` ("" when unknown or out of range).
    pub fn zone(&self, i: usize) -> &'a str {
        self.nodes.get(i).map_or("", |n| self.str_at(n.zone_off, n.zone_len))
    }

    fn str_at(&self, off: u32, len: u32) -> &'a str {
        let (off, len) = (off as usize, len as usize);
        off.checked_add(len)
            .and_then(|end| self.buf.get(off..end))
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The binding's params as JSON text.
    pub fn params(&self) -> &'a str {
        self.params
    }

    /// Most partitions whose live owner may change this round.
    pub fn max_moves(&self) -> u32 {
        self.max_moves
    }

    /// Current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Copies each partition should have, leader included (1: no followers). At most the
    /// number of live nodes.
    pub fn replicas(&self) -> usize {
        self.replicas as usize
    }

    /// Follower slots per partition: `replicas() - 1`.
    pub fn follower_slots(&self) -> usize {
        self.replicas().saturating_sub(1)
    }

    /// Partition `p`'s current live followers (node indices, never its owner), in the
    /// map's order.
    pub fn followers(&self, p: usize) -> impl Iterator<Item = u32> + '_ {
        let slots = self.follower_slots();
        self.followers.get(p * slots..(p + 1) * slots).unwrap_or(&[]).iter().copied().filter(|&f| f != NONE)
    }

    /// The current owner of every partition ([`NONE`]: none live), for [`crate::balance::spread`].
    pub fn owners(&self) -> Vec<u32> {
        self.partitions.iter().map(|p| p.owner).collect()
    }

    /// Followers for the new `owners` by [`crate::balance::place_followers`], the router's
    /// built-in placement (keeps current copies where it can; the old owner of a moved
    /// partition first). None when `replicas() == 1`.
    pub fn place_followers(&self, owners: &[u32]) -> Option<Vec<u32>> {
        if self.follower_slots() == 0 {
            return None;
        }
        let candidates = |p: usize| {
            let old = self.partitions.get(p).map_or(NONE, |x| x.owner);
            let moved = (old != owners[p]).then_some(old);
            moved.into_iter().chain(self.followers(p))
        };
        Some(crate::balance::place_followers(self.nodes.len(), owners, self.replicas(), candidates, |_| false))
    }
}

/// Views an input buffer. Records are read in place when the buffer is 8-aligned (always
/// on wasm32: `switchyard_alloc` aligns), copied otherwise.
pub fn parse_input(buf: &[u8]) -> Result<BalanceView<'_>, String> {
    let bad = |what: &str| format!("malformed v2 balance input: {what}");
    let field32 = |at: usize| get32(buf, at).ok_or_else(|| bad("short header"));
    if field32(0)? != crate::v2::ABI || field32(4)? != KIND_BALANCE {
        return Err(bad("not a v2 balance call"));
    }
    let now_ms = get64(buf, 8).ok_or_else(|| bad("short header"))?;
    let (params_at, params_len) = (field32(16)? as usize, field32(20)? as usize);
    let (n, p) = (field32(24)? as usize, field32(28)? as usize);
    let (max_moves, replicas, followers_at) = (field32(32)?, field32(36)?.max(1), field32(40)? as usize);
    let slots = replicas as usize - 1;
    let range = |at: usize, count: usize, size: usize| {
        count.checked_mul(size).and_then(|len| at.checked_add(len)).and_then(|end| buf.get(at..end))
    };
    let params = range(params_at, params_len, 1).ok_or_else(|| bad("params range"))?;
    let params = std::str::from_utf8(params).map_err(|_| bad("params not UTF-8"))?;
    let node_bytes = range(HEADER_LEN, n, NODE_LEN).ok_or_else(|| bad("node table"))?;
    let partitions_at = HEADER_LEN + NODE_LEN * n;
    let partition_bytes = range(partitions_at, p, PARTITION_LEN).ok_or_else(|| bad("partition table"))?;
    let follower_bytes =
        p.checked_mul(slots).and_then(|c| range(followers_at, c, 4)).ok_or_else(|| bad("follower table"))?;
    let nodes = in_place::<Node>(node_bytes).map(Cow::Borrowed).unwrap_or_else(|| {
        Cow::Owned(
            node_bytes
                .chunks_exact(NODE_LEN)
                .map(|r| Node {
                    weight: f64::from_bits(get64(r, 0).unwrap_or(0)),
                    msg_rate: f64::from_bits(get64(r, 8).unwrap_or(0)),
                    bytes: get64(r, 16).unwrap_or(0),
                    connections: get64(r, 24).unwrap_or(0),
                    id_off: get32(r, 32).unwrap_or(0),
                    id_len: get32(r, 36).unwrap_or(0),
                    zone_off: get32(r, 40).unwrap_or(0),
                    zone_len: get32(r, 44).unwrap_or(0),
                })
                .collect(),
        )
    });
    let partitions = in_place::<Partition>(partition_bytes).map(Cow::Borrowed).unwrap_or_else(|| {
        Cow::Owned(
            partition_bytes
                .chunks_exact(PARTITION_LEN)
                .map(|r| Partition {
                    msg_rate: f64::from_bits(get64(r, 0).unwrap_or(0)),
                    bytes: get64(r, 8).unwrap_or(0),
                    connections: get64(r, 16).unwrap_or(0),
                    owner: get32(r, 24).unwrap_or(NONE),
                    reserved: 0,
                })
                .collect(),
        )
    });
    let followers = in_place::<u32>(follower_bytes)
        .map(Cow::Borrowed)
        .unwrap_or_else(|| Cow::Owned(follower_bytes.chunks_exact(4).map(|c| get32(c, 0).unwrap_or(NONE)).collect()));
    Ok(BalanceView { buf, params, now_ms, max_moves, replicas, nodes, partitions, followers })
}

/// A table of plain records read in place, when `bytes` is aligned for `T` on a
/// little-endian target.
#[allow(unsafe_code)]
fn in_place<T: Plain>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if cfg!(target_endian = "big")
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || !bytes.len().is_multiple_of(size)
    {
        return None;
    }
    // SAFETY: `T` is `Plain`: `repr(C)` (or a primitive) of integers and floats without
    // padding, so any bit pattern is a valid value; the pointer is aligned for it, the
    // length is a whole number of records, and the records are little-endian as on this
    // target.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Types read in place from an input buffer: every bit pattern is a valid value.
trait Plain {}
impl Plain for Node {}
impl Plain for Partition {}
impl Plain for u32 {}

// === guest side: the output ===

/// A v2 balancer's answer, in node indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `owners[p]`: the index of partition p's owner (a live node).
    pub owners: Vec<u32>,
    /// None: the router places the followers (its built-in placement). Some: exactly
    /// [`BalanceView::follower_slots`] node indices per partition (partition p's at
    /// `[p * slots, (p + 1) * slots)`), distinct, none of them its owner.
    pub followers: Option<Vec<u32>>,
}

impl IntoGuestResult<Placement> for Placement {
    fn into_guest_result(self) -> GuestResult<Placement> {
        Ok(self)
    }
}

/// Encodes a guest's answer (`slots` follower slots per partition when it has followers).
pub fn encode_output(result: &GuestResult<Placement>, slots: usize) -> Vec<u8> {
    let placement = match result {
        Err(message) => {
            let mut out = Vec::with_capacity(8 + message.len());
            out.extend_from_slice(&crate::v2::STATUS_ERROR.to_le_bytes());
            out.extend_from_slice(&(message.len() as u32).to_le_bytes());
            out.extend_from_slice(message.as_bytes());
            return out;
        }
        Ok(p) => p,
    };
    let followers = placement.followers.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(OUTPUT_HEADER_LEN + 4 * (placement.owners.len() + followers.len()));
    out.extend_from_slice(&crate::v2::STATUS_OK.to_le_bytes());
    out.extend_from_slice(&(placement.owners.len() as u32).to_le_bytes());
    let slots = if placement.followers.is_some() { slots as u32 } else { 0 };
    out.extend_from_slice(&slots.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for x in placement.owners.iter().chain(followers) {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Runs one call's byte path without the pointers: views `bytes`, parses the params, runs
/// `f` and encodes its placement (or its error). A placement of the wrong shape becomes the
/// guest's own error, with a message saying what is wrong.
pub fn handle<P: DeserializeOwned, R: IntoGuestResult<Placement>>(
    bytes: &[u8],
    f: impl Fn(&BalanceView<'_>, &P) -> R,
) -> Vec<u8> {
    let mut slots = 0;
    let result = parse_input(bytes).and_then(|view| {
        slots = view.follower_slots();
        let params: P = parse_params(view.params())?;
        let placement = f(&view, &params).into_guest_result()?;
        let p = view.partitions().len();
        if placement.owners.len() != p {
            return Err(format!("placement has {} owners for {p} partitions", placement.owners.len()));
        }
        if let Some(f) = &placement.followers {
            if f.len() != p * slots {
                return Err(format!("placement has {} followers; {p} partitions × {slots} slots", f.len()));
            }
        }
        Ok(placement)
    });
    encode_output(&result, slots)
}

// === host side: the output ===

/// A decoded, checked answer, in node indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Owner index per partition.
    pub owners: Vec<u32>,
    /// `slots` follower indices per partition, when the guest placed them.
    pub followers: Option<Vec<u32>>,
}

/// Reads a guest's output for an input of `nodes` nodes, partitions with `current` owners
/// ([`NONE`]: none live), `slots` follower slots and a budget of `max_moves`. It checks
/// everything the host's rules need: one live owner per partition, at most `max_moves`
/// live owners changed, and followers (when present) on distinct live nodes other than
/// the owner, `slots` of them. Never a panic, whatever the bytes.
pub fn decode_output(
    out: &[u8],
    nodes: usize,
    current: &[u32],
    slots: usize,
    max_moves: u32,
) -> Result<Answer, crate::v2::OutputError> {
    use crate::v2::OutputError::{Garbage, Guest, Invalid};
    let (Some(status), Some(n)) = (get32(out, 0), get32(out, 4)) else {
        return Err(Garbage(format!("output of {} bytes has no header", out.len())));
    };
    let n = n as usize;
    match status {
        crate::v2::STATUS_OK => {}
        crate::v2::STATUS_ERROR => {
            let Some(text) = out.get(8..).filter(|t| t.len() == n) else {
                return Err(Garbage(format!("error message of {n} bytes in {} bytes", out.len())));
            };
            return Err(Guest(String::from_utf8_lossy(text).chars().take(512).collect()));
        }
        s => return Err(Garbage(format!("output status {s}"))),
    }
    let (given, reserved) = (get32(out, 8).unwrap_or(0) as usize, get32(out, 12));
    if reserved != Some(0) {
        return Err(Garbage("reserved header bytes not zero".into()));
    }
    let p = current.len();
    if n != p {
        return Err(Invalid(format!("{n} owners for {p} partitions")));
    }
    if given != 0 && given != slots {
        return Err(Invalid(format!("{given} follower slots per partition; the input has {slots}")));
    }
    let expected = OUTPUT_HEADER_LEN + 4 * (p + p * given);
    if out.len() != expected {
        return Err(Garbage(format!("output of {} bytes; {p} partitions need {expected}", out.len())));
    }
    let word = |i: usize| u32::from_le_bytes(out[OUTPUT_HEADER_LEN + 4 * i..][..4].try_into().expect("4 bytes"));
    let owners: Vec<u32> = (0..p).map(word).collect();
    if let Some((j, o)) = owners.iter().enumerate().find(|(_, &o)| o as usize >= nodes) {
        return Err(Invalid(format!("partition {j} given to node index {o}; there are {nodes} live nodes")));
    }
    let moves = owners.iter().zip(current).filter(|(new, old)| **old != NONE && new != old).count();
    if moves > max_moves as usize {
        return Err(Invalid(format!("{moves} partitions moved; the limit is {max_moves}")));
    }
    if given == 0 {
        return Ok(Answer { owners, followers: None });
    }
    let followers: Vec<u32> = (0..p * given).map(|i| word(p + i)).collect();
    for (j, row) in followers.chunks_exact(given).enumerate() {
        for (k, &f) in row.iter().enumerate() {
            let why = if f as usize >= nodes {
                "not a live node"
            } else if f == owners[j] {
                "its owner"
            } else if row[..k].contains(&f) {
                "given twice"
            } else {
                continue;
            };
            return Err(Invalid(format!("partition {j}: follower {f} is {why}")));
        }
    }
    Ok(Answer { owners, followers: Some(followers) })
}

/// The node-id form of an answer, with `ids` the input's node ids in index order.
pub fn answer_to_plan(answer: &Answer, ids: &[String]) -> BalancePlan {
    let owners = answer.owners.iter().map(|&o| ids[o as usize].clone()).collect();
    let slots = if answer.owners.is_empty() {
        0
    } else {
        answer.followers.as_ref().map_or(0, |f| f.len() / answer.owners.len())
    };
    let followers = answer.followers.as_ref().map(|f| {
        if slots == 0 {
            return vec![Vec::new(); answer.owners.len()];
        }
        f.chunks_exact(slots).map(|row| row.iter().map(|&x| ids[x as usize].clone()).collect()).collect()
    });
    BalancePlan { decision: BalanceDecision { owners }, followers }
}

/// Largest output a valid answer for `partitions` and `slots` can need.
pub fn max_output(partitions: usize, slots: usize) -> usize {
    OUTPUT_HEADER_LEN + 4 * partitions * (1 + slots)
}

// === native: the whole path ===

/// Runs a v2 balancing policy natively through the whole byte path (encode, view, run,
/// answer, decode and check), as the router and the wasm glue would; for plugin unit
/// tests. Errors are the guest's own, or what the host would refuse.
pub fn call_balance<P: DeserializeOwned, R: IntoGuestResult<Placement>>(
    params: &str,
    input: &BalanceInput,
    replicas: &ReplicaInput,
    f: impl Fn(&BalanceView<'_>, &P) -> R,
) -> GuestResult<BalancePlan> {
    let mut enc = BalanceEncoder::default();
    let out = handle(enc.encode(params, input, replicas), f);
    let current: Vec<u32> = enc.owner_indices().collect();
    match decode_output(&out, enc.node_ids().len(), &current, enc.follower_slots(), input.max_moves) {
        Ok(answer) => Ok(answer_to_plan(&answer, enc.node_ids())),
        Err(crate::v2::OutputError::Guest(m)) => Err(m),
        Err(crate::v2::OutputError::Garbage(m) | crate::v2::OutputError::Invalid(m)) => Err(format!("refused: {m}")),
    }
}

// === wasm32 glue ===

/// Type check used by [`export_balance!`](crate::export_balance) natively.
#[doc(hidden)]
pub fn check_balance<P: DeserializeOwned, R: IntoGuestResult<Placement>>(_: impl Fn(&BalanceView<'_>, &P) -> R) {}

/// Exports `$f: fn(&BalanceView, &P) -> Placement` (or `-> Result<Placement, E: Display>`)
/// as the ABI v2 entry point `switchyard_balance`, where `P: DeserializeOwned` is the params
/// type. On wasm32 it defines the export; natively it only checks `$f`'s signature, so
/// `cargo test` tests `$f` directly (or through [`call_balance`]). Use it once per crate.
#[macro_export]
macro_rules! export_balance {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_balance(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::balance_v2::handle(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::balance_v2::check_balance($f)
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeInfo, PartitionInfo};
    use proptest::prelude::*;

    fn node(id: &str, zone: &str) -> NodeInfo {
        NodeInfo { id: id.into(), zone: zone.into(), weight: 1.0, ..Default::default() }
    }

    fn part(id: u32, owner: Option<&str>) -> PartitionInfo {
        PartitionInfo { id, owner: owner.map(String::from), ..Default::default() }
    }

    fn strings(rows: &[&[&str]]) -> Vec<Vec<String>> {
        rows.iter().map(|r| r.iter().map(|s| s.to_string()).collect()).collect()
    }

    /// The README's byte-for-byte example.
    #[test]
    fn the_readme_example_is_exact() {
        let input = BalanceInput {
            nodes: vec![node("b", ""), NodeInfo { msg_rate: 2.5, connections: 3, ..node("a", "z") }],
            partitions: vec![
                PartitionInfo { msg_rate: 2.5, bytes: 10, connections: 3, ..part(0, Some("a")) },
                part(1, Some("gone")),
            ],
            max_moves: 8,
            now_ms: 99,
        };
        let replicas = ReplicaInput { replicas: 2, followers: strings(&[&["b"], &["a"]]) };
        let mut enc = BalanceEncoder::default();
        let buf = enc.encode("{}", &input, &replicas).to_vec();
        let mut expected = Vec::new();
        let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        let le64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
        for x in [2, 3] {
            le32(&mut expected, x);
        }
        le64(&mut expected, 99);
        for x in [216, 2, 2, 2, 8, 2, 208, 0] {
            le32(&mut expected, x);
        }
        // node 0: "a" (sorted first), zone "z"
        le64(&mut expected, 1f64.to_bits());
        le64(&mut expected, 2.5f64.to_bits());
        le64(&mut expected, 0);
        le64(&mut expected, 3);
        for x in [218, 1, 219, 1] {
            le32(&mut expected, x);
        }
        // node 1: "b", no zone
        le64(&mut expected, 1f64.to_bits());
        le64(&mut expected, 0);
        le64(&mut expected, 0);
        le64(&mut expected, 0);
        for x in [220, 1, 221, 0] {
            le32(&mut expected, x);
        }
        // partition 0: owner a = 0; partition 1: no live owner
        le64(&mut expected, 2.5f64.to_bits());
        le64(&mut expected, 10);
        le64(&mut expected, 3);
        le32(&mut expected, 0);
        le32(&mut expected, 0);
        le64(&mut expected, 0);
        le64(&mut expected, 0);
        le64(&mut expected, 0);
        le32(&mut expected, NONE);
        le32(&mut expected, 0);
        // followers: partition 0 -> b = 1; partition 1 -> a = 0
        le32(&mut expected, 1);
        le32(&mut expected, 0);
        expected.extend_from_slice(b"{}azb");
        assert_eq!(buf.len(), 221);
        assert_eq!(buf, expected);

        let view = parse_input(&buf).unwrap();
        assert_eq!((view.node_id(0), view.zone(0), view.node_id(1), view.zone(1)), ("a", "z", "b", ""));
        assert_eq!(view.partitions()[1].owner(), None);
        assert_eq!(view.followers(0).collect::<Vec<_>>(), [1]);
        // The answer: partition 0 stays on a (follower b), partition 1 goes to b (follower a).
        let answer = Placement { owners: vec![0, 1], followers: Some(vec![1, 0]) };
        let out = encode_output(&Ok(answer), 1);
        let words: Vec<u8> = [0u32, 2, 1, 0, 0, 1, 1, 0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(out, words);
        let decoded = decode_output(&out, 2, &[0, NONE], 1, 8).unwrap();
        let plan = answer_to_plan(&decoded, enc.node_ids());
        assert_eq!(plan.decision.owners, ["a", "b"]);
        assert_eq!(plan.followers, Some(strings(&[&["b"], &["a"]])));
    }

    #[test]
    fn bad_answers_are_refused() {
        use crate::v2::OutputError::{Garbage, Guest, Invalid};
        let enc = |p: Placement, slots| encode_output(&Ok(p), slots);
        let d = |out: &[u8]| decode_output(out, 3, &[0, 1, NONE], 1, 1);
        let ok = Placement { owners: vec![0, 2, 2], followers: Some(vec![1, 0, 1]) };
        assert!(d(&enc(ok.clone(), 1)).is_ok());
        assert!(d(&enc(Placement { followers: None, ..ok.clone() }, 1)).is_ok(), "followers are optional");
        let cases = [
            (Placement { owners: vec![0, 1], followers: None }, "owners for"),
            (Placement { owners: vec![0, 3, 0], followers: None }, "node index 3"),
            (Placement { owners: vec![1, 2, 0], followers: None }, "moved"),
            (Placement { owners: vec![0, 1, 1], followers: Some(vec![0, 0, 2]) }, "its owner"),
            (Placement { owners: vec![0, 1, 1], followers: Some(vec![1, 7, 2]) }, "not a live node"),
        ];
        for (p, why) in cases {
            match d(&enc(p.clone(), 1)) {
                Err(Invalid(m)) => assert!(m.contains(why), "{p:?}: {m}"),
                other => panic!("{p:?}: {other:?}"),
            }
        }
        // Two slots, one node given twice.
        let twice = enc(Placement { owners: vec![0, 1, 2], followers: Some(vec![1, 1, 0, 2, 0, 1]) }, 2);
        assert!(matches!(decode_output(&twice, 3, &[0, 1, 2], 2, 0), Err(Invalid(m)) if m.contains("twice")));
        assert!(matches!(d(&twice), Err(Invalid(_))), "slots differ from the input's");
        let mut short = enc(ok.clone(), 1);
        short.pop();
        assert!(matches!(d(&short), Err(Garbage(_))));
        let mut reserved = enc(ok, 1);
        reserved[12] = 1;
        assert!(matches!(d(&reserved), Err(Garbage(_))));
        assert_eq!(d(&encode_output(&Err("no".into()), 1)), Err(Guest("no".into())));
    }

    /// Follower rows shown: live ones only, never the owner, in order, then empty slots.
    #[test]
    fn followers_shown_are_live_and_not_the_owner() {
        let input = BalanceInput {
            nodes: vec![node("a", ""), node("b", ""), node("c", "")],
            partitions: vec![part(0, Some("a")), part(1, Some("b"))],
            max_moves: 0,
            now_ms: 0,
        };
        let replicas = ReplicaInput { replicas: 3, followers: strings(&[&["gone", "a", "c", "b"], &[]]) };
        let mut enc = BalanceEncoder::default();
        let buf = enc.encode("{}", &input, &replicas).to_vec();
        let view = parse_input(&buf).unwrap();
        assert_eq!(view.followers(0).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(view.followers(1).count(), 0);
        // More replicas than nodes: capped at the node count.
        let many = ReplicaInput { replicas: 9, ..replicas };
        let buf = enc.encode("{}", &input, &many).to_vec();
        assert_eq!(parse_input(&buf).unwrap().replicas(), 3);
    }

    #[test]
    fn the_native_path_runs_a_policy_end_to_end() {
        let input = BalanceInput {
            nodes: vec![node("b", ""), node("a", "")],
            partitions: (0..4).map(|i| part(i, Some("a"))).collect(),
            max_moves: 8,
            now_ms: 0,
        };
        let replicas = ReplicaInput { replicas: 2, followers: vec![] };
        let spread = |v: &BalanceView<'_>, _: &crate::NoParams| -> Result<Placement, String> {
            let owners = crate::balance::spread(v.nodes().len(), &v.owners(), v.max_moves())?;
            let followers = v.place_followers(&owners);
            Ok(Placement { owners, followers })
        };
        let plan = call_balance("{}", &input, &replicas, spread).unwrap();
        assert_eq!(plan.decision.owners, ["a", "a", "b", "b"]);
        assert_eq!(plan.followers, Some(strings(&[&["b"], &["b"], &["a"], &["a"]])));
        let wrong = |_: &BalanceView<'_>, _: &crate::NoParams| Placement { owners: vec![0], followers: None };
        assert!(call_balance("{}", &input, &replicas, wrong).unwrap_err().contains("1 owners for 4"));
    }

    fn arb_round() -> impl Strategy<Value = (BalanceInput, ReplicaInput)> {
        (1usize..8, 0usize..60, 1u32..4, proptest::collection::vec((0usize..10, 0usize..10, 0u32..3), 60), 0u32..10)
            .prop_map(|(n, p, r, seed, max_moves)| {
                let ids: Vec<String> = (0..n).map(|i| format!("n{}", (i * 7) % 11)).collect();
                let name = |k: usize| if k < n { ids[k].clone() } else { format!("gone{k}") };
                let input = BalanceInput {
                    nodes: ids
                        .iter()
                        .map(|id| NodeInfo { id: id.clone(), msg_rate: 1.5, ..Default::default() })
                        .collect(),
                    partitions: (0..p)
                        .map(|i| PartitionInfo {
                            id: i as u32,
                            owner: (seed[i].0 != 9).then(|| name(seed[i].0)),
                            connections: seed[i].2 as u64,
                            ..Default::default()
                        })
                        .collect(),
                    max_moves,
                    now_ms: 7,
                };
                let followers = (0..p).map(|i| vec![name(seed[i].1), name((seed[i].1 + 1) % 10)]).collect();
                (input, ReplicaInput { replicas: r, followers })
            })
    }

    proptest! {
        /// The cached encoder writes exactly what a fresh one writes, whatever changed
        /// between rounds.
        #[test]
        fn incremental_encoding_equals_a_fresh_one(a in arb_round(), b in arb_round(), flip in 0usize..60) {
            let mut warm = BalanceEncoder::default();
            warm.encode("{}", &a.0, &a.1);
            // A round like `a` with one partition's owner and load changed, then `b`.
            let mut a2 = a.clone();
            if let Some(p) = a2.0.partitions.get_mut(flip % a.0.partitions.len().max(1)) {
                p.owner = a.0.nodes.first().map(|n| n.id.clone());
                p.msg_rate += 1.0;
            }
            for round in [&a2, &b] {
                let fresh = BalanceEncoder::default().encode("{}", &round.0, &round.1).to_vec();
                prop_assert_eq!(warm.encode("{}", &round.0, &round.1), &fresh[..]);
            }
            let unchanged = warm.encode("{}", &b.0, &b.1).to_vec();
            prop_assert_eq!(warm.rewritten(), 0);
            prop_assert_eq!(unchanged, BalanceEncoder::default().encode("{}", &b.0, &b.1).to_vec());
        }

        /// Any bytes as input or output give an error or a value, never a panic.
        #[test]
        fn any_bytes_are_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..300), n in 0usize..5) {
            let _ = decode_output(&bytes, n, &[0, NONE], 1, 3);
            let _ = parse_input(&bytes);
            let _ = handle(&bytes, |v: &BalanceView<'_>, _: &crate::NoParams| Placement { owners: v.owners(), followers: None });
        }

        /// The same spread over ids and over indices: v1 and v2 decide alike.
        #[test]
        fn even_spread_by_ids_equals_by_indices(round in arb_round()) {
            let (input, replicas) = round;
            let v1 = crate::balance::even_spread(&input, input.max_moves);
            let v2 = call_balance("{}", &input, &replicas, |v: &BalanceView<'_>, _: &crate::NoParams| {
                crate::balance::spread(v.nodes().len(), &v.owners(), v.max_moves()).map(|owners| Placement { owners, followers: None })
            });
            match (v1, v2) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b.decision),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
            }
        }
    }
}
