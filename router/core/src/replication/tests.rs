//! The ISR rules, truncation and the seq space, on [`Replication`] alone: no store, no
//! network, no clock but `Instant`s the tests pass in (one test ages a follower through
//! the state behind the lock). Test code only: nothing here may be used by the crate.

use super::log::MAX_EPOCHS;
use super::state::SILENT_PIN;
use super::*;

fn leader(r: &Replication, followers: &[&str], isr: &[&str], epoch: u64) {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
    r.set_role(0, Role::Leader { me: "a".into(), leader_epoch: epoch, followers: v(followers), isr: v(isr) });
}

/// The high watermark is the lowest position over the ISR; followers outside the ISR
/// do not hold it back; a fetch from a position releases everything below it.
#[test]
fn the_high_watermark_is_the_lowest_isr_position() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    leader(&r, &["b", "c"], &["b"], 1);
    let hw = r.hw_changes(0);
    let s0 = r.append(0, Bytes::from_static(b"x"));
    let s1 = r.append(0, Bytes::from_static(b"y"));
    assert_eq!(*hw.borrow(), s0, "nothing replicated yet");
    let got = r.fetch(0, "b", 1, Some(s0), 1 << 20).unwrap().unwrap();
    assert_eq!(got.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![s0, s1]);
    assert_eq!(*hw.borrow(), s0, "a fetch from s0 acknowledges only what is below s0");
    r.fetch(0, "b", 1, Some(s1 + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), s1 + 1, "c is not in the ISR and does not hold the watermark");
    // Fenced: a fetch under another leader epoch is refused.
    assert!(matches!(r.fetch(0, "b", 2, Some(s1 + 1), 10), Err(FetchError::NotLeader(..))));
    assert!(matches!(r.fetch(0, "z", 1, Some(0), 10), Err(FetchError::NotReplica(..))));
    // An ISR member cannot ask for a snapshot; one outside it gets the next seq.
    assert_eq!(r.fetch(0, "b", 1, None, 10), Err(FetchError::InIsr));
    assert_eq!(r.fetch(0, "c", 1, None, 10).unwrap().unwrap_err(), s1 + 1);
    // A position beyond the log is divergence: resync.
    assert!(matches!(r.fetch(0, "c", 1, Some(s1 + 5), 10), Err(FetchError::Resync(_))));
}

/// A lagging ISR follower is asked out after the lag timeout; a caught-up follower
/// outside is asked in; nothing changes the ISR the watermark counts until a map does.
#[test]
fn isr_shrinks_on_lag_and_expands_on_catch_up() {
    let r = Replication::new(1, Duration::from_millis(100), 1 << 20);
    leader(&r, &["b", "c"], &["b"], 1);
    let now = Instant::now();
    let seq = r.append(0, Bytes::from_static(b"x"));
    assert_eq!(r.isr_check(0, now), None, "within the lag timeout");
    let later = now + Duration::from_millis(500);
    let change = r.isr_check(0, later).unwrap();
    assert_eq!(change.isr, vec!["a".to_string()]);
    assert!(!change.expand);
    assert_eq!(r.isr_check(0, later), None, "asked once per map");
    let change = r.isr_check(0, later + Duration::from_secs(2)).expect("asked again when no map came");
    assert_eq!(change.isr, vec!["a".to_string()]);
    assert_eq!(*r.hw_changes(0).borrow(), seq, "the watermark waits for the map");
    // The map drops b; c fetches everything and is asked in.
    leader(&r, &["b", "c"], &[], 1);
    assert_eq!(*r.hw_changes(0).borrow(), seq + 1);
    r.fetch(0, "c", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    let change = r.isr_check(0, Instant::now()).unwrap();
    assert!(change.expand);
    assert_eq!(change.isr, vec!["a".to_string(), "c".to_string()]);
}

/// From the moment a leader asks to take a follower into the ISR, the high watermark
/// waits for that follower too: etcd may list it, and fail over to it, before this node
/// installs the map that says so. Etcd holding an ISR without it releases it again.
#[test]
fn an_asked_expansion_holds_the_watermark_before_its_map_installs() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    leader(&r, &["b", "c"], &["b"], 1);
    let hw = r.hw_changes(0);
    r.fetch(0, "c", 1, Some(0), 1 << 20).unwrap().unwrap();
    let change = r.isr_check(0, Instant::now()).unwrap();
    assert!(change.expand);
    assert_eq!(change.isr, vec!["a".to_string(), "b".to_string(), "c".to_string()]);
    let seq = r.append(0, Bytes::from_static(b"x"));
    r.fetch(0, "b", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), seq, "c may already be in etcd's ISR: not acknowledged without it");
    r.fetch(0, "c", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), seq + 1);
    // The same with the map installed in between, and then etcd dropping c again.
    leader(&r, &["b", "c"], &["b", "c"], 1);
    let seq = r.append(0, Bytes::from_static(b"y"));
    r.fetch(0, "b", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), seq);
    leader(&r, &["b", "c"], &["b"], 1);
    assert_eq!(*hw.borrow(), seq + 1, "installed without c, and c was not asked in again");
    // An expansion asked: an older ISR reported written does not release c (the
    // expansion may still be written after it); a later shrink that drops c does.
    r.fetch(0, "c", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    assert!(r.isr_check(0, Instant::now()).is_some_and(|c| c.expand));
    let seq = r.append(0, Bytes::from_static(b"z"));
    r.fetch(0, "b", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), seq);
    r.isr_written(0, 1, &["a".to_string(), "b".to_string()]);
    assert_eq!(*hw.borrow(), seq, "an older ISR reported: c may still come in");
    let shrink = r.isr_check(0, Instant::now() + Duration::from_secs(3)).expect("c lags: asked out");
    assert!(!shrink.expand && !shrink.isr.contains(&"c".to_string()));
    r.isr_written(0, 1, &shrink.isr);
    assert_eq!(*hw.borrow(), seq + 1, "etcd holds an ISR without c");
}

