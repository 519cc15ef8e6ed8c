//! The counter console in a real headless browser: Debian's chromium driven through
//! chromedriver (WebDriver, via fantoccini) issues, tops up, blocks and replaces a card by
//! submitting the page's forms; the results are then checked on the server with
//! citycard-client as a kiosk and a counter.
//!
//! The test installs chromium and chromium-driver with apt-get when they are missing (as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use citycard_client::{Card, Client, Config};
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Atc, CardId, EntryKind, KeyVersion, MessageType, Status};
use fantoccini::{Client as Browser, ClientBuilder, Locator};

const BIN: &str = env!("CARGO_BIN_EXE_citycard");
/// Bound on installing chromium (download and unpack on a slow mirror).
const INSTALL_TIMEOUT_S: &str = "900";
/// Polls of 100 ms for chromedriver to listen and for a page to load (10 s each).
const POLLS: usize = 100;

/// Kills a child process this test started when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

fn ensure_chromium() {
    let present =
        |bin: &str| Command::new("which").arg(bin).output().is_ok_and(|o| o.status.success());
    if present("chromium") && present("chromedriver") {
        return;
    }
    let script = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver";
    let status = Command::new("timeout")
        .args([INSTALL_TIMEOUT_S, "sh", "-c", script])
        .status()
        .expect("running apt-get (the test needs root to install chromium)");
    assert!(status.success(), "installing chromium and chromium-driver failed: {status}");
}

/// Starts `citycard` with `args` in `dir` and returns it with the first stdout line's tail
/// after `prefix`.
fn spawn(dir: &Path, args: &[&str], prefix: &str) -> (Guard, String) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("no output").unwrap();
    let rest = line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line}"));
    (Guard(child), rest.trim_end_matches('/').to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_browser(profile: &Path) -> (Guard, Browser) {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let driver = Guard(driver);
    for _ in 0..POLLS {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,900",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("WebDriver session with chromium");
    (driver, browser)
}

/// Fills the form `form` (`(field name, value)` pairs; `select` fields by value), submits it
/// with its button and waits for the answer page; returns the answer's status attribute.
async fn submit(browser: &Browser, console: &str, form: &str, fields: &[(&str, &str)]) -> String {
    browser.goto(console).await.unwrap();
    for (name, value) in fields {
        let css = format!("#form-{form} [name={name}]");
        let element = browser.find(Locator::Css(&css)).await.unwrap();
        if element.tag_name().await.unwrap() == "select" {
            element.select_by_value(value).await.unwrap();
        } else {
            element.clear().await.unwrap();
            element.send_keys(value).await.unwrap();
        }
    }
    browser
        .find(Locator::Css(&format!("#form-{form} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let expected = format!("{console}/op/{form}");
    for _ in 0..POLLS {
        if browser.current_url().await.unwrap().as_str() == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = browser.find(Locator::Css("#answer")).await.expect("an answer on the page");
    answer.attr("data-status").await.unwrap().unwrap_or_default()
}

async fn text(browser: &Browser, css: &str) -> String {
    browser.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_issue_top_up_block_and_replace_through_the_page() {
    ensure_chromium();
    let dir = tempfile::tempdir().unwrap();
    let (_server, server) = spawn(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--shards", "2"],
        "citycard listening on ",
    );
    let (_console, console) = spawn(
        dir.path(),
        &[
            "counter",
            "--server",
            &server,
            "--keys",
            "keys",
            "--cert",
            "counter-1",
            "--dev-card-keys",
            "keys/issuer.key",
            "--listen",
            "127.0.0.1:0",
        ],
        "counter console on ",
    );
    let (_driver, browser) = start_browser(&dir.path().join("chromium-profile")).await;

    assert_eq!(submit(&browser, &console, "issue", &[("deposit", "15")]).await, "Approved");
    let card: u64 = text(&browser, "#new-card").await.parse().expect("full new card number");
    assert_eq!(text(&browser, "#balance").await, "15.00");

    let number = card.to_string();
    let status =
        submit(&browser, &console, "topup", &[("card", &number), ("amount", "5.50")]).await;
    assert_eq!(status, "Approved");
    assert_eq!(text(&browser, "#balance").await, "20.50");
    // Elsewhere than a new card the number is masked.
    assert_eq!(text(&browser, "#card").await, CardId(card).masked());

    let status =
        submit(&browser, &console, "block", &[("card", &number), ("reason", "stolen")]).await;
    assert_eq!(status, "Approved");
    assert_eq!(text(&browser, "#card-state").await, "Blocked");
    // A second block is declined, in words.
    let status =
        submit(&browser, &console, "block", &[("card", &number), ("reason", "stolen")]).await;
    assert_eq!(status, "InvalidState");
    assert!(text(&browser, "#answer h2").await.contains("does not apply to the card"));

    assert_eq!(submit(&browser, &console, "replace", &[("card", &number)]).await, "Approved");
    let replacement: u64 = text(&browser, "#new-card").await.parse().unwrap();
    assert_ne!(replacement, card);
    assert_eq!(text(&browser, "#balance").await, "20.50");
    let png = browser.screenshot().await.unwrap();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("counter-console.png");
    std::fs::write(&shot, png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    browser.close().await.unwrap();

    // On the server, seen by other terminals: the old card is gone, the new one has the money.
    let keys = dir.path().join("keys");
    let issuer = std::fs::read_to_string(keys.join("issuer.key")).unwrap();
    let hex = issuer.lines().find_map(|l| l.strip_prefix("1 ")).expect("key version 1");
    let mut master = [0u8; 32];
    for (i, byte) in master.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let card_of = |id: u64| {
        let id = CardId(id);
        Card::new(id, CardKey::derive(&master, KeyVersion(1), id), Atc(0))
    };
    let kiosk = Client::new(Config::from_keys_dir(&server, &keys, "kiosk-1").unwrap()).unwrap();
    let old = card_of(card);
    let auth = old.read_auth(MessageType::Balance, kiosk.terminal_id());
    let balance = kiosk.balance(&auth, Some(old.key())).await.unwrap();
    assert_eq!(balance.status, Status::CardClosed);
    let new = card_of(replacement);
    let auth = new.read_auth(MessageType::Balance, kiosk.terminal_id());
    let balance = kiosk.balance(&auth, Some(new.key())).await.unwrap();
    assert_eq!((balance.status, balance.balance.0), (Status::Approved, 2_050));
    let auth = old.read_auth(MessageType::History, kiosk.terminal_id());
    let page = kiosk.history(&auth, 0, 16, Some(old.key())).await.unwrap();
    // Newest first; the declined second block is journaled too (6.2), with its status.
    let entries: Vec<(EntryKind, Status)> =
        page.entries.iter().map(|e| (e.kind, e.status)).collect();
    assert_eq!(
        entries,
        [
            (EntryKind::ReplacedOut, Status::Approved),
            (EntryKind::Block, Status::InvalidState),
            (EntryKind::Block, Status::Approved),
            (EntryKind::TopUp, Status::Approved),
            (EntryKind::Issue, Status::Approved),
        ]
    );
}
