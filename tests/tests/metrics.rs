//! `/metrics` and `/healthz` of both running binaries: every metric the Grafana dashboard
//! (`deploy/grafana/kipass.json`) and the alert rules (`deploy/prometheus/alerts.yml`) name
//! is exposed by a real scrape of a hub and a device that have synced, with the samples the
//! alerts read (a facility's last sync, a device's clock offset, retention's last run); the
//! device's `/metrics` needs its control token; `/healthz` still answers `ok` and gives its
//! detail as JSON without names.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{self, HubFixture, Proc, bin, sync_once, wait_until};
use tests::people::Api;

/// Every `kipass_...` name in `text`.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("kipass_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // Only names used as metrics: a preceding identifier character means it is part of
        // something else.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name.clone());
        }
        rest = &rest[i + name.len().max(1)..];
    }
    out
}

/// The metric names a scrape exposes: every `# TYPE` (a histogram's series too) and every
/// sample's name.
fn exposed(scrape: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            out.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name: String = line
                .chars()
                .take_while(|c| *c != '{' && *c != ' ')
                .collect();
            out.insert(name);
        }
    }
    out
}

fn run_json(dir: &Path) -> Result<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("run.json"))?)?;
    Ok(format!(
        "http://{}",
        v["http"].as_str().context("run.json has no http")?
    ))
}

