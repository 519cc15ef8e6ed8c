//! The admin listener off loopback: without TLS the server refuses to start and says why; with
//! `--admin-tls true` only `monitor` client certificates read `/metrics` (others get 403, no
//! certificate fails the handshake), and a monitor certificate cannot open a terminal
//! connection. Binds 0.0.0.0 but connects only via 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use citycard_protocol::Request;
use common::process::{self, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn non_loopback_admin_without_tls_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(process::BIN)
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(stderr.contains("admin_tls"), "{stderr}");
    // It stopped before doing anything: no development keys were generated.
    assert!(!dir.path().join("keys").exists());
}

/// Client config trusting the CA and presenting `identity` (cert, key), or no certificate.
fn https_client(keys: &Path, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
    let paths = identity.map(|id| {
        (keys.join(format!("terminals/{id}.pem")), keys.join(format!("terminals/{id}.key")))
    });
    let config = citycard::tls::client_config_from_files(
        &keys.join("ca.pem"),
        paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols.clear();
    Arc::new(config)
}

/// GET over TLS: Ok((status, body)), or Err when the handshake or the first read failed.
async fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, String), String> {
    let mut stream = common::connect_with(addr, config).await.map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    tokio::time::timeout(common::READ_TIMEOUT, stream.read_to_end(&mut text))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(text.clone())?;
    Ok((code, process::body(&text).to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admin_listener_serves_monitor_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let issued = Command::new(process::BIN)
        .args(["keys", "terminal", "--dir", keys.to_str().unwrap(), "--id", "prom-1"])
        .args(["--role", "monitor"])
        .output()
        .unwrap();
    assert!(issued.status.success(), "{issued:?}");

    let server = process::spawn(
        dir.path(),
        &["--admin", "0.0.0.0:0", "--admin-tls", "true", "--keys", keys.to_str().unwrap()],
    );
    let admin = server.admin;
    assert!(admin.ip().is_loopback(), "tests connect via 127.0.0.1 only");

    let (code, metrics) = https_get(admin, https_client(&keys, Some("prom-1")), "/metrics")
        .await
        .expect("monitor scrape");
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("citycard_build_info"), "{metrics}");
    let (code, _) = https_get(admin, https_client(&keys, Some("prom-1")), "/readyz").await.unwrap();
    assert_eq!(code, 200);

    // A terminal certificate from the same CA is authenticated but not authorised.
    let (code, body) = https_get(admin, https_client(&keys, Some("reader-1")), "/metrics")
        .await
        .expect("reader gets an answer");
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("citycard_"), "{body}");
    // No certificate: no answer at all.
    let none = https_get(admin, https_client(&keys, None), "/metrics").await;
    assert!(none.is_err(), "{none:?}");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(admin).unwrap();
        stream.set_read_timeout(Some(common::READ_TIMEOUT)).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
    .await
    .unwrap();
    assert!(!plain.starts_with("HTTP/1.1 200") && !plain.contains("citycard_"), "{plain:?}");

    // The monitor certificate cannot speak the terminal protocol.
    let config = citycard::tls::client_config(&keys, "prom-1").unwrap();
    let refused = match common::connect_with(server.addr, config).await {
        Err(_) => true,
        Ok(mut stream) => {
            let mut frame = bytes::BytesMut::new();
            Request::Hello { client_time_ms: 0 }
                .encode(citycard_protocol::RequestId(1), &mut frame)
                .unwrap();
            let _ = stream.write_all(&frame).await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(common::READ_TIMEOUT, stream.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    };
    assert!(refused, "monitor certificate opened a terminal connection");
    let (_, metrics) =
        https_get(admin, https_client(&keys, Some("prom-1")), "/metrics").await.unwrap();
    assert_eq!(
        sample(&metrics, "citycard_tls_handshake_failures_total{reason=\"wrong_role\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(server.stop().success());
}
