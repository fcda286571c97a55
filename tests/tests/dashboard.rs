//! The hub's dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`): it loads in Korean, refuses a wrong credential, lists the officer's
//! facilities with their sync and compliance state, an officer approves a pending facility
//! with a click (and the hub's registry and audit log say so), English is one click away, and
//! the page fits a phone's screen. Screenshots are kept in `target/test-artifacts/`.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::time::Duration;
use tests::browser::Browser;
use tests::people::{
    Api, PeopleHub, Visit, add_device, add_facility, registration, set_last_sync, store_visits,
};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn an_officer_approves_a_pending_facility_in_headless_chromium() -> Result<()> {
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let bn = Some(tests::fixture::BUSINESS_NUMBER);
    let (busy, quiet, pending, elsewhere) = {
        let hub = ph.open()?;
        let busy = add_facility(
            &hub,
            registration("스타 노래연습장", "karaoke", "mapo", "1 Wausan-ro", bn),
            now,
        )?;
        let stale = add_facility(
            &hub,
            registration("Stale PC", "pc_room", "mapo", "2 Road", bn),
            now,
        )?;
        let quiet = add_facility(
            &hub,
            registration("Quiet GX", "indoor_gx", "mapo", "3 Road", bn),
            now,
        )?;
        let pending = add_facility(
            &hub,
            registration("새 포차 (임시)", "hunting_pocha", "mapo", "4 Road", None),
            now,
        )?;
        let elsewhere = add_facility(
            &hub,
            registration("Gangnam Club", "nightclub", "gangnam", "5 Road", bn),
            now,
        )?;
        let d_busy = add_device(&hub, &busy, now)?;
        set_last_sync(&hub, &d_busy, Some(now - 120))?;
        let d_stale = add_device(&hub, &stale, now)?;
        set_last_sync(&hub, &d_stale, Some(now - 3 * 86_400))?;
        add_device(&hub, &quiet, now)?;
        let visits: Vec<Visit> = (0..5u8)
            .map(|i| Visit {
                facility: busy.clone(),
                device: d_busy.clone(),
                at: now - 3600 + u64::from(i) * 60,
                token: Some([i + 1; 16]),
                paper_name: None,
                paper_remarks: String::new(),
            })
            .collect();
        store_visits(&hub, &ph.authority_recipient, &visits, 2, now)?;
        (busy, quiet, pending, elsewhere)
    };
    let kim = ph.credential("officer", Some("mapo"), "김 주무관")?;
    let (_hub, base) = ph.start()?;
    let api = Api::new(&base);

    let browser = Browser::start(&[])?;
    browser.goto(&format!("{base}/"))?;
    browser.wait_for_text("h1", "전자출입명부", WAIT)?;

    // A wrong credential is refused and shows nothing.
    let input = browser.find("#credential")?;
    browser.send_keys(&input, "kph1.cred_0000000000000000.00")?;
    browser.click(&browser.find("#login")?)?;
    browser.wait_for_text("#status", "자격 증명이 올바르지 않습니다", WAIT)?;
    if browser.is_displayed(&browser.find("#facilities-section")?)? {
        bail!("the facilities are shown to a wrong credential");
    }

    // The officer signs in: their region's facilities, with state, sync and compliance.
    let input = browser.find("#credential")?;
    browser.clear(&input)?;
    browser.send_keys(&input, &kim)?;
    browser.click(&browser.find("#login")?)?;
    let rows = browser.wait_for("four facilities listed", WAIT, |b| {
        let rows = b.find_all("#facilities tbody tr")?;
        Ok((rows.len() == 4).then_some(rows))
    })?;
    let mut texts = Vec::new();
    for r in &rows {
        texts.push(browser.text(r)?);
    }
    let all = texts.join("\n");
    for needle in [
        "스타 노래연습장",
        "Stale PC",
        "Quiet GX",
        "새 포차 (임시)",
        "대기",
        "이행",
        "동기화 없음",
    ] {
        if !all.contains(needle) {
            bail!("the facility table lacks {needle:?}:\n{all}");
        }
    }
    if all.contains("Gangnam Club") {
        bail!("another region's facility is shown to this officer");
    }
    let busy_row = browser.find(&format!("#facilities tr[data-facility-id=\"{busy}\"]"))?;
    let busy_text = browser.text(&busy_row)?;
    if !busy_text.contains("분 전") || !busy_text.contains('5') {
        bail!("the busy facility's last sync or records are missing: {busy_text}");
    }
    let quiet_text =
        browser.text(&browser.find(&format!("#facilities tr[data-facility-id=\"{quiet}\"]"))?)?;
    if !quiet_text.contains("미동기화 장치") {
        bail!("the never-synced device is not shown: {quiet_text}");
    }
    let storage = browser.execute(
        "return [sessionStorage.getItem('kipass-credential') !== null, localStorage.getItem('kipass-credential')];",
        &[],
    )?;
    if storage != serde_json::json!([true, null]) {
        bail!("the credential should live in sessionStorage only: {storage}");
    }
    let before = browser.screenshot("dashboard-officer-before-approval")?;

    // Approve with a click.
    let button = browser.find(&format!("button.approve[data-id=\"{pending}\"]"))?;
    browser.click(&button)?;
    browser.wait_for_text("#status", "승인했습니다", WAIT)?;
    browser.wait_for("the pending list to empty", WAIT, |b| {
        Ok(b.find_all("button.approve")?.is_empty().then_some(()))
    })?;
    browser.wait_for_text(
        &format!("#facilities tr[data-facility-id=\"{pending}\"]"),
        "승인됨",
        WAIT,
    )?;
    browser.wait_for_text("#audit", "facility.approve", WAIT)?;
    let after = browser.screenshot("dashboard-officer-after-approval")?;

    // The hub agrees: nothing pending, and the audit log names the officer.
    let left = api
        .call("GET", "/api/facilities/pending", Some(&kim), None)?
        .json();
    if left != serde_json::json!([]) {
        bail!("the hub still has pending facilities: {left}");
    }
    let audit = api.call("GET", "/api/audit", Some(&kim), None)?.json();
    let approval = audit
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["action"] == "facility.approve")
        .context("no approval in the audit log")?;
    if approval["actor"]["name"] != "김 주무관"
        || approval["facilities"] != serde_json::json!([pending.to_string()])
    {
        bail!("the approval is audited wrongly: {approval}");
    }

    // English, and a phone's screen without sideways scrolling.
    browser.click(&browser.find("#lang")?)?;
    browser.wait_for_text("h1", "Visitor log regional hub", WAIT)?;
    browser.wait_for_text("#facilities", "Last sync", WAIT)?;
    browser.set_window_size(390, 844)?;
    let fits = browser.wait_for("the page to fit a phone's width", WAIT, |b| {
        let v = b.execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            &[],
        )?;
        let (sw, iw) = (
            v[0].as_u64().unwrap_or(u64::MAX),
            v[1].as_u64().unwrap_or(0),
        );
        Ok((iw > 0 && iw <= 500 && sw <= iw).then_some((sw, iw)))
    })?;
    let phone = browser.screenshot("dashboard-officer-phone-en")?;

    // Everything the page loaded came from the hub itself.
    let loaded: Value = browser.execute(
        "return performance.getEntriesByType('resource').map(e => e.name);",
        &[],
    )?;
    for url in loaded.as_array().into_iter().flatten() {
        let u = url.as_str().unwrap_or_default();
        if !u.starts_with(&base) {
            bail!("the page loaded {u} from outside the hub");
        }
    }
    for shot in [&before, &after, &phone] {
        let bytes = std::fs::read(shot)?;
        if bytes.len() < 1000 || !bytes.starts_with(b"\x89PNG") {
            bail!("{} is not a screenshot", shot.display());
        }
    }
    eprintln!(
        "screenshots: {}, {}, {} (phone {}x{})",
        before.display(),
        after.display(),
        phone.display(),
        fits.1,
        844
    );
    let _ = elsewhere;
    Ok(())
}
