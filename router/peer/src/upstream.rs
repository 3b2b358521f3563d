//! Upstream subscriptions: a gateway's one subscription per remote channel, shared by all
//! of its local subscribers.
//!
//! It owns, per channel owned by another node, the registration at the owner (pushes
//! arrive on the peer link tagged with the upstream's id), the last offset fanned out, and
//! the local fan-out: the owner's serialized push frame is turned into shared bytes once
//! and queued, by reference, to every local subscriber's outbox (presence news too, in each
//! subscriber's dialect, outside the offset order). When the link drops or the
//! owner ends the subscription (its partition moved), one task per upstream resubscribes
//! at whatever node the map names and catches up from the last offset it delivered, so
//! local subscribers see no gap and no duplicate. A retry waits out a backoff, except that
//! a new map naming another owner wakes it at once. When the map moves the channel onto
//! this very node, the local subscribers are handed over to the owner here (a
//! [`Kind::Moved`] to each session, which recovers there from the last offset it wrote)
//! instead of being told to subscribe again. If the channel restarted under a new
//! epoch (the owner died without handing over), or its history was trimmed past the gap,
//! the local subscriptions end with `unsubscribed` and the clients recover. It must never
//! block a session or the link reader: pushes only take the upstream's own short lock and
//! use the outboxes' non-blocking push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use switchyard_proto::Text;
use tokio::sync::{watch, Notify};

use crate::link::{Link, PushTarget};
use crate::node::{Node, Route};
use crate::wire::{Answer, ChannelInfo, Op, WireError};
use switchyard_core::outbox::{flush_lent, Delivery, Frames, Kind, Outbox};
use switchyard_core::owner::{grant_from, Grant, Start};
use switchyard_core::HistoryQuery;
use switchyard_proto::protocol::{self, close, ErrorCode, OpError};
use switchyard_proto::refusal::Refusal;

/// How long a local subscribe waits for its upstream to be live.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Deadline of one request to the owner.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pushes held while an upstream catches up; beyond that it starts over.
const HOLD_MAX: usize = 65_536;
/// Messages per history page while an upstream catches up.
const CATCH_UP_PAGE: u32 = 1000;

/// Every upstream subscription of a node, by channel.
pub(crate) struct Upstreams {
    /// Itself, for the maintaining tasks (which close their upstream here).
    me: Weak<Upstreams>,
    node: Weak<Node>,
    map: Mutex<HashMap<Arc<str>, Arc<Upstream>>>,
}

/// One channel's upstream subscription.
pub(crate) struct Upstream {
    channel: Arc<str>,
    inner: Mutex<Inner>,
    /// Wakes the maintaining task: trouble, or nobody is interested any more.
    wake: Notify,
    /// Bumped on every change of `live` or `closed`, for local subscribes waiting.
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    /// Local subscribers: the session's subscription id and its outbox.
    locals: Vec<(u64, Arc<Outbox>)>,
    /// Local subscribes still being granted.
    joining: usize,
    /// Ids of local subscriptions still being granted, and those of them that were
    /// unsubscribed meanwhile (their grant must not add them).
    joining_subs: Vec<u64>,
    cancelled: Vec<u64>,
    /// Registered at the owner and caught up: pushes are fanned out as they arrive.
    live: bool,
    /// The channel epoch this upstream follows (set by the first registration).
    epoch: Option<Arc<str>>,
    /// The last offset fanned out (every local subscriber has everything up to it).
    last: u64,
    /// The current registration: its id and the link its pushes arrive on.
    reg: Option<(u64, Arc<Link>)>,
    /// Pushes that arrived while (re)registering, in order.
    held: Vec<(u64, Text)>,
    /// The registration is broken (ended by the owner, or a gap): resubscribe.
    trouble: bool,
    /// Nobody is interested, or it ended for good.
    closed: bool,
}

/// Why an attempt to (re)register failed.
enum Failed {
    /// Try again (after a pause).
    Retry(String),
    /// The local subscriptions must end with this reason.
    End(String),
    /// The map moved the channel onto this node: hand the local subscriptions over to the
    /// owner here.
    Local,
}

impl Inner {
    /// Nobody needs the upstream any more.
    fn idle(&self) -> bool {
        self.locals.is_empty() && self.joining == 0
    }

