//! `switchyard plugin new NAME --kind KIND`: a plugin crate that builds and tests out of the
//! box.
//!
//! It owns the template: a `cdylib` crate with its own empty `[workspace]`, the plugin
//! profile of `plugins/README.md`, the small wasm stack of `plugins/.cargo/config.toml`,
//! and one plain ABI v2 function of the kind asked for with native unit tests (including
//! one through the whole v2 byte path). It must never overwrite an existing file.

use std::path::{Path, PathBuf};

use crate::host::Kind;

/// What to create.
pub struct NewArgs<'a> {
    /// Package name: lowercase letters, digits and `-`, starting with a letter.
    pub name: &'a str,
    /// The kind of its one policy function.
    pub kind: Kind,
    /// Directory to create (must not exist or be empty).
    pub dir: &'a Path,
    /// The `switchyard-sdk` crate directory the plugin depends on (by path).
    pub sdk: &'a Path,
}

/// The SDK directory of the source tree this binary was built from, if it is still there.
pub fn default_sdk() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/plugin");
    dir.join("Cargo.toml").is_file().then(|| dir.canonicalize().unwrap_or(dir))
}

/// Why `switchyard plugin new` wrote nothing (or stopped part way); the CLI prints it.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The package name is not lowercase letters, digits and `-`, starting with a letter.
    #[error("invalid plugin name {0:?}: use lowercase letters, digits and '-', starting with a letter")]
    InvalidName(String),
    /// No `Cargo.toml` in the SDK directory.
    #[error("no switchyard-sdk crate at {} (give --sdk DIR)", .0.display())]
    NoSdk(PathBuf),
    /// The target directory exists but cannot be listed.
    #[error("{0}")]
    UnreadableDir(std::io::Error),
    /// The target directory exists and holds something.
    #[error("{} exists and is not empty", .0.display())]
    NotEmpty(PathBuf),
    /// The SDK path cannot be written into `Cargo.toml`.
    #[error("the SDK path is not UTF-8")]
    SdkNotUtf8,
    /// Resolving the SDK path, creating a directory or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// Writes the crate; returns the files written.
pub fn create(args: &NewArgs<'_>) -> Result<Vec<PathBuf>, ScaffoldError> {
    let name = args.name;
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(ScaffoldError::InvalidName(name.to_string()));
    }
    if !args.sdk.join("Cargo.toml").is_file() {
        return Err(ScaffoldError::NoSdk(args.sdk.to_path_buf()));
    }
    if args.dir.exists() && std::fs::read_dir(args.dir).map_err(ScaffoldError::UnreadableDir)?.next().is_some() {
        return Err(ScaffoldError::NotEmpty(args.dir.to_path_buf()));
    }
    let sdk = args.sdk.canonicalize().map_err(io_at(args.sdk))?;
    let sdk = sdk.to_str().ok_or(ScaffoldError::SdkNotUtf8)?.replace('\\', "\\\\").replace('"', "\\\"");
    let files = [
        ("Cargo.toml", cargo_toml(name, args.kind, &sdk)),
        (".cargo/config.toml", CARGO_CONFIG.to_string()),
        (".gitignore", "/target\n".to_string()),
        ("README.md", readme(name, args.kind)),
        ("src/lib.rs", lib_rs(name, args.kind)),
    ];
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = args.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        std::fs::write(&path, text).map_err(io_at(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// An I/O failure at `path`.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ScaffoldError + '_ {
    move |source| ScaffoldError::Io { path: path.to_path_buf(), source }
}

const CARGO_CONFIG: &str = r#"# wasm32 builds: a 128 KiB stack instead of rustc's 1 MiB (the host's fixed cost per
# call is lower when a call touches few pages). Native builds (cargo test) are unaffected.
[target.wasm32-unknown-unknown]
rustflags = ["-C", "link-arg=-zstack-size=131072"]
"#;

fn cargo_toml(name: &str, kind: Kind, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
description = "Switchyard {kind} plugin"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
switchyard-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1

# A plugin crate builds on its own.
[workspace]
"#,
        kind = kind.as_str()
    )
}

