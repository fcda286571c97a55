//! The hub's people through the real `sync-hub` binary: every HTTP route per role with every
//! refusal, a trace over a region's day of visits checked against an independent computation,
//! spreadsheet-safe CSV with hostile names, audit tampering, and local-government
//! administration (duplicates, designations, compliance).

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use redb::ReadableTable;
use serde_json::{Value, json};
use shared::{DeviceId, FacilityId};
use std::collections::{BTreeMap, BTreeSet};
use tests::fixture::{BUSINESS_NUMBER, run, run_ok};
use tests::people::{
    Answer, Api, PeopleHub, Visit, add_device, add_facility, formula_start, parse_csv,
    registration, set_last_sync, store_visits, token,
};

const MIN: u64 = 60;

fn expect(
    api: &Api,
    method: &str,
    path: &str,
    who: Option<&str>,
    body: Option<&str>,
    status: u16,
) -> Result<Answer> {
    let a = api.call(method, path, who, body)?;
    if a.status != status {
        bail!(
            "{method} {path}: expected {status}, got {} ({})",
            a.status,
            a.text.chars().take(300).collect::<String>()
        );
    }
    if status == 401 || status == 403 {
        // A refusal says why and nothing else.
        let v = a.json();
        let keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        if keys.len() != 1 || keys[0] != "error" {
            bail!(
                "{method} {path}: refusal carries more than an error: {}",
                a.text
            );
        }
    }
    Ok(a)
}

fn qr(facility: &FacilityId, device: &DeviceId, at: u64, t: [u8; 16]) -> Visit {
    Visit {
        facility: facility.clone(),
        device: device.clone(),
        at,
        token: Some(t),
        paper_name: None,
        paper_remarks: String::new(),
    }
}

fn paper(facility: &FacilityId, device: &DeviceId, at: u64, name: &str, remarks: &str) -> Visit {
    Visit {
        facility: facility.clone(),
        device: device.clone(),
        at,
        token: None,
        paper_name: Some(name.to_owned()),
        paper_remarks: remarks.to_owned(),
    }
}