/// A follower that stopped fetching (a dead node) leaves the ISR even when no write
/// left it behind, and is not asked back in until it fetches again.
#[test]
fn a_follower_that_stops_fetching_is_not_in_sync() {
    let r = Replication::new(1, Duration::from_millis(100), 1 << 20);
    leader(&r, &["b"], &["b"], 1);
    let later = Instant::now() + Duration::from_millis(500);
    assert_eq!(r.isr_check(0, later).map(|c| c.isr), Some(vec!["a".to_string()]));
    leader(&r, &["b"], &[], 1);
    assert_eq!(r.isr_check(0, later + Duration::from_secs(2)), None, "caught up, but silent");
    r.fetch(0, "b", 1, Some(0), 1 << 20).unwrap().unwrap();
    assert!(r.isr_check(0, Instant::now()).is_some_and(|c| c.expand));
}

proptest::proptest! {
    /// The high watermark under any interleaving of appends and fetches: it never goes
    /// down, never passes what was appended, equals the lowest position of the ISR
    /// followers (a follower outside the ISR never holds it back), and a fetch returns
    /// consecutive batches from exactly where it asked.
    #[test]
    fn the_high_watermark_follows_the_lowest_isr_position(
        ops in proptest::collection::vec((0u8..3, 0u64..4), 1..200)
    ) {
        let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
        leader(&r, &["b", "c"], &["b"], 1);
        let hw = r.hw_changes(0);
        let (mut next, mut acked_b, mut acked_c, mut last_hw) = (0u64, 0u64, 0u64, 0u64);
        for (kind, step) in ops {
            match kind {
                0 => {
                    let seq = r.append(0, Bytes::from_static(b"x"));
                    proptest::prop_assert_eq!(seq, next);
                    next += 1;
                }
                who => {
                    let acked = if who == 1 { &mut acked_b } else { &mut acked_c };
                    let from = (*acked + step).min(next);
                    let f = if who == 1 { "b" } else { "c" };
                    let got = r.fetch(0, f, 1, Some(from), 1 << 20).unwrap().unwrap();
                    for (i, (seq, _)) in got.batches.iter().enumerate() {
                        proptest::prop_assert_eq!(*seq, from + i as u64);
                    }
                    *acked = from;
                }
            }
            let now = *hw.borrow();
            proptest::prop_assert!(now >= last_hw, "went down: {} -> {}", last_hw, now);
            proptest::prop_assert!(now <= next);
            proptest::prop_assert_eq!(now, acked_b.min(next));
            last_hw = now;
        }
    }
}

