//! The operating-system resources a node needs to hold many connections: the client
//! listener's accept backlog and the process's open-file limit.
//!
//! It owns binding the client listener (with a backlog sized for a reconnect storm, not the
//! standard library's default) and raising the soft `RLIMIT_NOFILE` to the hard limit at
//! start-up, saying so in the log, with a warning when the limit cannot cover
//! `limits.max_connections`. It must never accept or serve a connection (`http` does).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel queues before `accept` (capped by
/// `net.core.somaxconn`): a third of a cluster's clients reconnecting at once must not be
/// refused by a full queue.
const ACCEPT_BACKLOG: u32 = 4096;

/// Descriptors a node needs beside its clients' sockets: the store's files, peer links,
/// etcd, plugins and the HTTP API.
const SPARE_FILES: u64 = 1024;

/// Binds the client listener at `addr` with [`ACCEPT_BACKLOG`].
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Raises the soft open-file limit as far as the hard limit allows, logs what it did, and
/// warns when the result cannot hold `max_connections` clients.
pub(crate) fn raise_open_files(max_connections: usize) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).ok();
    let now = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            return;
        }
    };
    match before {
        Some(before) if before < now => {
            tracing::info!(from = before, to = now, "open-file limit raised to the hard limit")
        }
        _ => tracing::info!(limit = now, "open-file limit"),
    }
    let needed = max_connections as u64 + SPARE_FILES;
    if now < needed {
        tracing::warn!(
            limit = now,
            max_connections,
            "the open-file limit cannot hold limits.max_connections clients: raise the hard limit \
             (LimitNOFILE= in a systemd unit, `ulimit -Hn` in a shell) to at least {needed}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_accepts_on_the_port_it_was_given() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        assert_eq!(accepted.unwrap().1, client.unwrap().local_addr().unwrap());
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        raise_open_files(1);
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert_eq!(soft, hard, "the soft limit stays below the hard one");
    }
}
