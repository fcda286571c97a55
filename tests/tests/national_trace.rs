//! One national trace through the real binaries on loopback: three regional hubs (mapo,
//! gangnam, jeju) and a fourth address that accepts connections and never answers; a case
//! visited facilities in mapo and gangnam; jeju's hub is down. `sync-hub nation trace` on the
//! authority's side reports mapo and gangnam answered (gangnam with a facility whose device
//! has not synced since the window), jeju as an error and the silent one as a timeout, merges
//! both regions' visits and contacts, keeps the paper contact sealed (the authority's `paper
//! open` opens it from the national report), and each answering hub audited its part.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::fixture::{BUSINESS_NUMBER, bin, free_udp_port, run_ok};
use tests::people::{PeopleHub, Visit, add_device, add_facility, registration, set_last_sync};

const MIN: u64 = 60;

/// `sync-hub init --region R` sealing paper to `recipient` (all regions share one health
/// authority), or generating the authority's key when `None`.
fn hub(region: &str, recipient: Option<&str>) -> Result<PeopleHub> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("hub");
    let d = data.display().to_string();
    let listen = format!("127.0.0.1:{}", free_udp_port()?);
    let mut args = vec![
        "--data", &d, "init", "--region", region, "--listen", &listen, "--json",
    ];
    if let Some(r) = recipient {
        args.extend(["--authority-recipient", r]);
    }
    let v: Value = serde_json::from_str(run_ok("sync-hub", &args)?.trim())?;
    let authority_identity = match v["authority_identity_file"].as_str() {
        Some(f) => f.into(),
        None => data.join("no-identity-here"),
    };
    let recipient = match recipient {
        Some(r) => r.to_owned(),
        None => {
            let text = std::fs::read_to_string(&authority_identity)?;
            sync_hub::trace::read_identity(&text)
                .map_err(anyhow::Error::msg)?
                .to_public()
                .to_string()
        }
    };
    Ok(PeopleHub {
        tmp,
        data,
        authority_identity,
        authority_recipient: recipient,
    })
}

fn visit(f: &shared::FacilityId, d: &shared::DeviceId, at: u64, token: Option<[u8; 16]>) -> Visit {
    Visit {
        facility: f.clone(),
        device: d.clone(),
        at,
        token,
        paper_name: token.is_none().then(|| "정하늘".to_owned()),
        paper_remarks: String::new(),
    }
}

