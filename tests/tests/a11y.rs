//! Every visitor: the kiosk page and the hub's dashboard under an automated accessibility
//! audit, and the kiosk's language, display modes, live region, speech and keyboard use, in
//! headless Chromium through a real `edge-node run --http` and `sync-hub`.
//!
//! The audit is axe-core (`tests/a11y/package.json`, installed by `npm ci --prefix tests/a11y`;
//! `.ci/run` does it), injected into the page through WebDriver; a page passes when axe finds
//! no violation of impact "serious" or "critical". Each page is audited in each state a
//! person meets it in: the kiosk idle, after a verdict, in the large-text and high-contrast
//! modes, with the staff PIN dialog and the paper-log form open; the dashboard before and
//! after signing in, in Korean and English. Screenshots land in `target/test-artifacts/`.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::browser::Browser;
use tests::fixture::{self, HubFixture, Proc, wait_until};
use tests::frames::{Damage, encode_png, frame};

const WAIT: Duration = Duration::from_secs(20);
/// The WebDriver key code of Tab and Escape.
const TAB: &str = "\u{E004}";
const ESCAPE: &str = "\u{E00C}";

/// axe-core's browser build, as `npm ci` in `tests/a11y` installs it.
fn axe_source() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("a11y/node_modules/axe-core/axe.min.js");
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: the accessibility audit needs axe-core; run \
             `npm ci --prefix tests/a11y` (`.ci/run` does this)",
            path.display()
        )
    })
}

/// Runs axe over the whole page; returns its serious and critical violations, one line each,
/// and the number of rules the page passed (an audit that checked nothing proves nothing).
fn audit(b: &Browser, axe: &str) -> Result<(Vec<String>, u64)> {
    let loaded = b.execute(
        &format!("{axe}\n;return typeof window.axe === 'object';"),
        &[],
    )?;
    if loaded != json!(true) {
        bail!("axe-core did not load into the page");
    }
    // WebDriver waits for the promise a script returns.
    let r = b.execute(
        "return axe.run(document, { resultTypes: ['violations'] }).then(r => ({
            passes: r.passes.length,
            minor: r.violations
              .filter(v => v.impact !== 'serious' && v.impact !== 'critical')
              .map(v => v.impact + ' ' + v.id),
            bad: r.violations
              .filter(v => v.impact === 'serious' || v.impact === 'critical')
              .map(v => v.impact + ' ' + v.id + ': ' + v.help + ' at '
                + v.nodes.slice(0, 4).map(n => n.target.join(' ')).join(', ')),
        }));",
        &[],
    )?;
    let bad = r["bad"]
        .as_array()
        .context("axe answered without a violation list")?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect();
    // Moderate and minor findings do not fail the audit; the log shows them.
    eprintln!("axe-core, moderate and minor: {}", r["minor"]);
    Ok((bad, r["passes"].as_u64().unwrap_or(0)))
}

/// Audits the page in its current state: no serious or critical violation, and real checks ran.
fn assert_accessible(b: &Browser, axe: &str, state: &str) -> Result<()> {
    let (bad, passes) = audit(b, axe)?;
    b.screenshot(&format!("a11y-{state}"))?;
    if !bad.is_empty() {
        bail!("{state}: axe-core found\n{}", bad.join("\n"));
    }
    if passes < 10 {
        bail!("{state}: axe-core passed only {passes} rules; did it see the page?");
    }
    Ok(())
}

#[test]
fn the_audit_finds_what_is_wrong_in_a_page_that_is() -> Result<()> {
    let axe = axe_source()?;
    let b = Browser::start(&[])?;
    b.goto(
        "data:text/html,<html><body><main><button></button><input type=text>\
         <p style='color:%23777;background:%23888'>faint</p></main></body></html>",
    )?;
    let (bad, _) = audit(&b, &axe)?;
    let all = bad.join("\n");
    for rule in ["button-name", "label", "color-contrast", "html-has-lang"] {
        if !all.contains(rule) {
            bail!("the audit missed {rule} in a page made to fail it:\n{all}");
        }
    }
    Ok(())
}

/// A running device serving the kiosk on a loopback port.
struct Kiosk {
    _proc: Proc,
    base: String,
}

