//! The `switchyard` binary: parses flags and calls the library. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

mod ctl;

use clap::{Parser, Subcommand};
use switchyard_server::config::{Config, Overrides};

/// mimalloc: per-thread free lists and size-class pages instead of glibc's arenas, which
/// took about 4% of a fan-out run's samples (`_int_malloc`, `malloc_consolidate`,
/// `unlink_chunk`). Built with `no_thp`: on transparent huge pages its arenas kept the
/// memory freed after start-up (compiling the plugins) resident, 70 MB instead of 34 MB.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "A WebAssembly-extensible message router")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a router node.
    Serve {
        /// TOML config file.
        #[arg(long, env = "SWITCHYARD_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address for HTTP and WebSocket (overrides the file).
        #[arg(long, env = "SWITCHYARD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Store directory (overrides the file).
        #[arg(long, env = "SWITCHYARD_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Plugin directory (overrides the file).
        #[arg(long, env = "SWITCHYARD_PLUGINS_DIR")]
        plugins_dir: Option<PathBuf>,
        /// etcd endpoints, comma-separated: turns on cluster mode (overrides `cluster.etcd`).
        #[arg(long, env = "SWITCHYARD_ETCD", value_delimiter = ',')]
        etcd: Option<Vec<String>>,
        /// Cluster name: keys live under /switchyard/<NAME>/ (overrides `cluster.name`).
        #[arg(long = "cluster", env = "SWITCHYARD_CLUSTER")]
        cluster_name: Option<String>,
        /// This node's id, unique in the cluster (overrides `node_id`).
        #[arg(long, env = "SWITCHYARD_NODE_ID")]
        node_id: Option<String>,
        /// URL other nodes and clients reach this node at (overrides `cluster.advertise`).
        #[arg(long, env = "SWITCHYARD_ADVERTISE")]
        advertise: Option<String>,
    },
    /// Load generator: fanout, latency, connections and cluster scenarios against
    /// Switchyard or nats-server (`--target nats`); `table` compares saved `--json` runs.
    Bench(Box<switchyard_bench::BenchArgs>),
    /// Print a token for a user, signed with the config's `auth.hs256_secret` (development).
    Token(ctl::TokenArgs),
    /// Operate a running cluster through any node's admin API (status, map, channel, drain, move).
    Ctl(Box<ctl::Args>),
    /// Policy plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
    /// Data directory tools: find and repair damaged data.
    Store {
        #[command(subcommand)]
        command: StoreCmd,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Read-only: find damaged journal batches and table blocks and say what a repair
    /// would drop. Exit status 0 when intact, 1 when damage is found, 2 when the directory
    /// cannot be read.
    Check {
        /// The node's data directory (`data_dir`).
        dir: PathBuf,
    },
    /// What start-up does to a damaged journal: keep every batch before the first damaged
    /// one, move the damaged file(s) into DIR/damaged/<time>/, cut the journal there; then
    /// check the tables. Refused while a node has the store open. Exit status 0 when the
    /// directory is intact afterwards, 1 when damaged tables remain, 2 on an error.
    Repair {
        /// The node's data directory (`data_dir`).
        dir: PathBuf,
    },
}