fn readme(name: &str, kind: Kind) -> String {
    format!(
        r#"# {name}

A Switchyard {kind} plugin (ABI v2), made by `switchyard plugin new`.

```sh
cargo test                                   # the policy, natively
# wasm32 (rustup target add wasm32-unknown-unknown):
cargo build --release --target wasm32-unknown-unknown
switchyard plugin check target/wasm32-unknown-unknown/release/{lib}.wasm --params '{{}}'
cp target/wasm32-unknown-unknown/release/{lib}.wasm /path/to/plugins-dir/{name}.wasm
```

Inside the Switchyard repository, move the crate under `plugins/` and
`scripts/build-plugins.sh` builds it (also with Debian's toolchain). Bind it in the
router's config: `{kind} = {{ plugin = "{name}", params = {{ ... }} }}` (the balancer is
bound at the top level: `balancer = {{ plugin = "{name}" }}`). The ABI is described in
the SDK's `README.md`.
"#,
        kind = kind.as_str(),
        lib = name.replace('-', "_"),
    )
}

fn lib_rs(name: &str, kind: Kind) -> String {
    let body = match kind {
        Kind::Retention => RETENTION,
        Kind::Compaction => COMPACTION,
        Kind::Balance => BALANCE,
    };
    format!("//! `{name}`: a Switchyard {} plugin (ABI v2).\n{body}", kind.as_str())
}

const RETENTION: &str = r##"//!
//! Params: `{ "count": N }` (required): keep the newest N messages of a channel.

use serde::Deserialize;
use switchyard_sdk::{ChannelView, RetentionDecision};

/// Params of a binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Most messages kept (0 = unlimited).
    pub count: u64,
}

/// Drops the oldest messages beyond the newest `count` (at most those shown this round).
pub fn policy(input: &ChannelView<'_>, params: &Params) -> RetentionDecision {
    let (count, oldest) = (input.stats().count, input.messages());
    if params.count == 0 || count <= params.count {
        return RetentionDecision::Keep;
    }
    let drop = (count - params.count).min(oldest.len() as u64) as usize;
    match drop {
        0 => RetentionDecision::Keep,
        n => RetentionDecision::DropBelow(oldest[n - 1].offset + 1),
    }
}

switchyard_sdk::export_retention!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{v2, ChannelStats, MessageMeta, RetentionInput};

    fn input(n: u64) -> RetentionInput {
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats { first_offset: 1, last_offset: n, count: n, bytes: 10 * n },
            oldest: (1..=n).map(|o| MessageMeta { offset: o, ts: o, size: 10, key: None, tombstone: false }).collect(),
            now_ms: 0,
        }
    }

    #[test]
    fn keeps_the_newest_count() {
        let p = Params { count: 3 };
        assert_eq!(policy(&ChannelView::from_retention(&input(10)), &p), RetentionDecision::DropBelow(8));
        assert_eq!(policy(&ChannelView::from_retention(&input(3)), &p), RetentionDecision::Keep);
    }

    #[test]
    fn through_the_abi() {
        assert_eq!(v2::call_retention(r#"{"count":4}"#, &input(10), policy), Ok(RetentionDecision::DropBelow(7)));
        assert!(v2::call_retention("{}", &input(10), policy).unwrap_err().contains("missing field"));
    }
}
"##;

const COMPACTION: &str = r##"//!
//! Params: `{ "tombstone_delay_ms": N }` (optional, default 60000): keep the latest
//! message per key; a latest tombstone goes once `tombstone_delay_ms` old.

use serde::Deserialize;
use switchyard_sdk::fx::FxHashMap;
use switchyard_sdk::{Bitmap, ChannelView, Removals};

/// Params of a binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Age in ms after which a tombstone that is the latest for its key goes.
    pub tombstone_delay_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self { tombstone_delay_ms: 60_000 }
    }
}

/// Removes every keyed message that a newer one with the same key supersedes.
pub fn policy(input: &ChannelView<'_>, params: &Params) -> Removals {
    let window = input.messages();
    let mut seen: FxHashMap<u64, ()> = FxHashMap::with_capacity_and_hasher(window.len(), Default::default());
    let mut remove = Bitmap::new(window.len());
    for (i, m) in window.iter().enumerate().rev() {
        if !m.keyed() {
            continue;
        }
        let superseded = seen.insert(m.key_hash, ()).is_some();
        let expired = m.tombstone() && input.now_ms().saturating_sub(m.ts) >= params.tombstone_delay_ms;
        if superseded || expired {
            remove.set(i);
        }
    }
    Removals::Bitmap(remove)
}

