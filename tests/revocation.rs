//! Revocation without restart: a terminal is revoked with `citycard keys revoke`, the server
//! gets SIGHUP, and its open connection is closed (after answering what it accepted), a new
//! connection is refused, and other terminals keep working. A bad CRL on a later SIGHUP keeps
//! the old one in force and is counted on `/metrics`; the server keeps running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use citycard::keys::{self, Role, TerminalId};
use citycard_protocol::{ErrorCode, Request, Response};
use common::process::{self, body, http_get, sample};
use common::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on polling `/metrics` for a reload to show.
const POLLS: usize = 600;
const POLL_PAUSE: Duration = Duration::from_millis(100);

async fn metrics(admin: std::net::SocketAddr) -> String {
    let (code, response) =
        tokio::task::spawn_blocking(move || http_get(admin, "/metrics")).await.unwrap();
    assert_eq!(code, 200, "{response}");
    body(&response).to_owned()
}

/// Polls `/metrics` (bounded) until `series` has `value`.
async fn wait_for_metric(admin: std::net::SocketAddr, series: &str, value: f64) -> String {
    for _ in 0..POLLS {
        let text = metrics(admin).await;
        if sample(&text, series) == Some(value) {
            return text;
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
    panic!("{series} never reached {value}:\n{}", metrics(admin).await);
}

/// True when a fresh connection as `terminal` is refused: the handshake fails, or (TLS 1.3:
/// the client finishes before the server judged its certificate) the first read fails or
/// sees the connection closed.
async fn refused(keys: &Path, addr: std::net::SocketAddr, terminal: &str) -> bool {
    let config = citycard::tls::client_config(keys, terminal).unwrap();
    let Ok(mut stream) = common::connect_with(addr, config).await else { return true };
    let mut frame = bytes::BytesMut::new();
    Request::Hello { client_time_ms: 0 }
        .encode(citycard_protocol::RequestId(1), &mut frame)
        .unwrap();
    if stream.write_all(&frame).await.is_err() || stream.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(common::READ_TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("server neither answered nor refused"),
    }
}

/// The kiosk's view of the card balance works: the terminal is served.
async fn works(client: &mut Client, card: &common::Card) {
    let terminal = client.terminal.clone();
    match client.call(&card.balance(&terminal)).await {
        Response::Balance(r) => assert_eq!(r.status, citycard_protocol::Status::Approved),
        other => panic!("{} not served: {other:?}", client.terminal),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_crl_to_open_and_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");
    keys::init(&keys_dir).unwrap();
    // The server runs with a CRL from the start: one decommissioned terminal.
    let old = TerminalId::new("reader-old").unwrap();
    keys::issue_terminal(&keys_dir, &old, Role::Reader).unwrap();
    let crl = keys::revoke(&keys_dir, &old).unwrap();
    let crl_arg = crl.to_str().unwrap().to_owned();
    let server = process::spawn(
        dir.path(),
        &["--admin", "127.0.0.1:0", "--keys", keys_dir.to_str().unwrap(), "--crl", &crl_arg],
    );
    assert!(refused(&keys_dir, server.addr, "reader-old").await, "revoked at start");

    let mut counter = Client::connect(&keys_dir, server.addr, "counter-1").await;
    let mut kiosk = Client::connect(&keys_dir, server.addr, "kiosk-1").await;
    let mut reader = Client::connect(&keys_dir, server.addr, "reader-1").await;
    let mut card = common::issue(&mut counter, 1, 5_000).await;
    let purchase = card.purchase(100, "reader-1");
    match reader.call(&purchase).await {
        Response::Purchase(r) => assert_eq!(r.status, citycard_protocol::Status::Approved),
        other => panic!("purchase: {other:?}"),
    }
    let before = metrics(server.admin).await;
    assert_eq!(sample(&before, "citycard_crl_revoked_certificates"), Some(1.0), "{before}");

    // The operator revokes reader-1 with the CLI and sends SIGHUP.
    let out = Command::new(process::BIN)
        .args(["keys", "revoke", "--dir", keys_dir.to_str().unwrap(), "--id", "reader-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.signal("HUP");

    // The open connection is told why and closed.
    let mut ends = Vec::new();
    for _ in 0..4 {
        match reader.recv().await {
            Some((_, response)) => ends.push(response),
            None => break,
        }
    }
    assert!(reader.recv().await.is_none(), "connection still open after {ends:?}");
    assert!(
        ends.iter().any(
            |r| matches!(r, Response::Error { code, .. } if *code == ErrorCode::NotPermitted as u16)
        ),
        "no revocation error frame: {ends:?}"
    );
    // A new connection is refused; the others keep working, old and new connections alike.
    assert!(refused(&keys_dir, server.addr, "reader-1").await, "revoked reader got in");
    works(&mut kiosk, &card).await;
    let top_up = card.top_up(500, "counter-1");
    assert!(matches!(counter.call(&top_up).await, Response::TopUp(_)));
    let mut kiosk_again = Client::connect(&keys_dir, server.addr, "kiosk-1").await;
    works(&mut kiosk_again, &card).await;

    let after = wait_for_metric(server.admin, "citycard_crl_revoked_certificates", 2.0).await;
    assert_eq!(sample(&after, "citycard_revoked_connections_closed_total"), Some(1.0), "{after}");
    assert_eq!(sample(&after, "citycard_trust_reloads_total"), Some(1.0), "{after}");
    assert!(
        sample(&after, "citycard_tls_handshake_failures_total{reason=\"revoked\"}")
            .is_some_and(|n| n >= 1.0),
        "{after}"
    );

    // A bad CRL on the next SIGHUP: refused, counted, logged; the old CRL stays in force.
    std::fs::write(&crl, b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
    server.signal("HUP");
    let failed = wait_for_metric(server.admin, "citycard_trust_reload_failures_total", 1.0).await;
    assert_eq!(sample(&failed, "citycard_crl_revoked_certificates"), Some(2.0), "{failed}");
    server.wait_for_log("CRL or TLS reload failed");
    assert!(refused(&keys_dir, server.addr, "reader-1").await, "old CRL no longer applied");
    works(&mut kiosk, &card).await;

    // A CRL signed by another CA is refused the same way (it would lock every terminal out).
    let other = tempfile::tempdir().unwrap();
    keys::init(other.path()).unwrap();
    let foreign = keys::revoke(other.path(), &TerminalId::new("kiosk-1").unwrap()).unwrap();
    std::fs::copy(&foreign, &crl).unwrap();
    server.signal("HUP");
    wait_for_metric(server.admin, "citycard_trust_reload_failures_total", 2.0).await;
    works(&mut kiosk, &card).await;
    assert!(!refused(&keys_dir, server.addr, "kiosk-1").await, "foreign CRL was applied");

    kiosk.close().await;
    kiosk_again.close().await;
    counter.close().await;
    assert!(server.stop().success());
}