    /// Fans one pushed message out to every local subscriber, in offset order. Sockets lent
    /// by idle sessions take it directly and are added to `lent`, which the caller flushes
    /// ([`flush_lent`]) once the lock is released.
    fn deliver(&mut self, offset: u64, frame: &Text, lent: &mut Vec<Arc<Outbox>>) {
        if offset <= self.last {
            return;
        }
        if offset != self.last + 1 {
            // A push went missing: resubscribe and catch up from `last`.
            self.live = false;
            self.trouble = true;
            return;
        }
        // A closed outbox is a session (or long poll) that went away without unsubscribing.
        let mut frames = Frames::new(frame);
        self.locals.retain(|(sub, outbox)| {
            let Some(frame) = frames.get(outbox.dialect()) else { return true };
            outbox.fan_out(Delivery { sub: *sub, offset, frame, kind: Kind::Message }, lent)
        });
        self.last = offset;
    }
}

impl Upstreams {
    /// No upstreams yet.
    pub(crate) fn new(node: Weak<Node>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self { me: me.clone(), node, map: Mutex::new(HashMap::new()) })
    }

    /// Grants local subscription `sub` of a remote channel, registering the channel's
    /// upstream first if it has none. Messages above the grant's `top` are queued to
    /// `outbox` as they arrive from the owner.
    pub(crate) async fn subscribe(
        &self,
        node: &Arc<Node>,
        channel: &str,
        sub: u64,
        outbox: Arc<Outbox>,
        start: Start,
    ) -> Result<Grant, OpError> {
        let up = self.join(channel, sub);
        let result = self.grant(node, &up, sub, outbox, start).await;
        let mut g = up.inner.lock().expect("upstream");
        g.joining -= 1;
        g.joining_subs.retain(|s| *s != sub);
        g.cancelled.retain(|s| *s != sub);
        let idle = g.idle();
        drop(g);
        if idle {
            self.close(&up);
        }
        result
    }

    /// The upstream of `channel` with one more local subscribe joining (created, and its
    /// task started, if there is none).
    fn join(&self, channel: &str, sub: u64) -> Arc<Upstream> {
        let mut map = self.map.lock().expect("upstreams");
        if let Some(up) = map.get(channel) {
            let mut g = up.inner.lock().expect("upstream");
            if !g.closed {
                g.joining += 1;
                g.joining_subs.push(sub);
                return up.clone();
            }
        }
        let up = Arc::new(Upstream {
            channel: channel.into(),
            inner: Mutex::new(Inner { joining: 1, joining_subs: vec![sub], ..Inner::default() }),
            wake: Notify::new(),
            changes: watch::channel(0).0,
        });
        map.insert(up.channel.clone(), up.clone());
        let n = map.len();
        drop(map);
        if let Some(node) = self.node.upgrade() {
            node.metrics().peer_upstreams.set(n as i64);
        }
        tokio::spawn(maintain(self.me.clone(), self.node.clone(), up.clone()));
        up
    }

    async fn grant(
        &self,
        node: &Arc<Node>,
        up: &Arc<Upstream>,
        sub: u64,
        outbox: Arc<Outbox>,
        start: Start,
    ) -> Result<Grant, OpError> {
        let consumer = match &start {
            Start::Consumer(c) => Some(c.clone()),
            _ => None,
        };
        let info = match crate::call::call(node, Op::Info { channel: up.channel.to_string(), consumer }).await? {
            Answer::Info(info) => info,
            _ => return Err(OpError::internal("peer answered info with another answer")),
        };
        let ChannelInfo { epoch, top, first, committed } = info;
        let mut changes = up.changes.subscribe();
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            {
                let mut g = up.inner.lock().expect("upstream");
                if g.closed {
                    return Err(OpError::new(ErrorCode::Unavailable, "the channel's upstream ended; subscribe again"));
                }
                if g.cancelled.contains(&sub) {
                    return Err(OpError::bad_request("unsubscribed before the subscription was granted"));
                }
                if g.live {
                    if g.epoch.as_deref() != Some(epoch.as_str()) {
                        return Err(OpError::new(ErrorCode::Unavailable, "the channel is restarting; subscribe again"));
                    }
                    let epoch = g.epoch.clone().expect("live upstreams have an epoch");
                    let grant = grant_from(epoch, g.last, first, committed.unwrap_or(0), &start, top);
                    g.locals.push((sub, outbox));
                    return Ok(grant);
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(OpError::new(
                        ErrorCode::Unavailable,
                        format!("no subscription to the owner of {} within {READY_WAIT:?}", up.channel),
                    ))
                }
            }
        }
    }

    /// Forgets local subscription `sub`; true if it was one. The last one to leave drops
    /// the upstream.
    pub(crate) fn unsubscribe(&self, channel: &str, sub: u64) -> bool {
        let Some(up) = self.map.lock().expect("upstreams").get(channel).cloned() else { return false };
        let mut g = up.inner.lock().expect("upstream");
        let before = g.locals.len();
        g.locals.retain(|(s, _)| *s != sub);
        let mut found = g.locals.len() != before;
        if !found && g.joining_subs.contains(&sub) {
            // Still being granted: the grant sees this and does not add it.
            g.cancelled.push(sub);
            found = true;
        }
        let idle = g.idle();
        drop(g);
        if idle {
            self.close(&up);
        }
        found
    }

    /// Ends `up`: its task unregisters it at the owner and exits.
    fn close(&self, up: &Arc<Upstream>) {
        let mut map = self.map.lock().expect("upstreams");
        if map.get(&up.channel).is_some_and(|u| Arc::ptr_eq(u, up)) {
            map.remove(&up.channel);
        }
        let n = map.len();
        drop(map);
        if let Some(node) = self.node.upgrade() {
            node.metrics().peer_upstreams.set(n as i64);
        }
        up.inner.lock().expect("upstream").closed = true;
        up.changes.send_modify(|n| *n += 1);
        up.wake.notify_one();
    }
}