/// KIP-101/279: the leader answers where the follower's last epoch ended in its own
/// history, and the follower truncates to the lower of that and its own end of the
/// matched epoch; a follower that cannot vouch for its prefix takes a snapshot.
#[test]
fn truncation_follows_the_leader_epoch_histories() {
    let own = |leo, epochs: &[(u64, u64)]| ReplLogMeta { leo, epochs: epochs.to_vec() };
    // The leader of epoch 5 wrote 100..120; its follower had 115 when it took over
    // as the leader of epoch 6.
    let leader = [(3, 0), (5, 100), (6, 115)];
    assert_eq!(epoch_end_in(&leader, 130, 5), Some((5, 115)));
    assert_eq!(epoch_end_in(&leader, 130, 6), Some((6, 130)));
    assert_eq!(epoch_end_in(&leader, 130, 4), Some((3, 100)), "largest epoch at or below");
    assert_eq!(epoch_end_in(&leader, 130, 2), None);
    // The deposed leader returns with 120 under epoch 5: it truncates to 115.
    let deposed = own(120, &[(3, 0), (5, 100)]);
    assert_eq!(truncation_point(&deposed, epoch_end_in(&leader, 130, 5)), Some(115));
    // A follower that had only 110 keeps everything.
    let behind = own(110, &[(3, 0), (5, 100)]);
    assert_eq!(truncation_point(&behind, epoch_end_in(&leader, 130, 5)), Some(110));
    // A replica that led epoch 4, which nobody else saw, truncates to where epoch 3
    // ended in the leader's log or in its own, whichever is lower.
    let lone = own(140, &[(3, 0), (4, 90)]);
    assert_eq!(truncation_point(&lone, epoch_end_in(&leader, 130, 4)), Some(90));
    // A follower of the current epoch that restarted fetches on from its end.
    let same = own(125, &[(3, 0), (5, 100), (6, 115)]);
    assert_eq!(truncation_point(&same, epoch_end_in(&leader, 130, 6)), Some(125));
    // No common epoch, or no history at all: a snapshot.
    let snapshotted = own(200, &[(7, 150)]);
    assert_eq!(truncation_point(&snapshotted, epoch_end_in(&leader, 130, 7)), None);
    assert_eq!(truncation_point(&own(0, &[]), Some((6, 130))), None);
    // The history is bounded and never repeats its last epoch.
    let mut h = Vec::new();
    for e in 0..100 {
        h = with_epoch(h, e, e * 10);
        h = with_epoch(h, e, e * 10 + 5);
    }
    assert_eq!(h.len(), MAX_EPOCHS);
    assert_eq!(h.last(), Some(&(99, 990)));
}

/// A leader stamps each batch with the next seq and a history that includes its own
/// epoch; a promoted follower continues the seq space from what it applied and serves
/// the batches it applied last to followers a little behind it.
#[test]
fn a_promoted_follower_continues_the_log_it_applied() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    r.load(0, Some(&ReplLogMeta { leo: 40, epochs: vec![(2, 0)] }));
    r.set_role(0, Role::Follower { leader_epoch: 3 });
    assert!(r.must_reconcile(0, 3));
    assert_eq!(r.position(0, 3), None);
    assert!(r.set_position(0, 3, 40, &[]));
    let applied: Vec<(u64, Bytes)> = (40..45).map(|s| (s, Bytes::from_static(b"b"))).collect();
    assert!(r.set_position(0, 3, 45, &applied));
    leader(&r, &["b"], &["b"], 4);
    let (seq, epoch, meta) = r.stamp(0, || Some(ReplLogMeta { leo: 45, epochs: vec![(2, 0), (3, 40)] })).unwrap();
    assert_eq!((seq, epoch), (45, 4));
    assert_eq!(meta, ReplLogMeta { leo: 46, epochs: vec![(2, 0), (3, 40), (4, 45)] });
    assert_eq!(r.append(0, Bytes::from_static(b"x")), 45);
    // b, in sync but two batches behind when the leader changed, fetches from 43.
    let got = r.fetch(0, "b", 4, Some(43), 1 << 20).unwrap().unwrap();
    assert_eq!(got.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![43, 44, 45]);
    assert_eq!(r.epoch_end(0, 4, 3, || None), Ok(Some((3, 45))));
    assert!(matches!(r.epoch_end(0, 5, 3, || None), Err(FetchError::NotLeader(..))));
    // A truncation moves the log end back; the next leadership's watermark starts
    // afresh, so a stale watermark never releases the new batches.
    r.set_role(0, Role::Follower { leader_epoch: 6 });
    assert!(r.set_position(0, 6, 44, &[]));
    leader(&r, &["b"], &["b"], 7);
    assert_eq!(*r.hw_changes(0).borrow(), 44);
    assert_eq!(r.stamp(0, || None).unwrap().0, 44);
}

/// A follower that stopped fetching pins the leader's batches for a while (it may come
/// back and catch up from them), then no longer.
#[test]
fn a_silent_follower_pins_batches_only_for_a_while() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    leader(&r, &["b"], &[], 1);
    let first = r.append(0, Bytes::from_static(b"x"));
    r.append(0, Bytes::from_static(b"y"));
    let mut st = r.state(0);
    let l = st.leading.as_mut().unwrap();
    l.trim(1 << 20, Instant::now() + Duration::from_secs(10));
    assert_eq!(l.records.front().map(|r| r.0), Some(first), "kept for b");
    l.trim(1 << 20, Instant::now() + SILENT_PIN + Duration::from_secs(1));
    assert!(l.records.is_empty(), "b has been silent too long");
}

