use super::*;
use crate::{BalanceInput, ReplicaInput};
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
                nodes: ids.iter().map(|id| NodeInfo { id: id.clone(), msg_rate: 1.5, ..Default::default() }).collect(),
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