/// A device enrolled at `hub`, with staff PIN 482916, serving the kiosk.
fn kiosk_with_pin(hub: &HubFixture) -> Result<Kiosk> {
    let dev = hub.enroll_device("entrance")?;
    fixture::set_pin_from_stdin(&dev, "482916")?;
    let (proc, http) = fixture::run_with_http(&dev, &[])?;
    let base = format!("http://{http}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    if !wait_until(Duration::from_secs(30), || {
        agent
            .get(&format!("{base}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }) {
        bail!("the device's HTTP server did not answer within 30 s");
    }
    Ok(Kiosk { _proc: proc, base })
}

/// A PNG photo of a fresh check-in code, as a visitor's phone shows it.
fn code_photo(dir: &Path) -> Result<PathBuf> {
    let payload = fixture::issuer().issue(fixture::now(), 60, fixture::random_token());
    let path = dir.join("code.png");
    std::fs::write(&path, encode_png(&frame(&payload, Damage::Clean, 3)?)?)?;
    Ok(path)
}

/// Hands the page a photo through its "Take a photo" input, as the file picker would.
fn take_photo(b: &Browser, photo: &Path) -> Result<()> {
    b.send_keys(&b.find("#photo")?, &photo.display().to_string())
}

fn js(b: &Browser, script: &str) -> Result<Value> {
    b.execute(script, &[])
}

fn wait_js(b: &Browser, what: &str, script: &str, want: Value) -> Result<()> {
    b.wait_for(what, WAIT, |b| Ok((js(b, script)? == want).then_some(())))
}

/// The id of the element that has the keyboard focus.
fn focused(b: &Browser) -> Result<String> {
    Ok(js(
        b,
        "return document.activeElement ? document.activeElement.id : '';",
    )?
    .as_str()
    .unwrap_or_default()
    .to_owned())
}

/// Presses Tab in the focused element `n` times; the ids focus visits, in order.
fn tab_through(b: &Browser, n: usize) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let id = focused(b)?;
        b.send_keys(&b.find(&format!("#{id}"))?, TAB)?;
        seen.push(focused(b)?);
    }
    Ok(seen)
}

#[test]
fn the_kiosk_is_accessible_speaks_the_chosen_language_and_remembers_it() -> Result<()> {
    let axe = axe_source()?;
    let hub = HubFixture::new()?;
    let kiosk = kiosk_with_pin(&hub)?;
    let tmp = tempfile::tempdir()?;
    // A camera that works but sees no code: the page stays idle until a photo is taken.
    let b = Browser::start(&[
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
    ])?;
    b.goto(&format!("{}/", kiosk.base))?;
    wait_js(
        &b,
        "the page to start",
        "return document.body.dataset.verdict;",
        json!("idle"),
    )?;
    assert_accessible(&b, &axe, "kiosk-idle")?;

    // Every control is reached by Tab, in reading order, and Tab leaves the last one.
    b.execute("document.getElementById('lang-ko').focus();", &[])?;
    let order = tab_through(&b, 8)?;
    assert_eq!(
        order,
        [
            "lang-en",
            "lang-zh",
            "large-text",
            "high-contrast",
            "cam-back",
            "cam-front",
            "photo-button",
            "staff-open"
        ],
        "focus order"
    );
    let after = tab_through(&b, 1)?;
    assert_ne!(after, ["staff-open"], "Tab is trapped on the last control");

    // A verdict: shown, and handed to screen readers once, in the chosen language (Korean).
    let photo = code_photo(tmp.path())?;
    take_photo(&b, &photo)?;
    wait_js(
        &b,
        "the accepted verdict",
        "return document.body.dataset.verdict;",
        json!("accepted"),
    )?;
    wait_js(
        &b,
        "the live region to announce the verdict",
        "const l = document.getElementById('verdict-live');
         return [l.textContent, l.lang, l.getAttribute('aria-live')];",
        json!(["인증되었습니다", "ko-KR", "assertive"]),
    )?;
    assert_eq!(b.text(&b.find("#verdict-en")?)?, "Verified");
    assert_eq!(b.text(&b.find("#verdict-zh")?)?, "验证成功");
    assert_accessible(&b, &axe, "kiosk-accepted")?;

    // Chinese, large text and high contrast, chosen on screen: by keyboard, as a screen
    // reader user would.
    for id in ["lang-zh", "large-text", "high-contrast"] {
        b.send_keys(&b.find(&format!("#{id}"))?, "\u{E007}")?; // Enter
    }
    let pressed = "return ['lang-ko', 'lang-zh', 'large-text', 'high-contrast']
        .map(id => document.getElementById(id).getAttribute('aria-pressed'));";
    wait_js(
        &b,
        "the choices to take",
        pressed,
        json!(["false", "true", "true", "true"]),
    )?;
    assert_accessible(&b, &axe, "kiosk-accepted-zh-large-contrast")?;

    // After a reload (the tablet restarted), the choices are still there.
    b.refresh()?;
    wait_js(
        &b,
        "the page to start again",
        "return document.body.dataset.verdict;",
        json!("idle"),
    )?;
    assert_eq!(
        js(&b, pressed)?,
        json!(["false", "true", "true", "true"]),
        "the choices did not survive a reload"
    );
    assert_eq!(
        js(
            &b,
            "return [document.documentElement.className,
                     document.querySelector('.verdict-line.primary').id,
                     localStorage.getItem('kiosk-lang')];"
        )?,
        json!(["large-text high-contrast", "verdict-zh", "zh"])
    );
    assert_eq!(b.text(&b.find("#verdict-zh")?)?, "请将签到二维码对准摄像头");
    assert_accessible(&b, &axe, "kiosk-idle-zh-large-contrast")?;

    // The same code again: announced and spoken in Chinese. Headless Chromium has no voices;
    // a stand-in voice records what the page says.
    js(
        &b,
        "window.__spoken = [];
         speechSynthesis.getVoices = () => [{ lang: 'zh-CN', name: 'stand-in' }];
         speechSynthesis.speak = (u) => window.__spoken.push([u.text, u.lang]);
         speechSynthesis.cancel = () => {};",
    )?;
    take_photo(&b, &photo)?;
    wait_js(
        &b,
        "the live region to announce the duplicate in Chinese",
        "const l = document.getElementById('verdict-live'); return [l.textContent, l.lang];",
        json!(["您已签到", "zh-CN"]),
    )?;
    assert_eq!(
        js(
            &b,
            "return [window.__spoken, document.body.dataset.feedback];"
        )?,
        json!([[["您已签到", "zh-CN"]], "refusal-speech"])
    );
    assert_eq!(b.text(&b.find("#verdict-ko")?)?, "이미 체크인되었습니다");
    assert_accessible(&b, &axe, "kiosk-duplicate-zh-large-contrast")?;

    // Staff mode: the PIN dialog holds the keyboard until Escape, which gives focus back.
    b.click(&b.find("#staff-open")?)?;
    wait_js(
        &b,
        "the PIN field to have focus",
        "return document.activeElement.id;",
        json!("pin"),
    )?;
    assert_eq!(
        js(&b, "return document.querySelector('main').inert;")?,
        json!(true),
        "the page behind the dialog can still be reached"
    );
    assert_accessible(&b, &axe, "kiosk-staff-pin")?;
    b.send_keys(&b.find("#pin")?, ESCAPE)?;
    wait_js(
        &b,
        "Escape to close the dialog",
        "return [document.getElementById('staff').hidden, document.activeElement.id,
                 document.querySelector('main').inert];",
        json!([true, "staff-open", false]),
    )?;

    // The paper-log form, in both modes and without them.
    b.click(&b.find("#staff-open")?)?;
    b.send_keys(&b.find("#pin")?, "482916")?;
    b.click(&b.find("#pin-submit")?)?;
    b.wait_for("the paper-log form", WAIT, |b| {
        b.is_displayed(&b.find("#paper-form")?)
            .map(|shown| shown.then_some(()))
    })?;
    assert_accessible(&b, &axe, "kiosk-paper-large-contrast")?;
    js(
        &b,
        "document.getElementById('large-text').click(); document.getElementById('high-contrast').click();",
    )?;
    assert_eq!(
        js(&b, "return document.documentElement.className;")?,
        json!("")
    );
    assert_accessible(&b, &axe, "kiosk-paper")?;
    Ok(())
}

