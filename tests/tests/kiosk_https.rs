//! The kiosk over HTTPS for a tablet on the facility's network: a real `edge-node run`, its
//! own certificate authority, pairing through `edge-node pair` and the tablet's pairing page,
//! and headless Chromium trusting the device as a paired tablet does (its CA's public key
//! pinned with `--ignore-certificate-errors-spki-list`, what a managed browser's policy sets)
//! reaching the kiosk by a name that is not loopback, camera included. An impostor with
//! another certificate, a wrong fingerprint, a used pairing code and garbage on the port get
//! nowhere.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tests::browser::{Browser, write_y4m};
use tests::fixture::{self, HubFixture, Proc, run_ok, wait_until};
use tests::frames::{Damage, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running device serving the kiosk on a loopback port.
struct Device {
    _proc: Proc,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Device {
    fn start(dir: &Path) -> Result<Device> {
        let (proc, addr) = fixture::run_with_http(dir, &[])?;
        let d = Device {
            _proc: proc,
            dir: dir.to_owned(),
            addr,
        };
        if !wait_until(Duration::from_secs(30), || {
            d.https("GET", "/healthz", &[], None)
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        }) {
            bail!("the device did not answer over HTTPS within 30 s");
        }
        Ok(d)
    }

    /// The device's CA certificate (DER), read from its data folder.
    fn ca_der(&self) -> Result<Vec<u8>> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(self.dir.join("tls/ca.crt"))
            .context("the device's tls/ca.crt")?;
        Ok(der.to_vec())
    }

    /// A new pairing through `edge-node pair --json`.
    fn pair(&self) -> Result<Value> {
        let out = run_ok(
            "edge-node",
            &[
                "--data",
                self.dir.to_str().unwrap_or_default(),
                "pair",
                "--json",
            ],
        )?;
        Ok(serde_json::from_str(out.trim())?)
    }

    /// One request over TLS to the device, trusting only `ca` (this device's CA if `None`):
    /// the answer as text (head and body), read until the device closes.
    fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<String> {
        https_request(self.addr, &self.ca_der()?, method, path, headers, body)
    }
}

/// One HTTP/1.1 request over TLS to `addr`, verified against the one trusted root `ca`
/// (webpki: the chain, the address in the leaf, the CA's name constraints).
fn https_request(
    addr: SocketAddr,
    ca: &[u8],
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.map_or(0, <[u8]>::len)
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .context("connect timed out")??;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .context("TLS handshake timed out")??;
        tls.write_all(&request).await?;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer))
            .await
            .context("the device did not answer within 20 s")?;
        // A peer that closes without close_notify still sent its answer.
        if let Err(e) = read
            && answer.is_empty()
        {
            return Err(e.into());
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
}

fn attr(b: &Browser, css: &str, name: &str) -> Result<String> {
    let v = b.execute(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        &[json!(css), json!(name)],
    )?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

/// This machine's hostname under `.local`, which the device answers to (`kiosk::own_host_only`)
/// and its leaf certificates name: a name that is not loopback to Chromium, so the page is a
/// secure context only over HTTPS. `None` when the hostname is not one DNS label.
fn local_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim().to_ascii_lowercase();
    (!h.is_empty() && h.len() <= 63 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| format!("{h}.local"))
}