impl PushTarget for Upstream {
    /// A push from the owner (called by the link reader, which flushes `lent` after the
    /// frame's last push).
    fn on_push(&self, sub: u64, offset: u64, frame: String, end: bool, lent: &mut Vec<Arc<Outbox>>) {
        let mut g = self.inner.lock().expect("upstream");
        if g.reg.as_ref().map(|r| r.0) != Some(sub) || g.closed {
            return;
        }
        if end {
            g.live = false;
            g.trouble = true;
        } else if !g.live {
            g.held.push((offset, Text::from(frame)));
            if g.held.len() <= HOLD_MAX {
                return;
            }
            g.held.clear();
            g.trouble = true;
        } else {
            g.deliver(offset, &Text::from(frame), lent);
            if !g.trouble && !g.idle() {
                return;
            }
        }
        drop(g);
        self.changes.send_modify(|n| *n += 1);
        self.wake.notify_one();
    }

    /// Presence news from the owner: fanned out to the local subscribers in their dialects
    /// (each rendered once) while the upstream is live. It carries no offset, so it never
    /// moves `last` nor counts as a gap.
    fn on_event(&self, sub: u64, frame: String, lent: &mut Vec<Arc<Outbox>>) {
        let mut g = self.inner.lock().expect("upstream");
        if g.reg.as_ref().map(|r| r.0) != Some(sub) || g.closed || !g.live {
            return;
        }
        let native = Text::from(frame);
        let mut frames = Frames::presence(&native);
        g.locals.retain(|(sub, outbox)| {
            let Some(frame) = frames.get(outbox.dialect()) else { return true };
            outbox.fan_out(Delivery { sub: *sub, offset: 0, frame, kind: Kind::Event }, lent)
        });
    }
}

impl Upstream {
    /// Hands every local subscription over to the owner on this node: each session gets a
    /// [`Kind::Moved`] carrying the channel epoch it was granted under, and subscribes here
    /// recovering from the last offset it wrote (no gap, no duplicate; a changed epoch ends
    /// it the usual way). Returns how many were handed over.
    fn move_locals(&self) -> usize {
        let mut g = self.inner.lock().expect("upstream");
        let (last, Some(epoch)) = (g.last, g.epoch.clone()) else { return 0 };
        let frame = Text::from(&*epoch);
        let n = g.locals.len();
        for (sub, outbox) in g.locals.drain(..) {
            outbox.push(Delivery { sub, offset: last, frame: frame.clone(), kind: Kind::Moved });
        }
        n
    }

    /// Ends every local subscription with an `unsubscribed` push.
    fn end_locals(&self, reason: &str) {
        let push = protocol::unsubscribed_push(&self.channel, close::SHUTTING_DOWN, reason);
        let frame = push;
        let mut g = self.inner.lock().expect("upstream");
        let last = g.last;
        for (sub, outbox) in g.locals.drain(..) {
            outbox.push(Delivery { sub, offset: last, frame: frame.clone(), kind: Kind::End });
        }
    }
}

