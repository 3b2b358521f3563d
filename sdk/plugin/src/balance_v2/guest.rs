//! ABI v2 balancing, guest side: what a plugin does with the bytes, on wasm32 and natively
//! alike. [`parse_input`] views the input without copying (a [`BalanceView`] reads the
//! [`Node`] and [`Partition`] records and the follower table in place when aligned),
//! [`handle`] runs the policy and checks the shape of its [`Placement`], [`encode_output`]
//! writes it. It must never panic on any input bytes (a malformed input is an error
//! answer), and it holds no pointers or exports: those are [`crate::v2::run`]'s and the
//! export macro's.

use std::borrow::Cow;

use serde::de::DeserializeOwned;

use super::{get32, get64, Node, Partition, HEADER_LEN, KIND_BALANCE, NODE_LEN, OUTPUT_HEADER_LEN, PARTITION_LEN};
use crate::balance::NONE;
use crate::guest::{parse_params, IntoGuestResult};
use crate::GuestResult;

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
