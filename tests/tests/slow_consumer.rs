//! Slow consumers: a subscriber that stops reading is cut off with 4008 while the others
//! get every message.
//!
//! What is asserted:
//! - the fast subscriber receives every acknowledged message, contiguous from offset 1;
//! - `switchyard_slow_consumer_disconnects_total` reaches 1 (polled with a deadline);
//! - the slow client, reading its socket afterwards, got a contiguous prefix of the
//!   messages and then the 4008 signal: a `{"push":"disconnect","code":4008}` push and/or
//!   a close frame with code 4008, in either order. The only other ending accepted is the
//!   connection ending without any close frame (e.g. reset by the server after its
//!   shutdown timeout), and only because the metric already shows the disconnect; the
//!   test prints a note when that happens. A close frame with another code fails.

use serde_json::{json, Value};
use switchyard_tests::*;

const CHANNEL: &str = "feed:firehose";
const SLOW_DISCONNECTS: &str = "switchyard_slow_consumer_disconnects_total";
/// Most messages the publisher sends while waiting for the disconnect.
const MAX_MESSAGES: usize = 20_000;
/// Publishes per pipelined batch: small enough that one batch's fan-out (about 50 KB)
/// fits easily in the fast subscriber's 256 KB queue.
const BATCH: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_is_disconnected_with_4008_and_others_get_everything() -> anyhow::Result<()> {
    let node = Node::start(
        "[limits]\nmax_frame_bytes = 16384\noutbound_queue_messages = 256\noutbound_queue_bytes = 262144\n",
    );

    let mut slow = Client::connect_with_recv_buffer(&node, 4096).await?;
    slow.subscribe(CHANNEL, json!({})).await?;
    let mut fast = node.client().await;
    fast.subscribe(CHANNEL, json!({})).await?;
    let fast_reader = tokio::spawn(async move { read_until_done(&mut fast).await });

    let mut publisher = node.client().await;
    let pad = "p".repeat(2000);
    let mut published = 0;
    let started = tokio::time::Instant::now();
    // Publish until the router reports the disconnect (or enough has been sent).
    while published < MAX_MESSAGES && started.elapsed() < DEADLINE {
        let data = (published..published + BATCH).map(|i| json!({ "i": i, "pad": pad }));
        published += publisher.publish_many(CHANNEL, data).await?.0.len();
        if metrics(&node).await?.value(SLOW_DISCONNECTS, &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
    }
    let (done_offset, _) = publisher.publish(CHANNEL, json!({ "done": true })).await?;
    wait_metric_at_least(&node, SLOW_DISCONNECTS, &[], 1.0)
        .await
        .map_err(|e| e.context(format!("no slow-consumer disconnect after {published} messages of 2 KB")))?;

    let fast_got = fast_reader.await??;
    assert_contiguous(&offsets(&fast_got), 1)?;
    assert_eq!(fast_got.len() as u64, done_offset, "the fast subscriber must get every message");

    let ending = slow.read_to_end(DEADLINE).await?;
    let messages: Vec<Value> = ending.frames.iter().filter(|f| f["push"] == "message").cloned().collect();
    assert_contiguous(&offsets(&messages), 1).map_err(|e| e.context("what the slow consumer got before the cut"))?;
    assert!((messages.len() as u64) < done_offset, "the slow consumer got everything: it was not cut off");
    let disconnect_push = ending.frames.iter().find(|f| f["push"] == "disconnect");
    eprintln!(
        "published {done_offset}; slow consumer got {} messages, disconnect push {disconnect_push:?}, then {:?}",
        messages.len(),
        ending.end
    );
    if let Some(push) = disconnect_push {
        assert_eq!(push["code"], 4008, "{push}");
    }
    match (&ending.end, disconnect_push) {
        (Event::Close(Some(4008)), _) => {}
        (Event::Close(code), _) => panic!("slow consumer closed with {code:?}, expected 4008"),
        (Event::Ended(_), Some(_)) => {}
        (Event::Ended(how), None) => {
            eprintln!(
                "note: slow consumer saw no 4008 push or close frame ({how}); accepted because {SLOW_DISCONNECTS} >= 1"
            );
        }
        (other, _) => panic!("unexpected ending {other:?}"),
    }
    Ok(())
}

/// Reads message pushes until the `{"done": true}` one, which is included.
async fn read_until_done(c: &mut Client) -> anyhow::Result<Vec<Value>> {
    let mut got = Vec::new();
    loop {
        let push = c.next_push(DEADLINE).await?;
        anyhow::ensure!(push["push"] == "message", "fast subscriber got {push}");
        let done = push["data"]["done"] == true;
        got.push(push);
        if done {
            return Ok(got);
        }
    }
}
