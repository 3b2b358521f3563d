//! The one dispatcher of peer operations: every [`Op`] a node runs as the owner (or the
//! leader, the old owner, the seat holder) starts here.
//!
//! It owns the decision of what an operation is at the owner: a write entered in the
//! owner's mailbox at once (so writes keep the order their link carried them) and awaited
//! later, a read, a handover or replication request, a seat. It answers a request for a
//! partition this node does not own, or is still adopting, with a
//! [`Refusal::Redirect`], and turns an owner's [`Refusal::Sealed`] into a redirect to the
//! new owner. Requests from a link ([`begin`]) and operations the calling side runs here
//! ([`run_here`]: client operations only, refused as a client of this node would be if
//! the map moved the channel meanwhile) share the owner's side ([`Begun::finish`]). It must never wait on etcd, and never
//! hold a lock across an await.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_core::owner::{PublishRequest, Start};
use switchyard_core::HistoryQuery;
use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::{ErrorCode, OpError, StartFrom};
use switchyard_proto::refusal::Refusal;

use crate::node::{Node, Route};
use crate::wire::{self, Answer, Op, WireError};

/// Bytes (payload, keys, ids) one history reply carries over a link at most (fewer messages then).
const HISTORY_REPLY_BYTES: usize = 8 << 20;

/// The upstream subscriptions registered on one incoming link: the owner's id for each
/// (what its outbox deliveries carry) → the gateway's id and the channel.
pub(crate) type LinkSubs = Arc<std::sync::Mutex<HashMap<u64, (u64, String)>>>;

/// Runs `op` on this node, which owned its channel when the caller routed it.
pub(crate) async fn run_here(node: &Arc<Node>, op: Op) -> Result<Answer, OpError> {
    begin_here(node, op).await.finish(node).await.map_err(|e| e.to_op())
}

/// One incoming link's state that requests touch.
pub(crate) struct Incoming {
    pub(crate) outbox: Arc<switchyard_core::outbox::Outbox>,
    pub(crate) subs: LinkSubs,
}

/// A request accepted by the owner: its write (if any) is already in the mailbox.
pub(crate) enum Begun {
    Published(String, tokio::sync::oneshot::Receiver<Result<switchyard_proto::protocol::PublishOk, OpError>>),
    Committed(String, tokio::sync::oneshot::Receiver<Result<(), OpError>>),
    Subscribed(LinkSubs, u64, tokio::sync::oneshot::Receiver<Result<switchyard_core::owner::Grant, OpError>>),
    /// A history read; `capped` keeps a link's reply inside its frame limit.
    History {
        p: PartitionId,
        channel: String,
        q: HistoryQuery,
        capped: bool,
    },
    Info(PartitionId, String, Option<String>),
    /// A presence operation (join, leave, list, stats) at the owner here.
    Presence(PartitionId, Op),
    Pull(u32, u64, Option<(String, u64)>),
    Pulled(u32, u64),
    Replica(Op),
    Done(Result<Answer, WireError>),
}

/// Accepts `op` from `link` as its owner: a write is in the owner's mailbox when this
/// returns; [`Begun::finish`] waits for the outcome.
pub(crate) async fn begin(node: &Arc<Node>, link: &Incoming, epoch: u64, op: Op) -> Begun {
    let err = |e: OpError| Begun::Done(Err(WireError::op(&e)));
    match op {
        Op::Pull { partition, moved_at, cursor } => return Begun::Pull(partition, moved_at, cursor),
        Op::Pulled { partition, moved_at } => return Begun::Pulled(partition, moved_at),
        op @ (Op::Fetch { .. } | Op::Snapshot { .. } | Op::EpochEnd { .. }) => return Begun::Replica(op),
        Op::Unsubscribe { channel, sub } => {
            // Wherever the map now puts the channel: the owner here still holds it.
            let local = {
                let mut subs = link.subs.lock().expect("link subs");
                let local = subs.iter().find(|(_, (r, _))| *r == sub).map(|(l, _)| *l);
                local.inspect(|l| {
                    subs.remove(l);
                })
            };
            if let Some(local) = local {
                node.metrics().peer_subscriptions.dec();
                node.partitions().unsubscribe(&channel, local).await;
            }
            return Begun::Done(Ok(Answer::Done));
        }
        _ => {}
    }
    let p = match node.locate(op.channel()) {
        Err(e) => return err(e),
        Ok(Route::Remote { owner, epoch: ours }) => return redirect(owner, ours, epoch),
        // Taking the partition over: answer at once (the gateway asks again shortly)
        // rather than park the request, which would hold up the whole link.
        Ok(Route::Local(p)) if node.partitions().handovers.is_adopting(p) => {
            return redirect(node.id().to_string(), node.map().epoch, epoch);
        }
        Ok(Route::Local(p)) => p,
    };
    match op {
        Op::Subscribe { channel, sub } => {
            let local = node.next_id();
            link.subs.lock().expect("link subs").insert(local, (sub, channel.clone()));
            let start = Start::From(StartFrom::Latest);
            match node.partitions().subscribe(p, &channel, local, link.outbox.clone(), start).await {
                Ok(rx) => Begun::Subscribed(link.subs.clone(), local, rx),
                Err(e) => {
                    link.subs.lock().expect("link subs").remove(&local);
                    err(e)
                }
            }
        }
        // The rest; the operations between nodes were answered above.
        op => run_owned(node, p, op, true).await,
    }
}