fn nation_trace(args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String)> {
    let mut child = Command::new(bin("sync-hub"))
        .args(["nation", "trace"])
        .args(args)
        .env_remove("SYNC_HUB_DATA")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut i)) = (stdin, child.stdin.take()) {
        i.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn a_case_in_two_regions_is_traced_at_once_with_one_region_down() -> Result<()> {
    let now = tests::people::now();
    let case = [0xC5u8; 16];
    let t0 = now - 3 * 3600;

    let mapo = hub("mapo", None)?;
    let recipient = mapo.authority_recipient.clone();
    let gangnam = hub("gangnam", Some(&recipient))?;
    let jeju = hub("jeju", Some(&recipient))?;

    // Mapo: the case, a QR contact and a paper contact at one karaoke; its device synced.
    let star = {
        let h = mapo.open()?;
        let reg = registration(
            "Star Karaoke",
            "karaoke",
            "mapo",
            "1 Wausan-ro",
            Some(BUSINESS_NUMBER),
        );
        let f = add_facility(&h, reg, now)?;
        let dev = add_device(&h, &f, now)?;
        set_last_sync(&h, &dev, Some(now))?;
        let visits = [
            visit(&f, &dev, t0, Some(case)),
            visit(&f, &dev, t0 + 5 * MIN, Some([7; 16])),
            visit(&f, &dev, t0 + 10 * MIN, None),
        ];
        tests::people::store_visits(&h, &recipient, &visits, 1, now)?;
        f
    };
    // Gangnam: the case two hours later at a bar whose device has not synced since.
    let bar = {
        let h = gangnam.open()?;
        let reg = registration(
            "Tent Bar",
            "karaoke",
            "gangnam",
            "2 Teheran-ro",
            Some(BUSINESS_NUMBER),
        );
        let f = add_facility(&h, reg, now)?;
        let dev = add_device(&h, &f, now)?;
        set_last_sync(&h, &dev, Some(t0 + 2 * 3600 - 10 * MIN))?;
        tests::people::store_visits(
            &h,
            &recipient,
            &[visit(&f, &dev, t0 + 2 * 3600, Some(case))],
            2,
            now,
        )?;
        f
    };
    let kdca: Vec<String> = [&mapo, &gangnam, &jeju]
        .iter()
        .map(|h| h.credential("authority", None, "kdca"))
        .collect::<Result<_>>()?;
    let (_mapo_run, mapo_url) = mapo.start()?;
    let (_gangnam_run, gangnam_url) = gangnam.start()?;
    let (mut jeju_run, jeju_url) = jeju.start()?;
    jeju_run.kill(); // the region's hub is down
    // A hub that takes the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let silent_url = format!("http://{}", silent.local_addr()?);

    let hubs = json!({"hubs": [
        {"region": "mapo", "url": mapo_url, "credential": kdca[0]},
        {"region": "gangnam", "url": gangnam_url, "credential": kdca[1]},
        {"region": "jeju", "url": jeju_url, "credential": kdca[2]},
        {"region": "busan", "url": silent_url, "credential": "whatever"},
    ]})
    .to_string();
    let dir = tempfile::tempdir()?;
    let hubs_file = dir.path().join("hubs.json");
    std::fs::write(&hubs_file, &hubs)?;
    let hf = hubs_file.display().to_string();
    let token = hex::encode(case);
    let from = (t0 - 3600).to_string();
    let to = now.to_string();
    let base = [
        "--token",
        &token,
        "--case",
        "case-42",
        "--purpose",
        "cluster",
        "--from",
        &from,
        "--to",
        &to,
        "--timeout",
        "2s",
    ];

    // A hubs file others can read is refused before anything is sent.
    std::fs::set_permissions(&hubs_file, std::fs::Permissions::from_mode(0o644))?;
    let (ok, _, err) = nation_trace(&[&["--hubs", &hf][..], &base].concat(), None)?;
    assert!(!ok && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&hubs_file, std::fs::Permissions::from_mode(0o600))?;

    let started = Instant::now();
    let (ok, out, err) = nation_trace(&[&["--hubs", &hf][..], &base].concat(), None)?;
    let took = started.elapsed();
    assert!(!ok, "two hubs did not answer: the exit says so");
    assert!(err.contains("2 of 4 hubs did not answer"), "{err}");
    assert!(
        took < Duration::from_secs(8),
        "bounded by the timeout: {took:?}"
    );
    let r: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    let status: Vec<(&str, &str)> = r["regions"]
        .as_array()
        .context("regions")?
        .iter()
        .map(|g| {
            (
                g["region"].as_str().unwrap_or_default(),
                g["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        status,
        [
            ("mapo", "ok"),
            ("gangnam", "ok"),
            ("jeju", "error"),
            ("busan", "timeout")
        ],
        "{r}"
    );
    assert_eq!(r["complete"], false);
    assert_eq!(r["regions"][0]["incomplete"], false);
    assert_eq!(r["regions"][1]["incomplete"], true);
    assert_eq!(
        r["regions"][1]["unsynced_facilities"],
        json!([bar.to_string()])
    );
    assert_eq!(
        r["unsynced_facilities"],
        json!([{"region": "gangnam", "facility_id": bar.to_string()}])
    );
    // Both regions' visits, by time.
    let visits: Vec<(&str, &str)> = r["visits"]
        .as_array()
        .context("visits")?
        .iter()
        .map(|v| {
            (
                v["region"].as_str().unwrap_or_default(),
                v["facility_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        visits,
        [("mapo", star.as_str()), ("gangnam", bar.as_str())],
        "{r}"
    );
    let contacts = r["contacts"].as_array().context("contacts")?;
    assert_eq!(contacts.len(), 2, "{r}");
    assert!(contacts.iter().all(|c| c["region"] == "mapo"));
    let paper = contacts
        .iter()
        .find(|c| c["paper"] == true)
        .context("the paper contact")?;
    assert!(
        paper["sealed_paper"]
            .as_str()
            .is_some_and(|s| s.len() > 100)
    );
    assert!(!out.contains("정하늘"), "paper stays sealed");

    // The authority opens the paper contact from the national report.
    let report_file = dir.path().join("national.json");
    std::fs::write(&report_file, &out)?;
    let opened = run_ok(
        "sync-hub",
        &[
            "paper",
            "open",
            "--identity",
            &mapo.authority_identity.display().to_string(),
            &report_file.display().to_string(),
        ],
    )?;
    let opened: Value = serde_json::from_str(opened.trim())?;
    assert_eq!(opened["name"], "정하늘");
    assert_eq!(opened["facility_id"], star.as_str());

    // Each answering hub audited its part, with the case.
    for h in [&mapo, &gangnam] {
        let audit = run_ok("sync-hub", &["--data", &h.data_str(), "audit", "--json"])?;
        let traced = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| {
                e["action"] == "trace" && e["case_id"] == "case-42" && e["actor"]["name"] == "kdca"
            });
        assert!(traced, "{}: {audit}", h.data_str());
    }

    // The same as CSV, the hubs file on stdin.
    let (ok, csv, err) = nation_trace(
        &[&["--hubs", "-", "--format", "csv"][..], &base].concat(),
        Some(&hubs),
    )?;
    assert!(!ok, "{err}");
    let kinds: Vec<(String, String)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let mut cells = l.split(',');
            let kind = cells.next().unwrap_or_default().to_owned();
            let region = cells.nth(1).unwrap_or_default().to_owned();
            (kind, region)
        })
        .collect();
    let count = |k: &str, region: &str| kinds.iter().filter(|(a, b)| a == k && b == region).count();
    assert_eq!(
        (
            count("region", "jeju"),
            count("visit", "mapo"),
            count("visit", "gangnam")
        ),
        (1, 1, 1),
        "{csv}"
    );
    assert_eq!(count("unsynced_facility", "gangnam"), 1, "{csv}");
    assert!(csv.contains("region,case-42,busan,timeout,"), "{csv}");

    // A wrong credential is that region's error, not the whole trace's.
    let wrong = hubs.replace(&kdca[1], "not-the-secret");
    let (_, out, _) = nation_trace(&[&["--hubs", "-"][..], &base].concat(), Some(&wrong))?;
    let r: Value = serde_json::from_str(out.trim())?;
    assert_eq!(r["regions"][1]["status"], "error");
    assert!(
        r["regions"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("401"),
        "{r}"
    );
    assert_eq!(r["regions"][0]["status"], "ok");
    drop(silent);
    if r["visits"].as_array().map(Vec::len) != Some(1) {
        bail!("only mapo's visit is left: {r}");
    }
    Ok(())
}