/// Keeps `up` registered at the channel's owner until nobody needs it.
async fn maintain(ups: Weak<Upstreams>, node: Weak<Node>, up: Arc<Upstream>) {
    let mut backoff = Duration::from_millis(50);
    // The owner each attempt was aimed at: a map naming another one ends the backoff.
    let (mut maps, partition) = match node.upgrade() {
        Some(n) => (n.map_changes(), n.partitions().partition(&up.channel)),
        None => return,
    };
    loop {
        if up.inner.lock().expect("upstream").closed {
            break;
        }
        // The upstreams go with the router: so does their upkeep.
        if ups.strong_count() == 0 {
            return;
        }
        let Some(n) = node.upgrade() else { return };
        let tried = maps.borrow_and_update().owner(partition).map(str::to_owned);
        // An attempt still waiting on an owner the map no longer names is given up at once
        // (a dead owner's link may hold it until the request deadline).
        let attempt = tokio::select! {
            r = register(&n, &up) => r,
            _ = owner_changes(&mut maps, partition, tried.clone()) => Err(Failed::Retry("the map named another owner".into())),
        };
        match attempt {
            Ok(mut downs) => {
                backoff = Duration::from_millis(50);
                drop(n);
                loop {
                    let idle = {
                        let g = up.inner.lock().expect("upstream");
                        if g.closed || g.trouble {
                            break;
                        }
                        g.idle()
                    };
                    if idle {
                        match ups.upgrade() {
                            Some(ups) => ups.close(&up),
                            None => return,
                        }
                        continue;
                    }
                    tokio::select! {
                        _ = up.wake.notified() => {}
                        _ = downs.changed() => {
                            up.inner.lock().expect("upstream").live = false;
                            up.changes.send_modify(|n| *n += 1);
                            break;
                        }
                    }
                }
            }
            Err(Failed::End(reason)) => {
                tracing::info!(channel = %up.channel, %reason, "upstream subscription ended");
                up.end_locals(&reason);
                if let Some(ups) = ups.upgrade() {
                    ups.close(&up);
                }
                break;
            }
            Err(Failed::Local) => {
                let moved = up.move_locals();
                tracing::info!(channel = %up.channel, moved, "channel moved here: local subscriptions handed to its owner");
                n.metrics().peer_upstream_handoffs.inc_by(moved as u64);
                if let Some(ups) = ups.upgrade() {
                    ups.close(&up);
                }
                break;
            }
            Err(Failed::Retry(why)) => {
                tracing::debug!(channel = %up.channel, %why, "upstream subscription failed; retrying");
                drop(n);
                let moved = maps.borrow_and_update().owner(partition) != tried.as_deref();
                let moved = moved
                    || tokio::select! {
                        _ = tokio::time::sleep(backoff) => false,
                        _ = up.wake.notified() => false,
                        moved = owner_changes(&mut maps, partition, tried) => moved,
                    };
                backoff = if moved { Duration::from_millis(50) } else { (backoff * 2).min(Duration::from_secs(1)) };
            }
        }
    }
    // Unregister at the owner (best effort: a lost link unregisters by itself).
    let reg = up.inner.lock().expect("upstream").reg.take();
    if let Some((sub, link)) = reg {
        link.unregister(sub);
        if let Some(n) = node.upgrade() {
            let epoch = n.map().epoch;
            if let Ok(p) = link.send(epoch, &Op::Unsubscribe { channel: up.channel.to_string(), sub }) {
                let _ = p.wait(REQUEST_TIMEOUT).await;
            }
        }
    }
}

/// Resolves (true) once an installed map names an owner of `partition` other than `tried`;
/// pending forever if the maps stop coming (the node is going away).
async fn owner_changes(
    maps: &mut watch::Receiver<Arc<switchyard_proto::partition::PartitionMap>>,
    partition: switchyard_proto::partition::PartitionId,
    tried: Option<String>,
) -> bool {
    loop {
        if maps.changed().await.is_err() {
            return std::future::pending().await;
        }
        if maps.borrow_and_update().owner(partition) != tried.as_deref() {
            return true;
        }
    }
}

