//! ABI v2 balancing, host side: what the router does with the bytes. [`BalanceEncoder`]
//! writes one round's input, keeping the last one and rewriting only the records whose
//! fields changed; [`decode_output`] reads a guest's answer and checks it against the rules
//! the router enforces (one live owner per partition, the move budget, distinct live
//! followers), and [`answer_to_plan`] turns node indices back into ids. A guest's output is
//! untrusted: decoding must never panic, whatever the bytes. It must never run a policy or
//! touch a wasm instance, and never change a byte of the layout `README.md` specifies.

use super::{get32, put, put32, put64, HEADER_LEN, KIND_BALANCE, NODE_LEN, OUTPUT_HEADER_LEN, PARTITION_LEN};
use crate::balance::NONE;
use crate::{BalanceDecision, BalanceInput, BalancePlan, ReplicaInput};

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