#[test]
fn every_route_checks_role_and_region() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let case = [0xC1u8; 16];
    let (a, p1, p2, g) = {
        let hub = ph.open()?;
        let reg = |n: &str, region: &str, b: Option<&str>| {
            registration(n, "karaoke", region, &format!("{n} 1 Wausan-ro"), b)
        };
        let a = add_facility(
            &hub,
            reg("Star Karaoke", "mapo", Some(BUSINESS_NUMBER)),
            now,
        )?;
        let p1 = add_facility(&hub, reg("Tent Bar", "mapo", None), now)?;
        let p2 = add_facility(&hub, reg("Gangnam Tent", "gangnam", None), now)?;
        let g = add_facility(
            &hub,
            reg("Gangnam Star", "gangnam", Some(BUSINESS_NUMBER)),
            now,
        )?;
        let dev = add_device(&hub, &a, now)?;
        set_last_sync(&hub, &dev, Some(now))?;
        let t0 = now - 3 * 3600;
        store_visits(
            &hub,
            &ph.authority_recipient,
            &[
                qr(&a, &dev, t0, case),
                qr(&a, &dev, t0 + 5 * MIN, [2; 16]),
                paper(&a, &dev, t0 - 10 * MIN, "박서준", ""),
            ],
            1,
            now,
        )?;
        (a, p1, p2, g)
    };
    let operator = ph.credential("operator", None, "ops")?;
    let kim = ph.credential("officer", Some("mapo"), "kim")?;
    let lee = ph.credential("officer", Some("Gangnam"), "lee")?;
    let kdca = ph.credential("authority", None, "kdca")?;
    let old = ph.credential_json("officer", Some("mapo"), "old")?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &ph.data_str(),
            "credential",
            "revoke",
            old["credential_id"].as_str().unwrap_or_default(),
        ],
    )?;
    let revoked = old["secret"].as_str().unwrap_or_default().to_owned();
    let local = ph.operator_token()?;
    let (_hub, base) = ph.start()?;
    let api = Api::new(&base);

    // Who is who.
    let me = expect(&api, "GET", "/api/whoami", Some(&kim), None, 200)?.json();
    assert_eq!(
        (me["role"].as_str(), me["region"].as_str()),
        (Some("officer"), Some("mapo"))
    );

    let forged = format!("kph1.cred_0000000000000000.{}", "0".repeat(64));
    let wrong_secret = {
        let mut s = kim.clone();
        let last = if s.ends_with('0') { "1" } else { "0" };
        s.replace_range(s.len() - 1.., last);
        s
    };
    let unauthenticated: [Option<&str>; 5] = [
        None,
        Some("nonsense"),
        Some(&forged),
        Some(&wrong_secret),
        Some(&revoked),
    ];
    let people: [(&str, &str); 5] = [
        ("operator", &operator),
        ("kim", &kim),
        ("lee", &lee),
        ("kdca", &kdca),
        ("local", &local),
    ];
    let trace_body =
        json!({"tokens": [hex::encode(case)], "case": "case-1", "purpose": "cluster"}).to_string();
    // Read-only routes: (method, path, body, who may).
    let routes: Vec<(&str, &str, Option<String>, &[&str])> = vec![
        (
            "GET",
            "/api/whoami",
            None,
            &["operator", "kim", "lee", "kdca", "local"],
        ),
        ("GET", "/api/stats", None, &["operator", "local"]),
        ("GET", "/metrics", None, &["operator", "local"]),
        (
            "GET",
            "/api/facilities",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/facilities/pending",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/facilities/duplicates",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/designations",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/reports/compliance?hours=24",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/dashboard",
            None,
            &["operator", "kim", "lee", "local"],
        ),
        (
            "GET",
            "/api/audit",
            None,
            &["operator", "kim", "lee", "kdca", "local"],
        ),
        ("GET", "/api/audit/verify", None, &["operator", "local"]),
        (
            "POST",
            "/api/trace",
            Some(trace_body.clone()),
            &["kdca", "local"],
        ),
        (
            "POST",
            "/api/trace?format=csv",
            Some(trace_body.clone()),
            &["kdca", "local"],
        ),
        ("GET", "/api/reports/shared-codes", None, &["kdca", "local"]),
        (
            "POST",
            "/api/admin",
            Some(json!({"command": "facility_list"}).to_string()),
            &["local"],
        ),
        (
            "POST",
            "/api/purge",
            Some("{}".into()),
            &["operator", "local"],
        ),
    ];
    for (method, path, body, allowed) in &routes {
        for who in unauthenticated {
            expect(&api, method, path, who, body.as_deref(), 401)?;
        }
        for (name, secret) in people {
            let status = if allowed.contains(&name) { 200 } else { 403 };
            expect(&api, method, path, Some(secret), body.as_deref(), status)
                .with_context(|| format!("as {name}"))?;
        }
    }

    // Officers see their own region only.
    let listed = |who: &str| -> Result<BTreeSet<String>> {
        Ok(
            expect(&api, "GET", "/api/facilities", Some(who), None, 200)?
                .json()
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["facility_id"].as_str().map(str::to_owned))
                .collect(),
        )
    };
    assert_eq!(
        listed(&kim)?,
        BTreeSet::from([a.to_string(), p1.to_string()])
    );
    assert_eq!(
        listed(&lee)?,
        BTreeSet::from([p2.to_string(), g.to_string()])
    );
    assert_eq!(listed(&operator)?.len(), 4);

    // Mutations: every refusal first, then the one allowed.
    let approve_p1 = format!("/api/facilities/{p1}/approve");
    for who in unauthenticated {
        expect(&api, "POST", &approve_p1, who, None, 401)?;
    }
    for who in [&operator, &kdca, &lee] {
        expect(&api, "POST", &approve_p1, Some(who), None, 403)?;
    }
    let pending = expect(
        &api,
        "GET",
        "/api/facilities/pending",
        Some(&kim),
        None,
        200,
    )?
    .json();
    assert_eq!(
        pending.as_array().map(Vec::len),
        Some(1),
        "nothing was approved by a refusal"
    );
    let approved = expect(&api, "POST", &approve_p1, Some(&kim), None, 200)?.json();
    assert_eq!(approved["status"], "approved");
    expect(
        &api,
        "POST",
        &format!("/api/facilities/{p2}/approve"),
        Some(&kim),
        None,
        403,
    )?;
    expect(
        &api,
        "POST",
        &format!("/api/facilities/{p2}/approve"),
        Some(&lee),
        None,
        200,
    )?;
    expect(
        &api,
        "POST",
        "/api/facilities/fac_nonexistent/approve",
        Some(&kim),
        None,
        400,
    )?;

    let remove_g = format!("/api/facilities/{g}/remove");
    for who in unauthenticated {
        expect(&api, "POST", &remove_g, who, None, 401)?;
        expect(&api, "POST", &remove_g, who, Some("{not json"), 401)?;
    }
    expect(&api, "POST", &remove_g, Some(&lee), Some("{not json"), 400)?;
    for who in [&operator, &kdca, &kim] {
        expect(&api, "POST", &remove_g, Some(who), None, 403)?;
    }
    expect(
        &api,
        "POST",
        &remove_g,
        Some(&lee),
        Some(r#"{"reason":"closed"}"#),
        200,
    )?;
    assert_eq!(listed(&lee)?, BTreeSet::from([p2.to_string()]));

    for who in unauthenticated {
        expect(
            &api,
            "POST",
            "/api/facilities/duplicates/remove",
            who,
            None,
            401,
        )?;
    }
    for who in [&operator, &kdca] {
        expect(
            &api,
            "POST",
            "/api/facilities/duplicates/remove",
            Some(who),
            None,
            403,
        )?;
    }
    expect(
        &api,
        "POST",
        "/api/facilities/duplicates/remove",
        Some(&kim),
        None,
        200,
    )?;

    let designate = json!({"target": {"kind": "category", "category": "cinema"}}).to_string();
    let elsewhere =
        json!({"target": {"kind": "category", "category": "cinema"}, "region": "gangnam"})
            .to_string();
    for who in unauthenticated {
        expect(
            &api,
            "POST",
            "/api/designations",
            who,
            Some(&designate),
            401,
        )?;
    }
    for who in [&operator, &kdca] {
        expect(
            &api,
            "POST",
            "/api/designations",
            Some(who),
            Some(&designate),
            403,
        )?;
    }
    expect(
        &api,
        "POST",
        "/api/designations",
        Some(&kim),
        Some(&elsewhere),
        403,
    )?;
    expect(
        &api,
        "POST",
        "/api/designations",
        Some(&kim),
        Some("{not json"),
        400,
    )?;
    let d = expect(
        &api,
        "POST",
        "/api/designations",
        Some(&kim),
        Some(&designate),
        200,
    )?
    .json();
    assert_eq!(d["region"], "mapo");
    let remove_d = format!(
        "/api/designations/{}/remove",
        d["id"].as_str().unwrap_or_default()
    );
    for who in unauthenticated {
        expect(&api, "POST", &remove_d, who, None, 401)?;
    }
    for who in [&operator, &kdca, &lee] {
        expect(&api, "POST", &remove_d, Some(who), None, 403)?;
    }
    expect(&api, "POST", &remove_d, Some(&kim), None, 200)?;

    // Trace input: authentication before the body; then the body's rules.
    expect(&api, "POST", "/api/trace", None, Some("{garbage"), 401)?;
    expect(
        &api,
        "POST",
        "/api/trace",
        Some(&kdca),
        Some("{garbage"),
        400,
    )?;
    let no_case = json!({"tokens": [hex::encode(case)]}).to_string();
    expect(&api, "POST", "/api/trace", Some(&kdca), Some(&no_case), 400)?;
    let too_long = json!({"tokens": [hex::encode(case)], "case": "c", "purpose": "p",
        "from": now - 29 * 86_400, "to": now})
    .to_string();
    let e = expect(
        &api,
        "POST",
        "/api/trace",
        Some(&kdca),
        Some(&too_long),
        400,
    )?;
    assert!(e.text.contains("retention"), "{}", e.text);
    let bad_token = json!({"tokens": ["xyz"], "case": "c", "purpose": "p"}).to_string();
    expect(
        &api,
        "POST",
        "/api/trace",
        Some(&kdca),
        Some(&bad_token),
        400,
    )?;
    expect(
        &api,
        "POST",
        "/api/trace?format=xml",
        Some(&kdca),
        Some(&trace_body),
        400,
    )?;

    let tr = expect(
        &api,
        "POST",
        "/api/trace",
        Some(&kdca),
        Some(&trace_body),
        200,
    )?
    .json();
    assert_eq!(tr["visits"][0]["facility_name"], "Star Karaoke");
    assert_eq!(
        tr["visits"][0]["facility_address"],
        "Star Karaoke 1 Wausan-ro"
    );
    assert_eq!(tr["contacts"].as_array().map(Vec::len), Some(2));
    let paper_contact = tr["contacts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["paper"] == true)
        .context("a paper contact")?;
    assert!(
        paper_contact["sealed_paper"]
            .as_str()
            .is_some_and(|s| s.len() > 100)
    );
    assert!(paper_contact.get("token").is_none());

    // The audit log: who did what; each role sees its own part.
    let all = expect(
        &api,
        "GET",
        "/api/audit?limit=1000",
        Some(&operator),
        None,
        200,
    )?
    .json();
    let actions: Vec<(String, String)> = all
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["actor"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for needed in [
        ("credential.add", "local operator"),
        ("credential.revoke", "local operator"),
        ("facility.approve", "kim"),
        ("facility.approve", "lee"),
        ("facility.remove", "lee"),
        ("designation.add", "kim"),
        ("designation.remove", "kim"),
        ("trace", "kdca"),
        ("report.shared_codes", "kdca"),
    ] {
        assert!(
            actions.iter().any(|(a, n)| a == needed.0 && n == needed.1),
            "{needed:?} not in {actions:?}"
        );
    }
    let trace_entry = all
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["action"] == "trace" && e["actor"]["name"] == "kdca")
        .context("trace entry")?;
    assert_eq!(trace_entry["case_id"], "case-1");
    assert_eq!(trace_entry["purpose"], "cluster");
    assert_eq!(trace_entry["facilities"], json!([a.to_string()]));
    let kims = expect(&api, "GET", "/api/audit", Some(&kim), None, 200)?.json();
    assert!(
        kims.as_array()
            .into_iter()
            .flatten()
            .all(|e| e["region"] == "mapo"
                && !e["action"].as_str().unwrap_or("trace").starts_with("trace"))
    );
    assert!(kims.as_array().is_some_and(|a| !a.is_empty()));
    let kdcas = expect(&api, "GET", "/api/audit", Some(&kdca), None, 200)?.json();
    assert!(
        kdcas
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["actor"]["role"] == "authority")
    );
    let verified = expect(&api, "GET", "/api/audit/verify", Some(&operator), None, 200)?.json();
    assert_eq!(verified["ok"], true, "{verified}");

    // Metrics for the operator.
    let m = expect(&api, "GET", "/metrics", Some(&operator), None, 200)?;
    assert!(m.content_type.starts_with("text/plain"));
    for needle in [
        "kipass_sync_sessions_completed_total ",
        "kipass_records_ingested_total ",
        "kipass_sync_bytes_received_total ",
        "kipass_refused_devices_total ",
        "kipass_retention_runs_total ",
        "kipass_day_keys_left 30\n",
        &format!("kipass_facility_last_sync_age_seconds{{facility=\"{a}\"}} "),
        "kipass_records_held 3\n",
    ] {
        assert!(
            m.text.contains(needle),
            "metrics lack {needle:?}:\n{}",
            m.text
        );
    }

    // The dashboard page is open and holds no data; its data route is not.
    let page = expect(&api, "GET", "/", None, None, 200)?;
    assert!(page.text.contains("전자출입명부") && !page.text.contains("Star Karaoke"));
    assert!(!page.text.contains("http://") && !page.text.contains("https://"));
    Ok(())
}

