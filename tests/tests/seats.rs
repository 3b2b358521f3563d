//! The cluster-wide per-user session cap (issue #17): `sessions.max_per_user` counts a
//! user's connections on every node. Real etcd, three real router processes with peer
//! links and JWT auth; the seat holder of a user is the owner of `seats:<user>`'s partition.

use std::time::Duration;

use anyhow::{Context, Result};
use switchyard_proto::partition::partition_of;
use switchyard_tests::auth::*;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::*;

const P: u32 = 16;

fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
    let config = format!(
        "{}secret = \"seats-secret-0123456789\"\n{}",
        node_config(etcd, cluster, id, P, ""),
        jwt_config("", &format!("[sessions]\nmax_per_user = 2\n{}", switchyard_tests::admin_section()))
    );
    Node::start(&config)
}

/// Seats held over the given nodes (each counts the seats it holds as a holder).
async fn seats_held(nodes: &[&Node]) -> Result<f64> {
    let mut sum = 0.0;
    for n in nodes {
        sum += metrics(n).await?.sum("switchyard_seats_held").unwrap_or(0.0);
    }
    Ok(sum)
}

/// Which node holds `user`'s seats in etcd's current map.
fn holder(etcd: &Etcd, cluster: &str, user: &str) -> Result<String> {
    let map = etcd.map(cluster)?.context("no map")?;
    let p = partition_of(&format!("seats:{user}"), P) as usize;
    Ok(map["owners"][p].as_str().context("an owner")?.to_string())
}

/// Two connections on two nodes fill alice's cap: a third on any node gets 4009, bob is
/// not affected, a closed connection frees its seat, and so does a killed node (after its
/// lease), with the cap still counted right when the seat holder moved.
#[tokio::test(flavor = "multi_thread")]
async fn the_cap_counts_a_users_connections_on_every_node() -> Result<()> {
    let etcd = Etcd::start().await;
    let cluster = "seats";
    let mut nodes = [start(&etcd, cluster, "n1"), start(&etcd, cluster, "n2"), start(&etcd, cluster, "n3")];
    wait_converged(&etcd, cluster, &nodes.iter().collect::<Vec<_>>(), &["n1", "n2", "n3"]).await?;
    let t = token("alice", 3600, None);

    let (on1, _) = connect_with(&nodes[0], &t).await?;
    let (mut on2, _) = connect_with(&nodes[1], &t).await?;
    for n in [2, 0] {
        let msg = expect_refused(&nodes[n], Some(&t), "limit_exceeded", 4009).await?;
        assert!(msg.contains("2 connections in the cluster"), "{msg}");
    }
    let mut bob = connect_as(&nodes[2], "bob").await?;
    bob.ping().await?;

    // A closed connection frees its seat: alice may connect on n3 now.
    drop(on1);
    let mut on3 = poll_for("alice's seat on n1 to be freed", DEADLINE, async || {
        Ok(connect_with(&nodes[2], &t).await.ok().map(|(c, _)| c))
    })
    .await?;
    on2.ping().await?;

    // Kill n2 (which holds one of alice's two connections): after its lease, its seat is
    // free, wherever alice's seat holder now is.
    let moved = holder(&etcd, cluster, "alice")? == "n2";
    nodes[1].kill9();
    let mut again = poll_for("the killed node's seat to be freed", DEADLINE, async || {
        Ok(connect_with(&nodes[0], &t).await.ok().map(|(c, _)| c))
    })
    .await?;
    // Once the seats are registered where they belong (n3's seat moves with the holder
    // when n2 held it), the cap is full again: alice holds n3's and n1's.
    let live = [&nodes[0], &nodes[2]];
    wait_until("alice's and bob's seats to be held by the survivors", DEADLINE, async || {
        Ok(seats_held(&live).await? == 3.0)
    })
    .await
    .with_context(|| format!("the holder moved: {moved}"))?;
    expect_refused(&nodes[0], Some(&t), "limit_exceeded", 4009).await?;
    on3.ping().await?;
    again.ping().await?;
    bob.ping().await?;
    Ok(())
}

/// A seat holder that does not answer (SIGSTOP) does not lock its users out: `connect`
/// applies the per-node cap after its deadline and counts that in a metric.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_seat_holder_falls_back_to_the_per_node_cap() -> Result<()> {
    let etcd = Etcd::start().await;
    let cluster = "seats-down";
    let nodes = [start(&etcd, cluster, "n1"), start(&etcd, cluster, "n2")];
    wait_converged(&etcd, cluster, &nodes.iter().collect::<Vec<_>>(), &["n1", "n2"]).await?;
    // A user whose seats n2 holds; clients connect to n1.
    let user = (0..1000)
        .map(|i| format!("user{i}"))
        .find(|u| holder(&etcd, cluster, u).is_ok_and(|h| h == "n2"))
        .context("a user held by n2")?;
    let t = token(&user, 3600, None);
    nodes[1].signal(libc::SIGSTOP);
    let result = tokio::time::timeout(Duration::from_secs(10), connect_with(&nodes[0], &t)).await;
    nodes[1].signal(libc::SIGCONT);
    let (mut c, ok) = result.context("connect answered in time")??;
    assert_eq!(ok["user"], user.as_str(), "{ok}");
    c.ping().await?;
    let fallbacks = metrics(&nodes[0]).await?.sum("switchyard_seat_fallbacks_total").unwrap_or(0.0);
    assert!(fallbacks >= 1.0, "the fallback is counted: {fallbacks}");
    Ok(())
}