/// `switchyard store check|repair`: prints the report; the exit status says whether damage
/// is (still) there.
fn store_command(command: StoreCmd) -> std::process::ExitCode {
    use switchyard_store::repair;
    let result = match &command {
        StoreCmd::Check { dir } => repair::check(dir),
        // The repair mends the journal; the check after it reads the tables (which only a
        // replica, or the operator, can mend).
        StoreCmd::Repair { dir } => repair::repair(dir).and_then(|mut done| {
            let after = repair::check(dir)?;
            (done.tables_checked, done.tables) = (after.tables_checked, after.tables);
            Ok(done)
        }),
    };
    match result {
        Ok(report) => {
            print!("{report}");
            let damaged = match command {
                StoreCmd::Check { .. } => !report.is_clean(),
                StoreCmd::Repair { .. } => !report.tables.is_empty(),
            };
            std::process::ExitCode::from(u8::from(damaged))
        }
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Validate a plugin, run it on sample input and print its kinds and per-call time.
    Check {
        /// The `.wasm` file.
        file: PathBuf,
        /// Params as a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Calls per sample size (the median is reported).
        #[arg(long, default_value_t = 20)]
        calls: u32,
        /// Print one JSON object: {abi, kinds, sha256, fixed, calls: [{kind, n, wasm_ns, native_ns, decisions}]}.
        #[arg(long)]
        json: bool,
    },
    /// Compare the ABI v1 and v2 builds of one policy on the same generated inputs (n = 100,
    /// 1,000, 10,000; balance at up to 4,096 partitions of 100 nodes) and print a table.
    Bench {
        /// The ABI v1 build (`.wasm`).
        v1: PathBuf,
        /// The ABI v2 build of the same policy (`.wasm`).
        v2: PathBuf,
        /// Params as a JSON object (both builds get them).
        #[arg(long, default_value = "{}")]
        params: String,
        /// Calls per case (the median is reported).
        #[arg(long, default_value_t = 20)]
        calls: u32,
        /// Print one JSON object: {v1, v2, calls, rows: [{kind, case, v1_ns, v2_ns, v2_cold_ns, native_ns, speedup, same_decisions}]}.
        #[arg(long)]
        json: bool,
    },
    /// Create a plugin crate (ABI v2) that builds and tests out of the box.
    New {
        /// Plugin (package) name: lowercase letters, digits and '-'.
        name: String,
        /// The kind of its policy function.
        #[arg(long, value_parser = ["retention", "compaction", "balance"])]
        kind: String,
        /// Directory to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The switchyard-sdk crate directory (default: this binary's source tree's sdk/plugin).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let (config, overrides) = match Cli::parse().command {
        Cmd::Serve { config, listen, data_dir, plugins_dir, etcd, cluster_name, node_id, advertise } => (
            config,
            Overrides {
                listen,
                data_dir,
                plugins_dir,
                etcd,
                cluster: cluster_name,
                node_id,
                advertise,
                cluster_secret: std::env::var("SWITCHYARD_CLUSTER_SECRET").ok(),
            },
        ),
        Cmd::Bench(args) => return switchyard_bench::main(*args),
        Cmd::Ctl(args) => return ctl::main(*args),
        Cmd::Token(args) => return args.run(),
        Cmd::Store { command } => return store_command(command),
        Cmd::Plugin { command: PluginCmd::New { name, kind, dir, sdk } } => {
            use switchyard_plugin_host::{host::Kind, scaffold};
            let kind = match kind.as_str() {
                "retention" => Kind::Retention,
                "compaction" => Kind::Compaction,
                _ => Kind::Balance,
            };
            let Some(sdk) = sdk.or_else(scaffold::default_sdk) else {
                eprintln!(
                    "switchyard: cannot find the switchyard-sdk crate; give --sdk DIR (sdk/plugin in the repository)"
                );
                return std::process::ExitCode::from(2);
            };
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            return match scaffold::create(&scaffold::NewArgs { name: &name, kind, dir: &dir, sdk: &sdk }) {
                Ok(files) => {
                    for f in files {
                        println!("created {}", f.display());
                    }
                    println!("next: cd {} && cargo test", dir.display());
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    std::process::ExitCode::from(2)
                }
            };
        }
        Cmd::Plugin { command: PluginCmd::Bench { v1, v2, params, calls, json } } => {
            let args = switchyard_plugin_host::bench::BenchArgs { v1: &v1, v2: &v2, params: &params, calls, json };
            return if switchyard_plugin_host::bench::run(args) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            };
        }
        Cmd::Plugin { command: PluginCmd::Check { file, params, calls, json } } => {
            let args = switchyard_plugin_host::check::CheckArgs { file: &file, params: &params, calls, json };
            return if switchyard_plugin_host::check::run(args) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            };
        }
    };
    let config = match Config::load(config.as_deref(), overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(switchyard_server::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