#[test]
fn a_paired_tablet_gets_the_camera_over_https_and_stores_a_visit() -> Result<()> {
    let hub = HubFixture::new()?;
    let dir = hub.enroll_device("entrance")?;
    let dev = Device::start(&dir)?;

    // The CA is made on first use, owner-only, and a client trusting only it (webpki: chain,
    // address, name constraints) reaches the kiosk page.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["tls", "tls/ca.key", "tls/ca.crt"] {
            let mode = std::fs::metadata(dir.join(f))?.permissions().mode() & 0o077;
            assert_eq!(mode, 0, "{f} is readable by others");
        }
    }
    let page = dev.https("GET", "/", &[], None)?;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");

    // `edge-node pair`: the one-time URL and the pins, agreeing with the CA on disk.
    let offer = dev.pair()?;
    let ca_hex = hex_of_sha256(&dev.ca_der()?)?;
    let url = offer["url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{}/pair/", dev.addr.port())),
        "{offer}"
    );
    assert!(url.ends_with(&format!("#sha256={ca_hex}")), "{offer}");
    assert_eq!(
        offer["ca_sha256"]
            .as_str()
            .unwrap_or_default()
            .replace(':', "")
            .to_lowercase(),
        ca_hex
    );
    let spki = offer["spki_sha256"].as_str().unwrap_or_default().to_owned();
    assert_eq!(spki.len(), 44, "{offer}");

    // The paired tablet: Chromium pinning the CA's public key, reaching the device by a name.
    let tmp = tempfile::tempdir()?;
    let video = tmp.path().join("camera.y4m");
    let host = local_name().unwrap_or_else(|| "127.0.0.1".into());
    let rules = format!("--host-resolver-rules=MAP {host} 127.0.0.1");
    let browser = Browser::start(&[
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        &format!("--use-file-for-fake-video-capture={}", video.display()),
        "--autoplay-policy=no-user-gesture-required",
        &format!("--ignore-certificate-errors-spki-list={spki}"),
        &rules,
    ])?;
    if host != "127.0.0.1" {
        // The problem HTTPS solves: over plain HTTP the page is no secure context, no camera.
        browser.goto(&format!("http://{host}:{}/", dev.addr.port()))?;
        let plain = browser.execute(
            "return [window.isSecureContext, !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)];",
            &[],
        )?;
        assert_eq!(plain, json!([false, false]), "plain HTTP by name");
    }
    let token = fixture::random_token();
    let payload = fixture::issuer().issue(fixture::now(), 15, token);
    write_y4m(&video, &vec![frame(&payload, Damage::Clean, 7)?; 10], 10)?;
    let kiosk = format!("https://{host}:{}/", dev.addr.port());
    browser.goto(&kiosk)?;
    let secure = browser.execute(
        "return [location.protocol, window.isSecureContext, !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)];",
        &[],
    )?;
    assert_eq!(
        secure,
        json!(["https:", true, true]),
        "the kiosk over HTTPS"
    );
    browser
        .wait_for(
            "the page to accept the code",
            Duration::from_secs(20),
            |b| Ok((attr(b, "body", "data-verdict")? == "accepted").then_some(())),
        )
        .or_else(|e| {
            browser
                .screenshot("kiosk-https-accept-failed")
                .map(|_| ())
                .and(Err(e))
        })?;
    browser.screenshot("kiosk-https-accepted")?;
    drop(browser);
    drop(dev);
    let records = fixture::stored_records(&dir, &hub.data)?;
    assert_eq!(
        fixture::qr_tokens(&records),
        vec![token],
        "one visit stored"
    );
    Ok(())
}

fn hex_of_sha256(bytes: &[u8]) -> Result<String> {
    let provider = rustls::crypto::ring::default_provider();
    let hash = provider
        .cipher_suites
        .iter()
        .find_map(|s| match s {
            rustls::SupportedCipherSuite::Tls13(t)
                if t.common.hash_provider.algorithm()
                    == rustls::crypto::hash::HashAlgorithm::SHA256 =>
            {
                Some(t.common.hash_provider)
            }
            _ => None,
        })
        .context("no SHA-256")?;
    Ok(hex::encode(hash.hash(bytes).as_ref()))
}

