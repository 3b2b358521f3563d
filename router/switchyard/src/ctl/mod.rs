//! `switchyard ctl`: the operator's command line for a running cluster, over any node's
//! admin API.
//!
//! It owns the flags and the dispatch of the subcommands: `status` and `map`
//! ([`view`]), `channel` ([`channel`]), `drain` and `move` ([`moves`]), `config check`
//! and `token`; each prints a plain table, or one JSON document with `--json`. Every failure
//! is one line on stderr and a non-zero exit (1; 2 for bad usage and an invalid config). It
//! must never talk to etcd or read a node's files: the admin API ([`client`]) is its only
//! way in, so it works from any machine that reaches one node.

mod channel;
mod client;
mod moves;
mod table;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Subcommand};

use client::{Client, CtlError};

/// `switchyard ctl` flags.
#[derive(ClapArgs)]
pub(crate) struct Args {
    /// Admin API URL of a node; repeat or separate with commas to try the next on failure.
    #[arg(
        long = "url",
        env = "SWITCHYARD_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    urls: Vec<String>,
    /// A file holding the admin token (`[admin] token`); or set SWITCHYARD_ADMIN_TOKEN.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// The cluster the nodes must belong to: a node of another cluster is skipped.
    #[arg(long = "cluster", env = "SWITCHYARD_CLUSTER", global = true)]
    cluster: Option<String>,
    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of each request to a node.
    #[arg(long, default_value = "5s", global = true)]
    timeout: humantime::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Nodes, leader, map epoch, partitions per node, under-replicated partitions, plugins
    /// in quarantine and each node's version.
    Status,
    /// Partition → leader, replicas and in-sync replicas.
    Map {
        /// Only partitions this node leads or holds a replica of.
        #[arg(long)]
        node: Option<String>,
        /// Only partitions whose ISR is shorter than their replica list.
        #[arg(long)]
        under_replicated: bool,
    },
    /// One channel: partition, leader, replicas, offsets, retained messages and bytes,
    /// policies, presence and durable consumers with their lag.
    Channel {
        /// The channel name.
        name: String,
    },
    /// Mark a node draining: the leader moves its partitions and replicas away (the node
    /// keeps running, leading nothing, until it is stopped).
    Drain {
        /// The node id.
        node: String,
        /// Wait until it leads nothing and holds no replica, printing progress.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "10m")]
        wait_timeout: humantime::Duration,
    },
    /// Ask the cluster leader to move a partition's leadership to a node (a loss-free
    /// replica move: the node catches up as a follower first).
    Move {
        /// The partition number.
        partition: u32,
        /// The node that should lead it.
        #[arg(long)]
        to: String,
        /// Wait until the node leads the partition.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "5m")]
        wait_timeout: humantime::Duration,
    },
    /// Config file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Print a client token for a user (as `switchyard token`), signed with the config's
    /// `auth.hs256_secret` (development).
    Token(TokenArgs),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a config file exactly as `serve` does, without starting: exit 0 when it
    /// is valid, 2 with the reason when not.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Runs `switchyard ctl`.
pub(crate) fn main(args: Args) -> ExitCode {
    match args.command {
        Command::Config { command: ConfigCmd::Check { file } } => return config_check(&file, args.json),
        Command::Token(args) => return args.run(),
        _ => {}
    }
    let token = match admin_token(args.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("switchyard ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout: Duration = args.timeout.into();
    let client = Client::new(args.urls, token, args.cluster, timeout);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let json = args.json;
    let result = runtime.block_on(async move {
        let mut client = client;
        match args.command {
            Command::Status => view::status(&mut client, json).await,
            Command::Map { node, under_replicated } => view::map(&mut client, json, node, under_replicated).await,
            Command::Channel { name } => channel::run(&mut client, json, &name).await,
            Command::Drain { node, wait, wait_timeout } => {
                moves::drain(&mut client, json, &node, wait.then(|| wait_timeout.into())).await
            }
            Command::Move { partition, to, wait, wait_timeout } => {
                moves::move_partition(&mut client, json, partition, &to, wait.then(|| wait_timeout.into())).await
            }
            Command::Config { .. } | Command::Token(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The admin token: `--token-file`, else `SWITCHYARD_ADMIN_TOKEN` (never a flag: argv is
/// world-readable).
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>, CtlError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CtlError::Usage(format!("cannot read the token file {}: {e}", path.display())))?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(std::env::var("SWITCHYARD_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()))
}

/// `config check FILE`: [`switchyard_server::config::Config::load`], the validation
/// `serve` runs, without the overrides of flags and environment.
fn config_check(file: &std::path::Path, json: bool) -> ExitCode {
    let overrides = switchyard_server::config::Overrides::default();
    match switchyard_server::config::Config::load(Some(file), overrides) {
        Ok(c) => {
            if json {
                let v = serde_json::json!({ "file": file, "valid": true, "node_id": c.node_id,
                    "cluster": c.cluster.enabled().then(|| c.cluster.name.clone()) });
                println!("{v}");
            } else {
                println!("{}: valid", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "file": file, "valid": false, "error": e.to_string() }));
            } else {
                eprintln!("switchyard ctl: {e}");
            }
            ExitCode::from(2)
        }
    }
}

/// `token` (as `switchyard token` and `switchyard ctl token`).
#[derive(clap::Args)]
pub(crate) struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// Lifetime, e.g. `1h`, `30m`, `7d`.
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// Comma-separated `channels` allow-list claim (`prefix*` entries match by prefix).
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<String>>,
    /// TOML config file holding `[auth] hs256_secret` (or `hs256_secret_file`).
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: PathBuf,
}

impl TokenArgs {
    /// Prints the token.
    pub(crate) fn run(self) -> std::process::ExitCode {
        switchyard_server::token_command(&self.config, &self.user, self.ttl.into(), self.channels)
    }
}