/// Accepts a client operation (publish, commit, history, info, seat) for partition `p`,
/// owned here, from a link or run here.
async fn run_owned(node: &Arc<Node>, p: PartitionId, op: Op, from_link: bool) -> Begun {
    let err = |e: OpError| Begun::Done(Err(WireError::op(&e)));
    match op {
        Op::Publish { channel, data, key, idempotency_key, from } => {
            let data = match serde_json::value::RawValue::from_string(data) {
                Ok(d) => d,
                Err(e) => return err(OpError::bad_request(format!("data is not JSON: {e}"))),
            };
            let name = channel.clone();
            match node.partitions().publish(p, PublishRequest { channel, data, key, idempotency_key, from }).await {
                Ok(rx) => Begun::Published(name, rx),
                Err(e) => err(e),
            }
        }
        Op::Commit { channel, consumer, offset } => {
            match node.partitions().commit(p, &channel, consumer, offset).await {
                Ok(rx) => Begun::Committed(channel, rx),
                Err(e) => err(e),
            }
        }
        Op::History { channel, since, limit, before, reverse } => {
            Begun::History { p, channel, q: HistoryQuery { since, before, limit, reverse }, capped: from_link }
        }
        Op::Info { channel, consumer } => Begun::Info(p, channel, consumer),
        op @ (Op::Seat { .. } | Op::Unseat { .. }) => serve_seat(node, op),
        op @ (Op::Join { .. } | Op::Leave { .. } | Op::Presence { .. } | Op::PresenceStats { .. }) => {
            Begun::Presence(p, op)
        }
        // Only client operations come here (`Op::is_client`).
        op => Begun::Done(Err(WireError::op(&OpError::internal(format!("{} is not a client operation", op.name()))))),
    }
}

/// An operation the calling side runs here because the map put its channel here: the
/// client operations only, in the owner's mailbox like a link's (no adoption check: a
/// held mailbox makes them wait instead).
async fn begin_here(node: &Arc<Node>, op: Op) -> Begun {
    if !op.is_client() {
        return Begun::Done(Err(WireError::op(&OpError::internal(format!("{} is not run locally", op.name())))));
    }
    if matches!(op, Op::Seat { .. } | Op::Unseat { .. }) {
        return serve_seat(node, op);
    }
    // The map may have moved the channel since the caller routed it: `unavailable`
    // naming the owner, as for a client of this node.
    match node.local(op.channel()) {
        Err(e) => Begun::Done(Err(WireError::op(&e))),
        Ok(p) => run_owned(node, p, op, false).await,
    }
}

/// Runs a seat operation here, as the holder of its key.
fn serve_seat(node: &Node, op: Op) -> Begun {
    let (answer, held) = crate::seat_table::serve(node.seats(), &node.liveness(), op);
    node.metrics().seats_held.set(held as i64);
    Begun::Done(Ok(answer))
}

/// "Not the owner": the owner by this node's map `ours`, for a sender that routed by `theirs`.
fn redirect(owner: String, ours: u64, theirs: u64) -> Begun {
    let e = OpError::refused(
        Refusal::Redirect { owner, epoch: ours },
        format!("not the owner (map epoch {ours}, sender's {theirs})"),
    );
    Begun::Done(Err(WireError::op(&e)))
}