/// A sample line's value: `name` followed by its labels as written, then a space.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn dashboard_and_alert_metrics_are_scraped_and_health_has_detail() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    let _hub_run = hub.start()?;
    let tokens = fixture::check_in_codes(&dev, 2)?;
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!("sync failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    // One trace through the running hub, for the latency histogram.
    hub.trace(&tokens[0])?;

    // The device runs; an expired code through its control API is a refused visit.
    let port = fixture::free_udp_port()?;
    let d = dev.to_str().unwrap_or_default();
    let _dev_run = Proc(
        Command::new(bin("edge-node"))
            .args(["--data", d, "run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--http", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    if !wait_until(Duration::from_secs(30), || dev.join("run.json").exists()) {
        bail!("the device did not start");
    }
    let (frame, _, _) = fixture::code_frame(hub.tmp.path(), "old", fixture::now() - 3600)?;
    let scanned = fixture::run_ok(
        "edge-node",
        &[
            "--data",
            d,
            "scan",
            "--json",
            frame.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(scanned.contains("expired"), "{scanned}");

    let hub_api = Api::new(&run_json(&hub.data)?);
    let dev_api = Api::new(&run_json(&dev)?);
    let operator = sync_hub::control::operator_token(&hub.data)?;
    let control = std::fs::read_to_string(dev.join("control.token"))?;
    let control = control.trim();

    // The hub's retention timer runs once at the start.
    let mut hub_scrape = String::new();
    let ran = wait_until(Duration::from_secs(20), || {
        hub_scrape = hub_api
            .call("GET", "/metrics", Some(&operator), None)
            .map(|a| a.text)
            .unwrap_or_default();
        hub_scrape.contains("\nkipass_retention_last_run_timestamp_seconds ")
    });
    assert!(ran, "no retention run in the hub's metrics:\n{hub_scrape}");
    let refused = dev_api.call("GET", "/metrics", None, None)?;
    assert_eq!(refused.status, 401, "the device's metrics need its token");
    let wrong = dev_api.call("GET", "/metrics", Some(&"0".repeat(64)), None)?;
    assert_eq!(wrong.status, 403);
    let dev_scrape = dev_api.call("GET", "/metrics", Some(control), None)?;
    assert_eq!(dev_scrape.status, 200, "{}", dev_scrape.text);
    let dev_scrape = dev_scrape.text;

    // Every name the dashboard and the alerts use is in one of the scrapes.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let have: BTreeSet<String> = exposed(&hub_scrape)
        .into_iter()
        .chain(exposed(&dev_scrape))
        .collect();
    for file in ["deploy/grafana/kipass.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file))?;
        let used = names_used(&text);
        assert!(used.len() >= 5, "{file} names too few metrics: {used:?}");
        let missing: Vec<&String> = used.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no scrape exposes: {missing:?}"
        );
    }
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana/kipass.json"),
    )?)?;
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 10));

    // The samples the alerts and the dashboard read.
    let f = &hub.facility;
    let last = sample(
        &hub_scrape,
        &format!("kipass_facility_last_sync_timestamp_seconds{{facility=\"{f}\"}}"),
    );
    assert!(last.is_some_and(|t| t > 0.0), "{hub_scrape}");
    assert!(
        hub_scrape.contains(&format!(
            "kipass_device_clock_offset_seconds{{facility=\"{f}\","
        )),
        "{hub_scrape}"
    );
    assert_eq!(
        sample(&hub_scrape, "kipass_trace_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(&hub_scrape, "kipass_records_ingested_total"),
        Some(2.0)
    );
    // What held the hub's actor: the sync's frames, the trace's jobs, the retention run.
    for kind in ["frame", "session", "query", "purge_start"] {
        let held = sample(
            &hub_scrape,
            &format!("kipass_hub_actor_hold_max_seconds{{kind=\"{kind}\"}}"),
        );
        assert!(held.is_some_and(|s| s > 0.0), "{kind}: {hub_scrape}");
        let n = sample(
            &hub_scrape,
            &format!("kipass_hub_actor_holds_total{{kind=\"{kind}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{kind}: {hub_scrape}");
    }
    let holds = sample(&hub_scrape, "kipass_hub_actor_hold_seconds_count").unwrap_or(0.0);
    let within_1s = sample(
        &hub_scrape,
        "kipass_hub_actor_hold_seconds_bucket{le=\"1\"}",
    );
    assert!(holds >= 4.0, "{hub_scrape}");
    assert!(within_1s.is_some_and(|n| n <= holds), "{hub_scrape}");
    assert_eq!(sample(&dev_scrape, "kipass_edge_records_held"), Some(2.0));
    assert_eq!(
        sample(&dev_scrape, "kipass_edge_unsynced_records"),
        Some(0.0)
    );
    assert_eq!(sample(&dev_scrape, "kipass_edge_days_held"), Some(1.0));
    assert!(sample(&dev_scrape, "kipass_edge_last_sync_timestamp_seconds").is_some());
    assert!(sample(&dev_scrape, "kipass_edge_clock_offset_seconds").is_some());
    assert_eq!(
        sample(&dev_scrape, "kipass_edge_visits_total{verdict=\"expired\"}"),
        Some(1.0),
        "{dev_scrape}"
    );
    // No names in either scrape.
    for s in [&hub_scrape, &dev_scrape] {
        assert!(!s.contains("Star Karaoke") && !s.contains("gate\""), "{s}");
    }

    // /healthz: plain `ok` for a bare GET; JSON detail on request.
    for api in [&hub_api, &dev_api] {
        let bare = api.call("GET", "/healthz", None, None)?;
        assert_eq!((bare.status, bare.text.as_str()), (200, "ok"));
        let detail = api.call("GET", "/healthz?detail=1", None, None)?;
        assert_eq!(detail.status, 200, "{}", detail.text);
        let h = detail.json();
        assert_eq!(h["status"], "ok", "{h}");
        assert_eq!(h["store_writable"], true, "{h}");
        assert!(h["day_keys_left"].as_u64().is_some_and(|n| n > 0), "{h}");
        assert!(h["last_sync"].as_u64().is_some(), "{h}");
        assert!(h.get("last_purge").is_some(), "{h}");
        assert!(h["problems"].as_array().is_some_and(Vec::is_empty), "{h}");
        assert!(
            !detail.text.contains("Star Karaoke") && !detail.text.contains(f.as_str()),
            "{}",
            detail.text
        );
    }
    let hub_detail = hub_api.call("GET", "/healthz?detail=1", None, None)?.json();
    assert!(hub_detail["last_purge"].as_u64().is_some(), "{hub_detail}");
    assert!(hub_detail["day_keys_ahead"].as_u64().is_some_and(|n| n > 0));
    Ok(())
}

/// Names are read from expressions as metrics, histogram series count as their family.
#[test]
fn metric_names_are_parsed() {
    let used = names_used(r#"{"expr": "rate(kipass_a_total[5m]) / x_kipass_no"}"#);
    assert_eq!(used.into_iter().collect::<Vec<_>>(), vec!["kipass_a_total"]);
    let have = exposed("# TYPE kipass_h histogram\nkipass_g{a=\"b\"} 1\n");
    assert!(have.contains("kipass_h_bucket") && have.contains("kipass_g"));
}