#[test]
fn the_dashboard_is_accessible_before_and_after_signing_in() -> Result<()> {
    use tests::people::{PeopleHub, add_device, add_facility, registration, set_last_sync};
    let axe = axe_source()?;
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let bn = Some(fixture::BUSINESS_NUMBER);
    {
        let hub = ph.open()?;
        let busy = add_facility(
            &hub,
            registration("스타 노래연습장", "karaoke", "mapo", "1 Wausan-ro", bn),
            now,
        )?;
        let d = add_device(&hub, &busy, now)?;
        set_last_sync(&hub, &d, Some(now - 3 * 86_400))?;
        add_facility(
            &hub,
            registration("Quiet GX", "indoor_gx", "mapo", "3 Road", bn),
            now,
        )?;
        add_facility(
            &hub,
            registration("새 포차 (임시)", "hunting_pocha", "mapo", "4 Road", None),
            now,
        )?;
    }
    let kim = ph.credential("officer", Some("mapo"), "김 주무관")?;
    let (_hub, base) = ph.start()?;
    let b = Browser::start(&[])?;
    b.goto(&format!("{base}/"))?;
    b.wait_for_text("h1", "전자출입명부", WAIT)?;
    assert_accessible(&b, &axe, "dashboard-login")?;

    b.send_keys(&b.find("#credential")?, &kim)?;
    b.click(&b.find("#login")?)?;
    b.wait_for("three facilities listed", WAIT, |b| {
        Ok((b.find_all("#facilities tbody tr")?.len() == 3).then_some(()))
    })?;
    b.wait_for("the pending facility", WAIT, |b| {
        Ok((!b.find_all("button.approve")?.is_empty()).then_some(()))
    })?;
    assert_accessible(&b, &axe, "dashboard-officer")?;

    b.click(&b.find("#lang")?)?;
    b.wait_for_text("h1", "Visitor log regional hub", WAIT)?;
    assert_accessible(&b, &axe, "dashboard-officer-en")?;
    b.set_window_size(390, 844)?;
    assert_accessible(&b, &axe, "dashboard-officer-en-phone")?;
    Ok(())
}