/// A region's day: facilities, devices, a population's visits (fresh one-time token each),
/// paper entries and shared screenshots. The case is person 0.
struct Region {
    facilities: Vec<(FacilityId, String, String)>,
    visits: Vec<Visit>,
    case_tokens: BTreeSet<[u8; 16]>,
    devices: BTreeMap<FacilityId, Vec<(DeviceId, Option<u64>)>>,
}

fn region_day(ph: &PeopleHub, n_facilities: usize, people: usize, now: u64) -> Result<Region> {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let hub = ph.open()?;
    let mut facilities = Vec::new();
    let mut devices: BTreeMap<FacilityId, Vec<(DeviceId, Option<u64>)>> = BTreeMap::new();
    let categories = [
        "karaoke",
        "pc_room",
        "buffet",
        "indoor_gx",
        "cinema",
        "academy",
    ];
    for i in 0..n_facilities {
        let name = format!("Facility {i:03}");
        let address = format!("{i} Mapo-daero, Mapo-gu");
        let id = add_facility(
            &hub,
            registration(
                &name,
                categories[i % categories.len()],
                "mapo",
                &address,
                Some(BUSINESS_NUMBER),
            ),
            now - 86_400 * 3,
        )?;
        let d = add_device(&hub, &id, now - 86_400 * 3)?;
        // Most devices synced a minute ago; every 25th facility's last sync is 6 hours old.
        let last = if i % 25 == 7 {
            now - 6 * 3600
        } else {
            now - 60
        };
        set_last_sync(&hub, &d, Some(last))?;
        let mut list = vec![(d, Some(last))];
        // Every 30th facility has a second device that never synced.
        if i % 30 == 0 {
            list.push((add_device(&hub, &id, now - 86_400)?, None));
        }
        devices.insert(id.clone(), list);
        facilities.push((id, name, address));
    }
    let start = now - 20 * 3600;
    let end = now - 3600;
    let mut visits = Vec::new();
    let mut case_tokens = BTreeSet::new();
    for person in 0..people {
        let n = if person == 0 {
            10
        } else {
            rng.gen_range(1..=12)
        };
        let mut times: Vec<u64> = (0..n).map(|_| rng.gen_range(start..end)).collect();
        times.sort_unstable();
        for (k, t) in times.into_iter().enumerate() {
            // The case visits facility 0 (with a never-synced device) and facility 7 (stale).
            let f = match (person, k) {
                (0, 0) => 0,
                (0, 1) => 7,
                _ => rng.gen_range(0..n_facilities),
            };
            let (fid, _, _) = &facilities[f];
            let dev = devices[fid][0].0.clone();
            if person != 0 && rng.gen_range(0..100) < 3 {
                visits.push(paper(
                    fid,
                    &dev,
                    t,
                    &format!("방문자 {person}-{k}"),
                    "ID checked",
                ));
                continue;
            }
            let tk = token(&mut rng);
            if person == 0 {
                case_tokens.insert(tk);
            }
            visits.push(qr(fid, &dev, t, tk));
            // Shared screenshots: 1 in 200 codes is scanned again at another facility within
            // 2..14 s; one of the case's codes too.
            if (person == 0 && k == 3) || rng.gen_range(0..200) == 0 {
                let other = (f + 1 + rng.gen_range(0..n_facilities - 1)) % n_facilities;
                let ofid = &facilities[other].0;
                let odev = devices[ofid][0].0.clone();
                visits.push(qr(ofid, &odev, t + rng.gen_range(2..=14), tk));
            }
        }
    }
    // Paper entries right beside the case's first visit.
    let first_case = visits
        .iter()
        .filter(|v| v.token.is_some_and(|t| case_tokens.contains(&t)))
        .map(|v| (v.facility.clone(), v.at))
        .min_by_key(|(f, _)| f.clone() != facilities[0].0)
        .context("the case has a visit at facility 0")?;
    let dev0 = devices[&first_case.0][0].0.clone();
    for (k, dt) in [(0, 120u64), (1, 29 * MIN)] {
        visits.push(paper(
            &first_case.0,
            &dev0,
            first_case.1 + dt,
            &format!("수기 {k}"),
            "",
        ));
    }
    visits.push(paper(
        &first_case.0,
        &dev0,
        first_case.1 + 31 * MIN,
        "too late",
        "",
    ));
    store_visits(&hub, &ph.authority_recipient, &visits, 5, now)?;
    Ok(Region {
        facilities,
        visits,
        case_tokens,
        devices,
    })
}