#[test]
fn an_impostor_certificate_and_a_wrong_fingerprint_are_not_accepted() -> Result<()> {
    let hub = HubFixture::new()?;
    let a = Device::start(&hub.enroll_device("entrance")?)?;
    let b = Device::start(&hub.enroll_device("impostor")?)?;
    let a_offer = a.pair()?;
    let b_offer = b.pair()?;
    assert_ne!(
        a_offer["ca_sha256"], b_offer["ca_sha256"],
        "two devices, two CAs"
    );

    // A client that trusts A's CA refuses B's certificate.
    let refused = https_request(b.addr, &a.ca_der()?, "GET", "/", &[], None);
    assert!(refused.is_err(), "B's certificate passed as A's");

    // A tablet paired with A (A's public key pinned) does not load B's kiosk.
    let pinned = Browser::start(&[&format!(
        "--ignore-certificate-errors-spki-list={}",
        a_offer["spki_sha256"].as_str().unwrap_or_default()
    )])?;
    pinned.goto(&format!("https://127.0.0.1:{}/", a.addr.port()))?;
    assert!(pinned.find("#verdict-ko").is_ok(), "A's kiosk loads");
    pinned.goto(&format!("https://127.0.0.1:{}/", b.addr.port()))?;
    assert!(
        pinned.find("#verdict-ko").is_err(),
        "B's kiosk loaded for a tablet paired with A"
    );
    pinned.screenshot("kiosk-https-impostor-refused")?;
    drop(pinned);

    // The pairing page, on a tablet not yet paired whose owner chose "Proceed".
    let fresh = Browser::start(&["--ignore-certificate-errors"])?;
    let outcome = |b: &Browser| -> Result<Option<String>> {
        let s = attr(b, "body", "data-pairing")?;
        Ok((!s.is_empty() && s != "checking").then_some(s))
    };
    // The address delivers B's CA under the fingerprint of A's sheet: nothing to install.
    let b_url = b_offer["url"].as_str().unwrap_or_default();
    let a_fp = a_offer["url"]
        .as_str()
        .unwrap_or_default()
        .split('#')
        .nth(1)
        .unwrap_or_default();
    let forged = format!("{}#{a_fp}", b_url.split('#').next().unwrap_or_default());
    fresh.goto(&forged)?;
    let s = fresh.wait_for("the pairing check", Duration::from_secs(10), outcome)?;
    assert_eq!(s, "mismatch");
    assert!(!fresh.is_displayed(&fresh.find("#pair-install")?)?);
    fresh.screenshot("kiosk-pairing-mismatch")?;
    // The code it used is gone: the page is dead now (no fragment: a full load).
    fresh.goto(b_url.split('#').next().unwrap_or_default())?;
    assert!(fresh.find("#pair-dead").is_ok(), "a used code still pairs");

    // A's own sheet: the fingerprint matches, the certificate is offered to install.
    let a_url = a_offer["url"].as_str().unwrap_or_default();
    fresh.goto(a_url)?;
    let s = fresh.wait_for("the pairing check", Duration::from_secs(10), outcome)?;
    assert_eq!(s, "match");
    assert!(fresh.is_displayed(&fresh.find("#pair-install")?)?);
    assert_eq!(
        fresh.text(&fresh.find("#pair-got")?)?,
        a_offer["ca_sha256"].as_str().unwrap_or_default()
    );
    let href = attr(&fresh, "#pair-download", "href")?;
    assert!(href.starts_with("blob:"), "{href}");
    fresh.screenshot("kiosk-pairing-match")?;
    // Once: the download used the code up, over HTTPS too.
    let code_path = a_url
        .split("/pair/")
        .nth(1)
        .and_then(|r| r.split('#').next())
        .unwrap_or_default();
    let again = a.https("GET", &format!("/pair/{code_path}/ca.crt"), &[], None)?;
    assert!(again.starts_with("HTTP/1.1 404"), "{again}");
    // The sheet itself is for this machine; a guessed code gets nothing.
    let guessed = a.https(
        "GET",
        &format!("/pair/{}/ca.crt", "0".repeat(32)),
        &[],
        None,
    )?;
    assert!(guessed.starts_with("HTTP/1.1 404"), "{guessed}");
    Ok(())
}

