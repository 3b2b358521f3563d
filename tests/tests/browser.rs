//! The chat page in a real browser: starts a router (auth on, dev tokens on, `room` public)
//! and runs `tests/browser/chat.mjs`, which drives headless Chromium through
//! `playwright-core` as two users (see that file for the steps).
//!
//! Needs `node`, Debian's `chromium` (or `CHROMIUM=/path`) and `tests/browser/node_modules`
//! (`npm ci --prefix tests/browser`); `make test` installs all three. When one is missing the
//! test fails if `CI` or `SWITCHYARD_REQUIRE_BROWSER` is set (as under `make test`), and is
//! skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard_tests::*;

const CONFIG: &str = "[auth]\nmode = \"jwt\"\nhs256_secret = \"browser-test-secret-0123456789\"\ndev_tokens = true\n\
                      [namespaces.room]\nrule = \"public\"\n";
/// The whole browser run (Chromium start-up included) must finish within this.
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// What is missing to run the browser test, if anything.
fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    if Command::new("node").arg("--version").stdout(Stdio::null()).status().map_or(true, |s| !s.success()) {
        missing.push("node (apt-get install nodejs)".into());
    }
    let chromium = std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    if !chromium.exists() {
        missing.push(format!("{} (apt-get install chromium, or set CHROMIUM)", chromium.display()));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".into());
    }
    missing
}

#[test]
fn two_users_chat_in_headless_chromium() {
    let missing = missing();
    if !missing.is_empty() {
        let required = ["CI", "SWITCHYARD_REQUIRE_BROWSER"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0" && s != "false"));
        let what = missing.join(", ");
        assert!(!required, "the browser test cannot run, missing: {what} (run `make test`, which installs them)");
        eprintln!("SKIPPED two_users_chat_in_headless_chromium: missing {what}; `make test` installs them");
        return;
    }
    let node = Node::start(CONFIG);
    let mut child = Command::new("node")
        .arg(browser_dir().join("chat.mjs"))
        .arg(format!("http://{}", node.addr()))
        .current_dir(browser_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning node");
    // Drain both pipes while it runs, so a chatty child never blocks on a full pipe.
    // Collected with a bound, in case a killed child left a grandchild holding a pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                use std::io::Read as _;
                let _ = pipe.read_to_string(&mut text);
            }
            let _ = tx.send(text);
        });
        rx
    };
    let out_reader = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err_reader = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let deadline = std::time::Instant::now() + BROWSER_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let err = err_reader.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    println!("{out}");
    let status =
        status.unwrap_or_else(|| panic!("the browser test did not finish within {BROWSER_DEADLINE:?}:\n{out}\n{err}"));
    assert!(status.success(), "the browser test failed ({status}):\n{out}\n{err}");
    assert!(out.contains("browser: 5 passed, 0 failed"), "unexpected browser output:\n{out}\n{err}");
}