type Key = (Option<String>, String, u64);

fn key_of(v: &Value) -> Key {
    (
        v["token"].as_str().map(str::to_owned),
        v["facility_id"].as_str().unwrap_or_default().to_owned(),
        v["scanned_at"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_regions_day_traces_like_an_independent_computation() -> Result<()> {
    let started = std::time::Instant::now();
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let region = region_day(&ph, 300, 2_400, now)?;
    assert!(
        region.visits.len() > 15_000,
        "{} visits",
        region.visits.len()
    );
    let window = 30 * MIN;

    // The independent computation, straight from the ground truth.
    let case_visits: Vec<&Visit> = region
        .visits
        .iter()
        .filter(|v| v.token.is_some_and(|t| region.case_tokens.contains(&t)))
        .collect();
    let expected_visits: BTreeSet<Key> = case_visits
        .iter()
        .map(|v| (v.token.map(hex::encode), v.facility.to_string(), v.at))
        .collect();
    let expected_contacts: BTreeMap<Key, Option<String>> = region
        .visits
        .iter()
        .filter(|w| !w.token.is_some_and(|t| region.case_tokens.contains(&t)))
        .filter(|w| {
            case_visits
                .iter()
                .any(|v| v.facility == w.facility && v.at.abs_diff(w.at) <= window)
        })
        .map(|w| {
            (
                (w.token.map(hex::encode), w.facility.to_string(), w.at),
                w.paper_name.clone(),
            )
        })
        .collect();
    let mut latest: BTreeMap<&FacilityId, u64> = BTreeMap::new();
    for v in &case_visits {
        let e = latest.entry(&v.facility).or_default();
        *e = (*e).max(v.at);
    }
    let expected_unsynced: BTreeSet<String> = latest
        .iter()
        .filter(|(f, t)| {
            region.devices[**f]
                .iter()
                .any(|(_, last)| last.is_none_or(|s| s < **t + window))
        })
        .map(|(f, _)| f.to_string())
        .collect();
    let mut expected_shared: BTreeSet<String> = BTreeSet::new();
    let mut all_shared: BTreeSet<String> = BTreeSet::new();
    for (i, a) in region.visits.iter().enumerate() {
        for b in &region.visits[i + 1..] {
            if a.token.is_some()
                && a.token == b.token
                && a.facility != b.facility
                && a.at.abs_diff(b.at) <= 15
            {
                let t = a.token.map(hex::encode).unwrap_or_default();
                if a.token.is_some_and(|t| region.case_tokens.contains(&t)) {
                    expected_shared.insert(t.clone());
                }
                all_shared.insert(t);
            }
        }
    }
    eprintln!(
        "{} visits at {} facilities; case: {} visits, {} contacts ({} paper), {} unsynced \
         facilities, {} shared codes of the case, {} in the region",
        region.visits.len(),
        region.facilities.len(),
        expected_visits.len(),
        expected_contacts.len(),
        expected_contacts.values().filter(|p| p.is_some()).count(),
        expected_unsynced.len(),
        expected_shared.len(),
        all_shared.len()
    );
    assert!(expected_visits.len() >= 11 && expected_contacts.len() > 20);
    assert!(expected_contacts.values().filter(|p| p.is_some()).count() >= 2);
    assert!(!expected_unsynced.is_empty() && !expected_shared.is_empty());

    let tokens: Vec<String> = region.case_tokens.iter().map(hex::encode).collect();
    let check = |tr: &Value| -> Result<()> {
        let visits: BTreeSet<Key> = tr["visits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(key_of)
            .collect();
        assert_eq!(visits, expected_visits, "visits");
        let contacts: BTreeSet<Key> = tr["contacts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(key_of)
            .collect();
        assert_eq!(
            contacts,
            expected_contacts.keys().cloned().collect::<BTreeSet<_>>(),
            "contacts"
        );
        let unsynced: BTreeSet<String> = tr["unsynced_facilities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect();
        assert_eq!(unsynced, expected_unsynced, "unsynced facilities");
        assert_eq!(tr["incomplete"], true);
        let shared: BTreeSet<String> = tr["shared_codes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["token"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(shared, expected_shared, "shared codes");
        for v in tr["visits"].as_array().into_iter().flatten() {
            let (_, name, address) = region
                .facilities
                .iter()
                .find(|(id, _, _)| id.as_str() == v["facility_id"])
                .context("a registered facility")?;
            assert_eq!(
                (&v["facility_name"], &v["facility_address"]),
                (&json!(name), &json!(address))
            );
            let flagged = v["shared_code"] == true;
            assert_eq!(
                flagged,
                expected_shared.contains(v["token"].as_str().unwrap_or_default())
            );
        }
        Ok(())
    };

    // The hub's own operator on its machine, through the CLI (cli.md's fields).
    let d = ph.data_str();
    let mut args = vec![
        "--data",
        d.as_str(),
        "trace",
        "--json",
        "--case",
        "c-7",
        "--purpose",
        "t",
    ];
    for t in &tokens {
        args.extend(["--token", t.as_str()]);
    }
    let local: Value = serde_json::from_str(run_ok("sync-hub", &args)?.trim())?;
    check(&local)?;

    // The health authority over HTTP.
    let kdca = ph.credential("authority", None, "kdca")?;
    let (_hub, base) = ph.start()?;
    let api = Api::new(&base);
    let body =
        json!({"tokens": tokens, "case": "case-42", "purpose": "cluster at Mapo"}).to_string();
    let traced = std::time::Instant::now();
    let remote = expect(&api, "POST", "/api/trace", Some(&kdca), Some(&body), 200)?.json();
    eprintln!(
        "trace of {} tokens over {} visits: {:?}",
        tokens.len(),
        region.visits.len(),
        traced.elapsed()
    );
    check(&remote)?;
    assert_eq!(remote["case_id"], "case-42");

    // The authority opens the paper contacts with its identity.
    let export = ph.tmp.path().join("trace.json");
    std::fs::write(&export, remote.to_string())?;
    let opened = run_ok(
        "sync-hub",
        &[
            "paper",
            "open",
            "--identity",
            ph.authority_identity.to_str().unwrap_or_default(),
            export.to_str().unwrap_or_default(),
        ],
    )?;
    let names: BTreeSet<String> = opened
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_default()["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let expected_names: BTreeSet<String> = expected_contacts.values().flatten().cloned().collect();
    assert_eq!(names, expected_names);
    assert!(!names.contains("too late"));

    // The shared-code report over the whole region.
    let report = expect(
        &api,
        "GET",
        "/api/reports/shared-codes",
        Some(&kdca),
        None,
        200,
    )?
    .json();
    let found: BTreeSet<String> = report["shared_codes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["token"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(found, all_shared);
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn csv_exports_are_safe_with_hostile_names() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let long = format!("\"{}\"", "긴이름,".repeat(20));
    let hostile_facilities = [
        "=HYPERLINK(\"http://evil.example\",\"click\")",
        "+1 555 Karaoke",
        "-2+3 PC",
        "@SUM(A1:A9)",
        "Kim's \"Best\", Bar",
        long.as_str(),
        "＝1+1 full width",
    ];
    let hostile_paper = [
        ("=cmd|' /C calc'!A0", "\tlooks indented"),
        ("+82 Park", "line one\nline two"),
        ("-Lee", "@mention"),
        ("@Choi", "=1+2"),
        ("\"Quoted\", Name", "-minus"),
    ];
    let case = [0xCA; 16];
    let mut facilities = Vec::new();
    {
        let hub = ph.open()?;
        let mut visits = Vec::new();
        for (i, name) in hostile_facilities.iter().enumerate() {
            let f = add_facility(
                &hub,
                registration(
                    name,
                    "karaoke",
                    "mapo",
                    &format!("=A{i}+B{i} address"),
                    Some(BUSINESS_NUMBER),
                ),
                now,
            )?;
            let d = add_device(&hub, &f, now)?;
            set_last_sync(&hub, &d, Some(now))?;
            let t = now - 5 * 3600 + i as u64 * 3600 / 2;
            visits.push(qr(&f, &d, t, case));
            let (pname, remarks) = hostile_paper[i % hostile_paper.len()];
            visits.push(paper(&f, &d, t + 60, pname, remarks));
            facilities.push(f);
        }
        store_visits(&hub, &ph.authority_recipient, &visits, 9, now)?;
    }
    let d = ph.data_str();
    let t = hex::encode(case);
    let csv_file = ph.tmp.path().join("trace.csv");
    run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "trace",
            "--token",
            &t,
            "--case",
            "c",
            "--format",
            "csv",
            "--out",
            csv_file.to_str().unwrap_or_default(),
        ],
    )?;
    let json_out: Value = serde_json::from_str(
        run_ok(
            "sync-hub",
            &["--data", &d, "trace", "--token", &t, "--json"],
        )?
        .trim(),
    )?;
    let kdca = ph.credential("authority", None, "kdca")?;
    let (_hub, base) = ph.start()?;
    let api = Api::new(&base);
    let body = json!({"tokens": [t], "case": "=case", "purpose": "csv"}).to_string();
    let http_csv = expect(
        &api,
        "POST",
        "/api/trace?format=csv",
        Some(&kdca),
        Some(&body),
        200,
    )?;
    assert!(http_csv.content_type.starts_with("text/csv"));

    for text in [std::fs::read_to_string(&csv_file)?, http_csv.text.clone()] {
        let rows = parse_csv(&text)?;
        let header = &rows[0];
        assert_eq!(header[0], "kind");
        assert!(rows.iter().all(|r| r.len() == header.len()), "ragged rows");
        for cell in rows.iter().flatten() {
            assert!(!formula_start(cell), "a cell starts a formula: {cell:?}");
        }
        let col = |name: &str| header.iter().position(|h| h == name).unwrap_or(usize::MAX);
        let names: BTreeSet<&str> = rows[1..]
            .iter()
            .filter(|r| r[0] == "visit")
            .map(|r| r[col("facility_name")].as_str())
            .collect();
        for h in hostile_facilities {
            let shown = if h.starts_with(['=', '+', '-', '@', '＝']) {
                format!("'{h}")
            } else {
                h.to_owned()
            };
            assert!(
                names.contains(shown.as_str()),
                "{shown:?} not among {names:?}"
            );
        }
        let visits = rows.iter().filter(|r| r[0] == "visit").count();
        let contacts = rows.iter().filter(|r| r[0] == "contact").count();
        assert_eq!(visits, json_out["visits"].as_array().map_or(0, Vec::len));
        assert_eq!(
            contacts,
            json_out["contacts"].as_array().map_or(0, Vec::len)
        );
        assert_eq!(
            (visits, contacts),
            (hostile_facilities.len(), hostile_facilities.len())
        );
    }

    // The authority's side: opened paper names and remarks, as CSV.
    let export = ph.tmp.path().join("trace.json");
    std::fs::write(&export, json_out.to_string())?;
    let out = run_ok(
        "sync-hub",
        &[
            "paper",
            "open",
            "--format",
            "csv",
            "--identity",
            ph.authority_identity.to_str().unwrap_or_default(),
            export.to_str().unwrap_or_default(),
        ],
    )?;
    let rows = parse_csv(&out)?;
    assert_eq!(rows.len(), 1 + hostile_facilities.len());
    for cell in rows.iter().flatten() {
        assert!(!formula_start(cell), "a cell starts a formula: {cell:?}");
    }
    let name_col = rows[0]
        .iter()
        .position(|h| h == "name")
        .context("name column")?;
    let remarks_col = rows[0]
        .iter()
        .position(|h| h == "remarks")
        .context("remarks column")?;
    let names: BTreeSet<&str> = rows[1..].iter().map(|r| r[name_col].as_str()).collect();
    assert!(names.contains("'=cmd|' /C calc'!A0") && names.contains("\"Quoted\", Name"));
    let remarks: BTreeSet<&str> = rows[1..].iter().map(|r| r[remarks_col].as_str()).collect();
    assert!(remarks.contains("line one\nline two"), "{remarks:?}");
    assert!(remarks.contains("'\tlooks indented"), "{remarks:?}");

    // A wrong identity opens nothing and says so.
    let other = ph.tmp.path().join("other.txt");
    std::fs::write(&other, format!("{}\n", age_identity()))?;
    let o = run(
        "sync-hub",
        &[
            "paper",
            "open",
            "--identity",
            other.to_str().unwrap_or_default(),
            export.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not open"));
    assert!(!facilities.is_empty());
    Ok(())
}

fn age_identity() -> String {
    // A fresh identity the hub never saw (generated by `sync-hub init` in another folder).
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = tmp.path().join("h");
    let port = tests::fixture::free_udp_port().unwrap_or(0);
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            data.to_str().unwrap_or_default(),
            "init",
            "--region",
            "x",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--json",
        ],
    )
    .unwrap_or_default();
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let text = std::fs::read_to_string(v["authority_identity_file"].as_str().unwrap_or_default())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn editing_one_audit_entry_is_detected_and_named() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let d = ph.data_str();
    let now = tests::people::now();
    let pending = {
        let hub = ph.open()?;
        add_facility(
            &hub,
            registration("Tent", "karaoke", "mapo", "3 Road", None),
            now,
        )?
    };
    ph.credential("officer", Some("mapo"), "kim")?;
    run_ok(
        "sync-hub",
        &["--data", &d, "facility", "approve", pending.as_str()],
    )?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "trace",
            "--token",
            &"ab".repeat(16),
            "--case",
            "c-1",
            "--json",
        ],
    )?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "credential",
            "add",
            "--role",
            "authority",
            "--name",
            "kdca",
        ],
    )?;
    let listed: Vec<Value> = run_ok("sync-hub", &["--data", &d, "audit", "--json"])?
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect();
    let actions: Vec<&str> = listed.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(
        actions,
        [
            "credential.add",
            "facility.approve",
            "trace",
            "credential.add"
        ]
    );
    assert_eq!(listed[2]["case_id"], "c-1");
    assert_eq!(listed[2]["actor"]["id"], "local-operator");
    let ok = run_ok("sync-hub", &["--data", &d, "audit", "--verify"])?;
    assert!(ok.contains("verified: 4 entries"), "{ok}");

    // Someone with the database file rewrites who approved the facility.
    {
        let db = redb::Database::open(tests::people::db_path(&ph.data))?;
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(sync_hub::audit::AUDIT)?;
            let mut e: Value = serde_json::from_slice(t.get(1)?.context("entry 1")?.value())?;
            assert_eq!(e["action"], "facility.approve");
            e["actor"]["name"] = json!("someone else");
            t.insert(1, serde_json::to_vec(&e)?.as_slice())?;
        }
        txn.commit()?;
    }
    let out = run("sync-hub", &["--data", &d, "audit", "--verify"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tampering went unnoticed");
    assert!(err.contains("entry 1") && err.contains("edited"), "{err}");
    assert!(
        !err.contains("entry 0:") && !err.contains("entry 2:"),
        "{err}"
    );
    Ok(())
}

#[test]
fn local_government_duplicates_designations_and_compliance() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let (first, dup, branch, cinema, quiet, stale, event_hall, other) = {
        let hub = ph.open()?;
        let add = |name: &str, cat: &str, region: &str, addr: &str, at: u64| {
            add_facility(
                &hub,
                registration(name, cat, region, addr, Some(BUSINESS_NUMBER)),
                at,
            )
        };
        let first = add("Star", "karaoke", "mapo", "1 Wausan-ro", now - 5000)?;
        let dup = add(
            "Star (again)",
            "karaoke",
            "mapo",
            " 1  WAUSAN-RO ",
            now - 4000,
        )?;
        let branch = add("Star 2", "karaoke", "mapo", "1 Wausan-ro, 2F", now - 3000)?;
        let cinema = add("Cine", "cinema", "mapo", "9 Road", now)?;
        let quiet = add("Quiet PC", "pc_room", "mapo", "5 Road", now)?;
        let stale = add("Stale GX", "indoor_gx", "mapo", "6 Road", now)?;
        let event_hall = add("Hall", "wedding_hall", "mapo", "7 Road", now)?;
        let other = add("Far", "karaoke", "gangnam", "1 Far-ro", now)?;
        let mut visits = Vec::new();
        for f in [&first, &dup, &branch, &cinema, &quiet, &stale, &event_hall] {
            let d = add_device(&hub, f, now - 86_400)?;
            let last = if f == &stale {
                Some(now - 40 * 3600)
            } else if f == &quiet {
                None
            } else {
                Some(now - 600)
            };
            set_last_sync(&hub, &d, last)?;
            let at = if f == &stale {
                now - 41 * 3600
            } else {
                now - 3600
            };
            if f != &quiet {
                visits.push(qr(f, &d, at, [visits.len() as u8 + 1; 16]));
            }
        }
        store_visits(&hub, &ph.authority_recipient, &visits, 3, now)?;
        (first, dup, branch, cinema, quiet, stale, event_hall, other)
    };
    let kim = ph.credential("officer", Some("mapo"), "kim")?;
    let lee = ph.credential("officer", Some("gangnam"), "lee")?;
    let operator = ph.credential("operator", None, "ops")?;
    let (_hub, base) = ph.start()?;
    let api = Api::new(&base);

    let groups = expect(
        &api,
        "GET",
        "/api/facilities/duplicates",
        Some(&kim),
        None,
        200,
    )?
    .json();
    let ids: Vec<Vec<&str>> = groups
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            g.as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["facility_id"].as_str())
                .collect()
        })
        .collect();
    assert_eq!(
        ids,
        vec![vec![first.as_str(), dup.as_str()]],
        "the branch is no duplicate"
    );
    let none = expect(
        &api,
        "GET",
        "/api/facilities/duplicates",
        Some(&lee),
        None,
        200,
    )?
    .json();
    assert_eq!(none, json!([]));
    let removed = expect(
        &api,
        "POST",
        "/api/facilities/duplicates/remove",
        Some(&kim),
        None,
        200,
    )?
    .json();
    assert_eq!(removed["removed"], json!([dup.to_string()]));

    let compliance = |who: &str| -> Result<BTreeMap<String, Value>> {
        Ok(expect(
            &api,
            "GET",
            "/api/reports/compliance?hours=24",
            Some(who),
            None,
            200,
        )?
        .json()
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["facility_id"].as_str().unwrap_or_default().to_owned(),
                r.clone(),
            )
        })
        .collect())
    };
    // Defaults: the high-risk kinds (karaoke, PC room, GX); cinema and wedding hall are not.
    let c = compliance(&kim)?;
    let keys: BTreeSet<&str> = c.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            first.as_str(),
            branch.as_str(),
            quiet.as_str(),
            stale.as_str()
        ])
    );
    assert_eq!(c[first.as_str()]["compliant"], true);
    assert_eq!(
        (
            &c[quiet.as_str()]["no_visits"],
            &c[quiet.as_str()]["no_sync"]
        ),
        (&json!(true), &json!(true))
    );
    assert_eq!(c[quiet.as_str()]["last_sync"], Value::Null);
    assert_eq!(
        (
            &c[stale.as_str()]["no_visits"],
            &c[stale.as_str()]["no_sync"]
        ),
        (&json!(true), &json!(true))
    );
    assert_eq!(c[stale.as_str()]["last_sync"], json!(now - 40 * 3600));
    assert_eq!(c[stale.as_str()]["last_visit"], json!(now - 41 * 3600));
    // Over 48 hours the stale one kept its log.
    let c48 = expect(
        &api,
        "GET",
        "/api/reports/compliance?hours=48",
        Some(&kim),
        None,
        200,
    )?
    .json();
    assert!(
        c48.as_array()
            .into_iter()
            .flatten()
            .any(|r| r["facility_id"] == stale.as_str() && r["compliant"] == true)
    );
    expect(
        &api,
        "GET",
        "/api/reports/compliance?hours=0",
        Some(&kim),
        None,
        400,
    )?;
    expect(
        &api,
        "GET",
        "/api/reports/compliance?hours=abc",
        Some(&kim),
        None,
        400,
    )?;

    // Designations: a category, a facility, a dated one-off event.
    let designate = |body: Value, status: u16| {
        expect(
            &api,
            "POST",
            "/api/designations",
            Some(&kim),
            Some(&body.to_string()),
            status,
        )
    };
    designate(
        json!({"target": {"kind": "category", "category": "cinema"}}),
        200,
    )?;
    designate(
        json!({"target": {"kind": "category", "category": "no_such"}}),
        400,
    )?;
    designate(
        json!({"target": {"kind": "event", "facility_id": event_hall.as_str(), "name": "Wedding fair",
        "from": now - 3600, "to": now + 3600}}),
        200,
    )?;
    designate(
        json!({"target": {"kind": "event", "facility_id": event_hall.as_str(), "name": "Too long",
        "from": now, "to": now + 30 * 86_400}}),
        400,
    )?;
    designate(
        json!({"target": {"kind": "facility", "facility_id": other.as_str()}}),
        403,
    )?;
    let c = compliance(&kim)?;
    assert!(c.contains_key(cinema.as_str()) && c.contains_key(event_hall.as_str()));
    assert!(
        c[event_hall.as_str()]["mandatory_because"]
            .as_str()
            .is_some_and(|m| m.contains("Wedding fair"))
    );
    assert!(!c.contains_key(other.as_str()));
    // The operator sees every region's report; the other region's officer none of Mapo's.
    assert!(compliance(&operator)?.contains_key(other.as_str()));
    assert!(!compliance(&lee)?.contains_key(first.as_str()));
    let listed = expect(&api, "GET", "/api/designations", Some(&lee), None, 200)?.json();
    assert_eq!(listed, json!([]));
    Ok(())
}