impl Begun {
    /// Waits for the outcome of an accepted operation.
    pub(crate) async fn finish(self, node: &Arc<Node>) -> Result<Answer, WireError> {
        let gone = || WireError::op(&OpError::new(ErrorCode::Unavailable, "owner stopped"));
        let result = match self {
            Begun::Done(r) => return r,
            Begun::Published(channel, rx) => {
                let ok = rx.await.map_err(|_| gone())?.map_err(|e| sealed(node, &channel, &e))?;
                return Ok(Answer::Published { offset: ok.offset, epoch: ok.epoch.to_string() });
            }
            Begun::Committed(channel, rx) => {
                rx.await.map_err(|_| gone())?.map_err(|e| sealed(node, &channel, &e))?;
                return Ok(Answer::Committed);
            }
            Begun::Subscribed(subs, local, rx) => {
                let granted = rx.await.unwrap_or_else(|_| Err(OpError::new(ErrorCode::Unavailable, "owner stopped")));
                match granted {
                    Ok(g) => {
                        node.metrics().peer_subscriptions.inc();
                        Ok(Answer::Subscribed { epoch: g.epoch.to_string(), top: g.top })
                    }
                    Err(e) => {
                        subs.lock().expect("link subs").remove(&local);
                        Err(e)
                    }
                }
            }
            Begun::History { p, channel, q, capped } => {
                node.partitions().history(p, &channel, q).await.map(|mut page| {
                    if !capped {
                        return Answer::history(page);
                    }
                    // Keep the reply well inside the link's frame limit; the reader pages on
                    // (either way: the page keeps its first messages).
                    let mut bytes = 0;
                    let keep = page
                        .messages
                        .iter()
                        .take_while(|m| {
                            bytes += m.encoded_len();
                            bytes <= HISTORY_REPLY_BYTES
                        })
                        .count()
                        .max(1);
                    page.messages.truncate(keep);
                    Answer::history(page)
                })
            }
            Begun::Info(p, channel, consumer) => node.partitions().info(p, &channel, consumer).await.map(|f| {
                Answer::Info(wire::ChannelInfo {
                    epoch: f.epoch.to_string(),
                    top: f.top,
                    first: f.first,
                    committed: f.committed,
                })
            }),
            Begun::Presence(p, op) => {
                let parts = node.partitions();
                let channel = op.channel().to_string();
                let answer = match op {
                    Op::Join { channel, node: origin, entry, announce } => parts
                        .join(p, &channel, origin.into(), entry.into_entry(), announce)
                        .await
                        .map(|()| Answer::Done),
                    Op::Leave { channel, node: origin, client } => {
                        parts.leave(p, &channel, origin.into(), &client).await.map(|()| Answer::Done)
                    }
                    Op::Presence { channel } => parts
                        .presence(p, &channel)
                        .await
                        .map(|list| Answer::Presence(list.iter().map(wire::WireEntry::from).collect())),
                    Op::PresenceStats { channel } => parts.presence_stats(p, &channel).await.map(Answer::PresenceStats),
                    _ => unreachable!("only presence operations come here"),
                };
                // A sealed owner sends the caller on to the new one.
                return answer.map_err(|e| sealed(node, &channel, &e));
            }
            Begun::Pull(p, moved_at, cursor) => crate::handover::serve_pull(node, p, moved_at, cursor).await,
            Begun::Pulled(p, moved_at) => crate::handover::serve_pulled(node, p, moved_at).await.map(|()| Answer::Done),
            Begun::Replica(op) => crate::replica::serve(node, op).await,
        };
        result.map_err(|e| WireError::op(&e))
    }
}

/// A write that met a sealed partition was not stored: the gateway is sent on to the
/// owner the map now names, and retries there.
fn sealed(node: &Node, channel: &str, e: &OpError) -> WireError {
    let map = node.map();
    match map.owner(node.partitions().partition(channel)) {
        Some(owner) if e.refusal == Some(Refusal::Sealed) && owner != node.id() => {
            WireError::op(&e.clone().with_refusal(Refusal::Redirect { owner: owner.to_string(), epoch: map.epoch }))
        }
        _ => WireError::op(e),
    }
}