/// Registers `up` at the owner the map names and catches it up to the registration point.
/// Returns the link's drop signal, subscribed before the registration was sent.
async fn register(node: &Arc<Node>, up: &Arc<Upstream>) -> Result<watch::Receiver<u64>, Failed> {
    let links = node.links().ok_or_else(|| Failed::End("peer links are off".into()))?;
    let (owner, epoch) = match node.locate(&up.channel).map_err(|e| Failed::Retry(e.message))? {
        Route::Local(_) => return Err(Failed::Local),
        Route::Remote { owner, epoch } => (owner, epoch),
    };
    let link = links.link(&owner);
    let sub = node.next_id();
    {
        let mut g = up.inner.lock().expect("upstream");
        if let Some((old, old_link)) = g.reg.take() {
            // Abandoned registration: drop it at its owner too (best effort; a dropped link
            // has dropped it already).
            old_link.unregister(old);
            let unsubscribe = Op::Unsubscribe { channel: up.channel.to_string(), sub: old };
            if let Ok(p) = old_link.send(epoch, &unsubscribe) {
                tokio::spawn(async move {
                    let _ = p.wait(REQUEST_TIMEOUT).await;
                });
            }
        }
        g.reg = Some((sub, link.clone()));
        g.live = false;
        g.trouble = false;
        g.held.clear();
    }
    link.register(sub, up.clone());
    let downs = link.downs();
    let op = Op::Subscribe { channel: up.channel.to_string(), sub };
    let pending = link.send(epoch, &op).map_err(|e| Failed::Retry(e.message))?;
    let (their_epoch, top) = match pending.wait(REQUEST_TIMEOUT).await {
        Ok(Answer::Subscribed { epoch, top }) => (epoch, top),
        Ok(_) => return Err(Failed::Retry("peer answered subscribe with another answer".into())),
        Err(WireError { refusal: Some(Refusal::Redirect { epoch: e, .. }), .. }) => {
            node.wait_for_epoch(e.max(epoch + 1)).await;
            return Err(Failed::Retry("redirected".into()));
        }
        Err(e) => return Err(Failed::Retry(e.message)),
    };
    let (known, mut last) = {
        let g = up.inner.lock().expect("upstream");
        (g.epoch.clone(), g.last)
    };
    match known {
        None => {
            let mut g = up.inner.lock().expect("upstream");
            g.epoch = Some(their_epoch.into());
            g.last = top;
        }
        Some(e) if *e != *their_epoch => {
            return Err(Failed::End(format!(
                "channel restarted under epoch {their_epoch} (its owner stopped without handing over); subscribe again to recover"
            )));
        }
        Some(_) if top < last => {
            return Err(Failed::End("channel went back to an older offset; subscribe again to recover".into()));
        }
        Some(e) => {
            // Catch up on what the local subscribers missed while the upstream was down.
            while last < top {
                let op = Op::history(&up.channel, HistoryQuery::forward(last, CATCH_UP_PAGE));
                let pending = link.send(epoch, &op).map_err(|e| Failed::Retry(e.message))?;
                let page = pending.wait(REQUEST_TIMEOUT).await.map_err(|e| Failed::Retry(e.message))?;
                let page = page.into_history(&up.channel).map_err(|e| Failed::Retry(e.message))?;
                if *page.epoch != *e {
                    return Err(Failed::End("channel restarted under a new epoch; subscribe again".into()));
                }
                let next = page.messages.first().map_or(top + 1, |m| m.offset);
                if next > last + 1 && page.first > last + 1 {
                    return Err(Failed::End("history trimmed while resubscribing; subscribe again to recover".into()));
                }
                if page.messages.is_empty() {
                    break;
                }
                let mut g = up.inner.lock().expect("upstream");
                let mut lent = Vec::new();
                for m in page.messages.iter().filter(|m| m.offset <= top) {
                    let frame = protocol::to_frame(&m.view(Some("message")));
                    // Compaction may leave holes: step over them.
                    g.last = g.last.max(m.offset - 1);
                    g.deliver(m.offset, &frame, &mut lent);
                }
                last = g.last.max(page.messages.last().map_or(last, |m| m.offset.min(top)));
                g.last = last;
                drop(g);
                flush_lent(&mut lent, node.metrics());
            }
        }
    }
    let mut g = up.inner.lock().expect("upstream");
    g.last = g.last.max(top);
    let held = std::mem::take(&mut g.held);
    g.live = true;
    let mut lent = Vec::new();
    for (offset, frame) in &held {
        g.deliver(*offset, frame, &mut lent);
    }
    drop(g);
    flush_lent(&mut lent, node.metrics());
    up.changes.send_modify(|n| *n += 1);
    Ok(downs)
}