#[test]
fn staff_pin_rules_hold_over_https_and_garbage_on_the_port_hurts_nothing() -> Result<()> {
    let hub = HubFixture::new()?;
    let dir = hub.enroll_device("front-desk")?;
    let dev = Device::start(&dir)?;
    let d = dir.display().to_string();
    run_ok(
        "edge-node",
        &["--data", &d, "pin", "set", "--pin", "482916"],
    )?;

    // Garbage before any request: plain bytes, a TLS record that is no ClientHello, a
    // ClientHello cut short, a silent client. None takes the device down.
    let send = |bytes: &[u8]| -> Result<()> {
        let mut s = std::net::TcpStream::connect(dev.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(bytes)?;
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        Ok(())
    };
    let mut garbage = vec![0u8; 4096];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = u8::try_from((i * 7919 + 13) % 251).unwrap_or(0);
    }
    send(&garbage)?;
    send(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff])?;
    send(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])?;
    let mut head = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    head.extend_from_slice(&garbage);
    send(&head)?;
    let _silent = std::net::TcpStream::connect(dev.addr)?;
    let ok = dev.https("GET", "/healthz", &[], None)?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let plain = fixture::run_ok("edge-node", &["--data", &d, "status", "--json"])?;
    assert!(
        plain.contains("\"records\""),
        "the control API over loopback HTTP: {plain}"
    );

    // A wrong PIN over HTTPS counts like over HTTP; the right one opens a session whose
    // cookie never travels in the clear.
    let login = |pin: &str| {
        dev.https(
            "POST",
            "/kiosk/staff/login",
            &[("content-type", "application/json")],
            Some(json!({ "pin": pin }).to_string().as_bytes()),
        )
    };
    let wrong = login("111111")?;
    assert!(!wrong.starts_with("HTTP/1.1 200"), "{wrong}");
    assert!(wrong.contains("attempts_left"), "{wrong}");
    let right = login("482916")?;
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    let cookie_line = right
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .context("no session cookie")?;
    assert!(cookie_line.contains("; Secure"), "{cookie_line}");
    assert!(cookie_line.contains("HttpOnly"), "{cookie_line}");
    Ok(())
}

#[test]
fn slow_connections_from_other_addresses_leave_loopback_its_answer() -> Result<()> {
    let hub = HubFixture::new()?;
    let dir = hub.enroll_device("front-desk")?;
    let dev = Device::start(&dir)?;
    let port = dev.addr.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // 256 connections that start a request and never finish its head (16 from each of
    // 127.0.0.2..=127.0.0.17), and 40 more from one address beyond its share: on the old
    // server they took every slot until their head timed out.
    let held = rt.block_on(async {
        let mut held = Vec::new();
        let from = |i: u8| async move {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from(([127, 0, 0, i], 0)))?;
            let mut s = sock
                .connect(SocketAddr::from(([127, 0, 0, 1], port)))
                .await?;
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127").await;
            anyhow::Ok(s)
        };
        for i in 2..=17u8 {
            for _ in 0..16 {
                held.push(from(i).await?);
            }
        }
        for _ in 0..40 {
            held.push(from(18).await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        anyhow::Ok(held)
    })?;
    let started = std::time::Instant::now();
    let answer = rt.block_on(async {
        let mut s = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(dev.addr),
        )
        .await
        .context("connect within 2 s")??;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer))
            .await
            .context("the device did not answer loopback within 2 s")??;
        anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
    })?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);
    Ok(())
}

#[test]
fn a_half_made_ca_costs_the_kiosk_https_not_the_device() -> Result<()> {
    let hub = HubFixture::new()?;
    let dir = hub.enroll_device("front-desk")?;
    // A power cut at the first start: the key written, the certificate not.
    std::fs::create_dir_all(dir.join("tls"))?;
    std::fs::write(dir.join("tls/ca.key"), b"-----BEGIN PRIVATE KEY-----\n")?;
    let d = dir.display().to_string();
    let (_proc, addr) =
        fixture::run_with_http(&dir, &[]).context("the device did not start without its CA")?;
    let plain = |path: &str| -> Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    let health = plain("/healthz?detail=1")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("HTTPS is unavailable"), "{health}");
    let status = run_ok("edge-node", &["--data", &d, "status", "--json"])?;
    assert!(status.contains("HTTPS is unavailable"), "{status}");
    // `status` went through the running device's control API (it holds the store).
    assert!(status.contains("\"records\""), "{status}");
    // Nothing was replaced: the key is as the power cut left it.
    assert_eq!(
        std::fs::read(dir.join("tls/ca.key"))?,
        b"-----BEGIN PRIVATE KEY-----\n"
    );
    Ok(())
}