/// Runs `sync-hub --data D args...` and parses each stdout line as JSON.
fn cli_json(d: &str, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["--data", d];
    all.extend(args);
    run_ok("sync-hub", &all)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

#[test]
fn the_command_line_administers_locally_and_through_the_running_hub() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let d = ph.data_str();
    let now = tests::people::now();
    let (first, dup) = {
        let hub = ph.open()?;
        let reg = |n: &str, addr: &str, b: Option<&str>| registration(n, "cinema", "mapo", addr, b);
        let first = add_facility(&hub, reg("Cine", "9 Road", Some(BUSINESS_NUMBER)), now - 10)?;
        let dup = add_facility(
            &hub,
            reg("Cine again", "9  road", Some(BUSINESS_NUMBER)),
            now,
        )?;
        add_facility(&hub, reg("Pop-up", "10 Road", None), now)?;
        let dev = add_device(&hub, &first, now)?;
        set_last_sync(&hub, &dev, Some(now - 60))?;
        (first, dup)
    };
    // Locally (no hub running).
    let pending = cli_json(&d, &["facility", "pending", "--json"])?;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["name"], "Pop-up");
    let groups = cli_json(&d, &["facility", "duplicates", "--json"])?;
    assert_eq!(groups[0]["groups"][0].as_array().map(Vec::len), Some(2));
    assert_eq!(groups[0]["removed"], json!([]));
    let none = cli_json(&d, &["compliance", "--json"])?;
    assert!(
        none.is_empty(),
        "cinemas are not mandatory by default: {none:?}"
    );
    let des = cli_json(
        &d,
        &["designation", "add", "--category", "cinema", "--json"],
    )?;
    assert_eq!(des[0]["region"], "mapo");
    let rows = cli_json(&d, &["compliance", "--hours", "24", "--json"])?;
    let ids: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r["facility_id"].as_str())
        .collect();
    assert_eq!(ids, BTreeSet::from([first.as_str(), dup.as_str()]));
    let bad = run("sync-hub", &["--data", &d, "compliance", "--hours", "0"])?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--hours must be"));
    let bad = run(
        "sync-hub",
        &[
            "--data",
            &d,
            "credential",
            "add",
            "--role",
            "officer",
            "--name",
            "x",
        ],
    )?;
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--region"),
        "an officer needs a region"
    );
    let bad = run(
        "sync-hub",
        &[
            "--data",
            &d,
            "credential",
            "add",
            "--role",
            "mayor",
            "--name",
            "x",
        ],
    )?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role"));
    let bad = run(
        "sync-hub",
        &[
            "--data",
            &d,
            "trace",
            "--token",
            &"00".repeat(16),
            "--from",
            "0",
            "--to",
            &now.to_string(),
        ],
    )?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("retention period"));

    // The same commands while `run` holds the store go through its API as the local operator.
    let (_hub, _base) = ph.start()?;
    let removed = cli_json(&d, &["facility", "duplicates", "--remove", "--json"])?;
    assert_eq!(removed[0]["removed"], json!([dup.to_string()]));
    let listed = cli_json(&d, &["designation", "list", "--json"])?;
    assert_eq!(listed.len(), 1);
    let id = listed[0]["id"]
        .as_str()
        .context("designation id")?
        .to_owned();
    cli_json(&d, &["designation", "remove", &id, "--json"])?;
    assert!(cli_json(&d, &["designation", "list", "--json"])?.is_empty());
    let cred = cli_json(
        &d,
        &[
            "credential",
            "add",
            "--role",
            "authority",
            "--name",
            "kdca",
            "--json",
        ],
    )?;
    let secret = cred[0]["secret"].as_str().context("secret")?.to_owned();
    let creds = run_ok("sync-hub", &["--data", &d, "credential", "list", "--json"])?;
    assert!(
        creds.contains("kdca") && !creds.contains(&secret[20..]),
        "list must not show secrets"
    );
    let report = cli_json(&d, &["report", "shared-codes", "--json"])?;
    assert_eq!(report[0]["shared_codes"], json!([]));
    let csv = run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "trace",
            "--token",
            &"00".repeat(16),
            "--format",
            "csv",
        ],
    )?;
    assert!(csv.starts_with("kind,case_id,token"), "{csv}");
    let audit = cli_json(&d, &["audit", "--verify", "--json"])?;
    let actions: Vec<&str> = audit.iter().filter_map(|e| e["action"].as_str()).collect();
    for a in [
        "designation.add",
        "facility.remove",
        "designation.remove",
        "credential.add",
        "report.shared_codes",
        "trace",
    ] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    assert_eq!(
        audit.last().map(|v| &v["verification"]["ok"]),
        Some(&json!(true))
    );
    Ok(())
}