/// Seqs never repeat across leaderships, and a new leadership starts with nothing owed.
#[test]
fn a_new_leadership_continues_the_seq_space() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    leader(&r, &["b"], &["b"], 1);
    let s = r.append(0, Bytes::from_static(b"x"));
    r.set_role(0, Role::Follower { leader_epoch: 2 });
    assert!(r.is_following(0));
    assert_eq!(r.position(0, 2), None, "a new leader means a snapshot first");
    leader(&r, &["b"], &[], 3);
    let t = r.append(0, Bytes::from_static(b"y"));
    assert!(t > s);
    assert_eq!(*r.hw_changes(0).borrow(), t + 1, "no in-sync follower: acknowledged at once");
}

/// A follower that lost batches it had acknowledged (a journal repair dropped them on its
/// start) fetches from below its earlier position: it leaves the ISR before it fetches
/// them again, and the high watermark never goes back.
#[test]
fn a_follower_that_lost_acknowledged_batches_leaves_the_isr_first() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    // c, outside the ISR and behind, keeps the log from s[0].
    leader(&r, &["b", "c"], &["b"], 1);
    let hw = r.hw_changes(0);
    let s: Vec<u64> = (0..4).map(|i| r.append(0, Bytes::from(vec![i as u8]))).collect();
    r.fetch(0, "c", 1, Some(s[0]), 1 << 20).unwrap().unwrap();
    r.fetch(0, "b", 1, Some(s[3] + 1), 1 << 20).unwrap().unwrap();
    assert_eq!(*hw.borrow(), s[3] + 1);
    assert_eq!(r.fetch(0, "b", 1, Some(s[2]), 1 << 20), Err(FetchError::Regressed(s[2], s[3] + 1)));
    assert_eq!(*hw.borrow(), s[3] + 1, "the watermark never goes back");
    let change = r.isr_check(0, Instant::now()).expect("asks the follower out");
    assert_eq!(change.isr, vec!["a".to_string()]);
    // Once the map has it out of the ISR it fetches the lost batches again.
    leader(&r, &["b", "c"], &[], 1);
    let got = r.fetch(0, "b", 1, Some(s[2]), 1 << 20).unwrap().unwrap();
    assert_eq!(got.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![s[2], s[3]]);
}

/// A leader whose log is shorter than an in-sync follower's under its own leader epoch
/// lost batches (a journal repair on its start dropped them): the follower is not told to
/// resync (that would wipe the only complete copy) and the leader stops writing.
#[test]
fn a_leader_behind_an_in_sync_follower_keeps_the_follower_and_stops_writing() {
    let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
    leader(&r, &["b", "c"], &["b"], 1);
    let next = r.append(0, Bytes::from_static(b"x")) + 1;
    assert!(!r.written_elsewhere(0));
    assert_eq!(r.fetch(0, "b", 1, Some(next + 3), 1 << 20), Err(FetchError::LeaderBehind(next + 3, next)));
    assert!(r.lost_tail(0) && r.written_elsewhere(0), "the owner refuses writes");
    // A follower outside the ISR that is ahead is still divergent: resync as before.
    assert!(matches!(r.fetch(0, "c", 1, Some(next + 3), 10), Err(FetchError::Resync(_))));
    // A new map (another leader epoch, here or elsewhere) starts afresh.
    leader(&r, &["b"], &["b"], 2);
    assert!(!r.lost_tail(0));
}

/// After a journal repair (`suspect_logs`), a leader with in-sync followers writes nothing
/// until one of them fetches from within its log; with no in-sync follower its log is the
/// only copy and it writes at once.
#[test]
fn a_repaired_leader_writes_only_once_an_in_sync_follower_confirms_its_log() {
    let r = Replication::new(2, Duration::from_secs(2), 1 << 20);
    r.suspect_logs();
    leader(&r, &["b"], &["b"], 1);
    assert!(r.written_elsewhere(0), "unconfirmed: nothing is written");
    r.fetch(0, "b", 1, Some(0), 1 << 20).unwrap().unwrap();
    assert!(!r.written_elsewhere(0), "the in-sync follower is not ahead: writing again");
    // Another leadership later is not suspect any more.
    leader(&r, &["b"], &["b"], 2);
    assert!(!r.written_elsewhere(0));
    // Partition 1: no in-sync follower, nothing to wait for.
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
    r.set_role(1, Role::Leader { me: "a".into(), leader_epoch: 1, followers: v(&["b"]), isr: v(&[]) });
    assert!(!r.written_elsewhere(1));
}
