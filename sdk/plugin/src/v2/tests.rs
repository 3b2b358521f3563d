use super::*;
use crate::fx::FxHashMap;
use crate::CompactionDecision;
use proptest::prelude::*;

fn meta(offset: u64, ts: u64, key: Option<&str>, tombstone: bool) -> MessageMeta {
    MessageMeta { offset, ts, size: 100 + offset as u32, key: key.map(String::from), tombstone }
}

#[test]
fn input_roundtrips_through_the_layout() {
    let stats = ChannelStats { first_offset: 3, last_offset: 9, count: 7, bytes: 700 };
    let a = [meta(3, 10, None, false), meta(4, 20, Some("k"), true)];
    let b = [meta(7, 30, Some("é"), false)];
    let channels = [
        ChannelIn { name: "chat:a", stats: &stats, messages: &a },
        ChannelIn { name: "chat:b", stats: &stats, messages: &b },
    ];
    let params = r#"{"count":2}"#;
    let len = input_len(params, &channels);
    assert_eq!(len, 32 + 2 * 48 + 3 * 32 + params.len() + 12);
    let mut buf = vec![0u8; len];
    encode_input(&mut buf, KIND_COMPACTION, 42, params, &channels, |k| k.len() as u64 + 1);
    let input = parse_input(&buf).unwrap();
    assert_eq!((input.kind, input.params, input.channels.len()), (KIND_COMPACTION, params, 2));
    let (ca, cb) = (&input.channels[0], &input.channels[1]);
    assert_eq!((ca.name(), ca.stats(), ca.now_ms()), ("chat:a", &stats, 42));
    assert_eq!(
        ca.messages(),
        &[
            Message { offset: 3, ts: 10, key_hash: 0, size: 103, flags: 0 },
            Message { offset: 4, ts: 20, key_hash: 2, size: 104, flags: FLAG_KEYED | FLAG_TOMBSTONE },
        ]
    );
    assert_eq!((cb.name(), cb.messages()[0].key_hash, cb.base), ("chat:b", 3, 2));
    // Pinned bytes of the header and the first message record.
    assert_eq!(&buf[0..8], &[2, 0, 0, 0, 2, 0, 0, 0]);
    assert_eq!(&buf[8..16], &42u64.to_le_bytes());
    assert_eq!(&buf[24..32], &[2, 0, 0, 0, 3, 0, 0, 0]);
    assert_eq!(&buf[128..136], &3u64.to_le_bytes());
}