switchyard_sdk::export_compaction!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{v2, CompactionInput, MessageMeta};

    fn input() -> CompactionInput {
        let m = |offset: u64, key: &str, tombstone: bool| MessageMeta {
            offset,
            ts: offset * 10,
            size: 1,
            key: Some(key.into()),
            tombstone,
        };
        CompactionInput { channel: "c".into(), window: vec![m(1, "a", false), m(2, "b", false), m(3, "a", true)], now_ms: 100 }
    }

    #[test]
    fn keeps_the_latest_per_key() {
        let inp = input();
        let view = ChannelView::from_compaction(&inp);
        assert_eq!(policy(&view, &Params::default()).offsets(view.messages()), vec![1]);
    }

    #[test]
    fn through_the_abi() {
        assert_eq!(v2::call_compaction("{}", &input(), policy).unwrap().remove, vec![1]);
        let now = v2::call_compaction(r#"{"tombstone_delay_ms":0}"#, &input(), policy).unwrap();
        assert_eq!(now.remove, vec![1, 3]);
    }
}
"##;

const BALANCE: &str = r##"//!
//! Params: `{ "max_moves": N }` (optional): spread partitions evenly over the live nodes,
//! moving at most `min(N, the router's max_moves)` partitions per round, and place the
//! followers as the router's built-in does.

use serde::Deserialize;
use switchyard_sdk::{BalanceView, Placement};

/// Params of a binding.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Most moves per round, on top of the router's own limit.
    pub max_moves: Option<u32>,
}

/// Every live node ends with an even share of the partitions (node indices: the nodes come
/// sorted by id).
pub fn policy(input: &BalanceView<'_>, params: &Params) -> Result<Placement, String> {
    let budget = input.max_moves().min(params.max_moves.unwrap_or(u32::MAX));
    let owners = switchyard_sdk::balance::spread(input.nodes().len(), &input.owners(), budget)?;
    // None would leave the followers to the router.
    let followers = input.place_followers(&owners);
    Ok(Placement { owners, followers })
}

switchyard_sdk::export_balance!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::balance_v2::call_balance;
    use switchyard_sdk::{BalanceInput, NodeInfo, PartitionInfo, ReplicaInput};

    fn input() -> BalanceInput {
        BalanceInput {
            nodes: ["a", "b"].iter().map(|id| NodeInfo { id: id.to_string(), weight: 1.0, ..Default::default() }).collect(),
            partitions: (0..4).map(|id| PartitionInfo { id, owner: Some("a".into()), ..Default::default() }).collect(),
            max_moves: 10,
            now_ms: 0,
        }
    }

    fn replicas(n: u32) -> ReplicaInput {
        ReplicaInput { replicas: n, followers: Vec::new() }
    }

    #[test]
    fn spreads_evenly() {
        let plan = call_balance("{}", &input(), &replicas(1), policy).unwrap();
        assert_eq!(plan.decision.owners.iter().filter(|o| *o == "b").count(), 2);
    }

    #[test]
    fn through_the_abi() {
        let plan = call_balance(r#"{"max_moves":1}"#, &input(), &replicas(2), policy).unwrap();
        assert_eq!(plan.decision.owners.iter().filter(|o| *o == "b").count(), 1);
        let followers = plan.followers.unwrap();
        assert!(followers.iter().zip(&plan.decision.owners).all(|(f, o)| f.len() == 1 && &f[0] != o));
    }
}
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_and_non_empty_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let sdk = default_sdk().expect("built from the source tree");
        let (x, p) = (dir.path().join("x"), dir.path().join("p"));
        let args = |name, d| NewArgs { name, kind: Kind::Retention, dir: d, sdk: &sdk };
        assert!(create(&args("Bad_Name", &x)).is_err());
        assert!(create(&args("9lives", &x)).is_err());
        let files = create(&args("my-policy", &p)).unwrap();
        assert_eq!(files.len(), 5);
        assert!(create(&args("my-policy", &p)).unwrap_err().to_string().contains("not empty"));
        let toml = std::fs::read_to_string(dir.path().join("p/Cargo.toml")).unwrap();
        assert!(toml.contains("name = \"my-policy\"") && toml.contains("[workspace]"), "{toml}");
    }
}
