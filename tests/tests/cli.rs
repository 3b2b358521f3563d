//! The command line: every `serve` flag can also come from a `SWITCHYARD_*` variable.
//!
//! It owns the check that the environment is read (the other suites pass flags). It
//! starts the real binary with no flags at all, only variables, on a free loopback port.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use switchyard_tests::*;

#[test]
fn serve_reads_its_settings_from_the_environment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("env-data");
    let mut child = Command::new(router_bin())
        .arg("serve")
        .env("SWITCHYARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_DATA_DIR", &data)
        .env("SWITCHYARD_PLUGINS_DIR", dir.path().join("plugins"))
        .env_remove("SWITCHYARD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(DEADLINE);
    let _ = child.kill();
    let _ = child.wait();
    let line = line?;
    assert!(line.starts_with("switchyard listening on 127.0.0.1:"), "{line}");
    assert!(data.is_dir(), "SWITCHYARD_DATA_DIR was not used: {} missing", data.display());

    // SWITCHYARD_CONFIG names the file: a bad key in it is reported and refused.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "no_such_key = 1\n")?;
    let out = Command::new(router_bin()).arg("serve").env("SWITCHYARD_CONFIG", &bad).output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_key"), "{stderr}");
    Ok(())
}