/// The README's byte-for-byte example.
#[test]
fn the_readme_example_is_exact() {
    let stats = ChannelStats { first_offset: 3, last_offset: 4, count: 2, bytes: 240 };
    let msgs = [
        MessageMeta { offset: 3, ts: 10, size: 120, key: None, tombstone: false },
        MessageMeta { offset: 4, ts: 20, size: 120, key: Some("k".into()), tombstone: true },
    ];
    let channels = [ChannelIn { name: "c", stats: &stats, messages: &msgs }];
    let mut buf = vec![0u8; input_len("{}", &channels)];
    assert_eq!(buf.len(), 147);
    encode_input(&mut buf, KIND_RETENTION, 99, "{}", &channels, |_| u64::from_le_bytes([0xaa; 8]));
    let mut expected = Vec::new();
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    let le64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
    le32(&mut expected, 2);
    le32(&mut expected, 1);
    le64(&mut expected, 99);
    for x in [144, 2, 1, 2] {
        le32(&mut expected, x);
    }
    for x in [3, 4, 2, 240] {
        le64(&mut expected, x);
    }
    for x in [0, 2, 146, 1] {
        le32(&mut expected, x);
    }
    for (offset, ts, hash, flags) in [(3u64, 10u64, 0u64, 0u32), (4, 20, u64::from_le_bytes([0xaa; 8]), 3)] {
        le64(&mut expected, offset);
        le64(&mut expected, ts);
        le64(&mut expected, hash);
        le32(&mut expected, 120);
        le32(&mut expected, flags);
    }
    expected.extend_from_slice(b"{}c");
    assert_eq!(buf, expected);
    let answer = encode_output(&Ok(vec![Answer::Retention(RetentionDecision::DropBelow(4))]));
    assert_eq!(answer, [0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn outputs_roundtrip_and_bad_ones_are_refused() {
    let mut bm = Bitmap::new(10);
    bm.set(0);
    bm.set(9);
    let answers =
        vec![Answer::Compaction(Removals::Bitmap(bm.clone())), Answer::Compaction(Removals::Offsets(vec![3, 5]))];
    let out = encode_output(&Ok(answers.clone()));
    assert_eq!(decode_output(&out, KIND_COMPACTION, &[10, 4]), Ok(answers));
    // A bitmap of the wrong length.
    assert!(matches!(decode_output(&out, KIND_COMPACTION, &[11, 4]), Err(OutputError::Invalid(_))));
    // Unsorted offsets.
    let out2 = encode_output(&Ok(vec![Answer::Compaction(Removals::Offsets(vec![5, 3]))]));
    assert!(matches!(decode_output(&out2, KIND_COMPACTION, &[4]), Err(OutputError::Invalid(_))));
    // Wrong number of answers.
    assert!(matches!(decode_output(&out, KIND_COMPACTION, &[10]), Err(OutputError::Invalid(_))));
    // Retention.
    let r = encode_output(&Ok(vec![Answer::Retention(RetentionDecision::DropBelow(7))]));
    assert_eq!(r.len(), 24);
    assert_eq!(decode_output(&r, KIND_RETENTION, &[3]), Ok(vec![Answer::Retention(RetentionDecision::DropBelow(7))]));
    // A guest error.
    let e = encode_output(&Err("nope".into()));
    assert_eq!(e, [1, 0, 0, 0, 4, 0, 0, 0, b'n', b'o', b'p', b'e']);
    assert_eq!(decode_output(&e, KIND_RETENTION, &[1]), Err(OutputError::Guest("nope".into())));
}

proptest! {
    /// Fuzz-style: any bytes decode to answers or a typed error, never a panic; any
    /// bytes as input give an error or a view, never a panic.
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256), n in 0usize..40) {
        let _ = decode_output(&bytes, KIND_COMPACTION, &[n]);
        let _ = decode_output(&bytes, KIND_RETENTION, &[n]);
        let _ = parse_input(&bytes);
        let _ = handle_retention(&bytes, |_: &ChannelView<'_>, _: &crate::NoParams| RetentionDecision::Keep);
    }
}

fn latest_per_key(c: &ChannelView<'_>, _: &crate::NoParams) -> Removals {
    let mut seen: FxHashMap<u64, ()> = FxHashMap::default();
    let mut bm = Bitmap::new(c.messages().len());
    for (i, m) in c.messages().iter().enumerate().rev() {
        if m.keyed() && seen.insert(m.key_hash, ()).is_some() {
            bm.set(i);
        }
    }
    Removals::Bitmap(bm)
}

#[test]
fn the_native_path_runs_a_policy_end_to_end() {
    let input = CompactionInput {
        channel: "c".into(),
        window: vec![meta(1, 0, Some("a"), false), meta(2, 0, Some("b"), false), meta(3, 0, Some("a"), false)],
        now_ms: 5,
    };
    assert_eq!(call_compaction("{}", &input, latest_per_key), Ok(CompactionDecision { remove: vec![1] }));
    let view = ChannelView::from_compaction(&input);
    assert_eq!(view.key(2).as_deref(), Some("a"));
    assert_eq!(latest_per_key(&view, &crate::NoParams {}).offsets(view.messages()), vec![1]);
    let keys = |c: &ChannelView<'_>, _: &crate::NoParams| -> Result<RetentionDecision, String> {
        Err(format!("{:?} at {}", c.key(1), c.now_ms()))
    };
    let r = RetentionInput {
        channel: "c".into(),
        stats: ChannelStats::default(),
        oldest: input.window.clone(),
        now_ms: 77,
    };
    assert_eq!(call_retention("{}", &r, keys), Err("Some(\"b\") at 77".into()));
    let bad = call_retention("{", &r, |_: &ChannelView<'_>, _: &crate::NoParams| RetentionDecision::Keep);
    assert!(bad.unwrap_err().contains("invalid params"));
}

/// Natively a view has no payloads unless a test gives them; out-of-range is None.
#[test]
fn payloads_are_read_by_index_from_what_a_test_gives() {
    let input = CompactionInput {
        channel: "c".into(),
        window: vec![meta(1, 0, Some("a"), false), meta(2, 0, Some("b"), false), meta(3, 0, Some("a"), false)],
        now_ms: 5,
    };
    let view = ChannelView::from_compaction(&input);
    assert_eq!(view.payload(0), None, "no payloads given");
    let view = view.with_payloads(&[Some(r#"{"drop":true}"#), None, Some("1")]);
    assert_eq!(view.payload(0).as_deref(), Some(r#"{"drop":true}"#));
    assert_eq!(view.payload(1), None, "a message no longer stored");
    assert_eq!(view.payload(2).as_deref(), Some("1"));
    assert_eq!(view.payload(3), None, "out of range");
    let marked = |c: &ChannelView<'_>, _: &crate::NoParams| {
        let mut bm = Bitmap::new(c.messages().len());
        (0..c.messages().len()).filter(|&i| c.payload(i).is_some_and(|p| p.contains("drop"))).for_each(|i| bm.set(i));
        Removals::Bitmap(bm)
    };
    assert_eq!(marked(&view, &crate::NoParams {}).offsets(view.messages()), vec![1]);
}
