//! A small WebDriver client for end-to-end tests in a real browser: headless Chromium driven
//! by Debian's `chromedriver` over plain HTTP on loopback.
//!
//! [`Browser::start`] spawns `chromedriver` on a free loopback port (reaped on drop through
//! [`Proc`]), waits a bounded time for its `/status` to say ready, and opens one session with
//! a throw-away profile. Dropping the [`Browser`] deletes the session (which quits Chromium),
//! then kills the driver. Every wait is bounded. Screenshots go to [`artifacts_dir`]
//! (`target/test-artifacts/`) so they survive the test.
//!
//! Chromium and the driver are not optional: a test that needs a browser fails with a message
//! saying how to install them, it never passes silently.

use crate::fixture::Proc;
use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs Chromium (`KIPASS_CHROMIUM` overrides).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Where Debian installs the driver (`KIPASS_CHROMEDRIVER` overrides).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long the driver may take to say it is ready.
const DRIVER_READY: Duration = Duration::from_secs(30);
/// The longest any one WebDriver command may take (session creation starts Chromium).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`Browser::wait_for`] polls.
const POLL: Duration = Duration::from_millis(100);
/// The W3C key under which an element reference travels.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The arguments every session gets: headless, no sandbox (containers), and nothing that
/// would reach the internet.
pub const BASE_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1024,768",
];

fn path_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// The folder for test artifacts (screenshots): `target/test-artifacts/`, created.
pub fn artifacts_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // Tests and benches run from target/<profile>/deps/; the target folder is two up.
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent())
        .and_then(|profile| profile.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A TCP port free on loopback right now.
fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An element found in the page (a W3C element reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// One headless Chromium session behind its own chromedriver.
pub struct Browser {
    agent: ureq::Agent,
    base: String,
    session: String,
    // Field order matters only for clarity: `Drop` deletes the session first, then these
    // drop, killing the driver and removing the profile.
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with [`BASE_ARGS`] plus `extra`
    /// (e.g. the fake-camera switches).
    pub fn start(extra: &[&str]) -> Result<Browser> {
        let chromium = path_from_env("KIPASS_CHROMIUM", CHROMIUM);
        let driver = path_from_env("KIPASS_CHROMEDRIVER", CHROMEDRIVER);
        for (what, p) in [("chromium", &chromium), ("chromedriver", &driver)] {
            if !p.is_file() {
                bail!(
                    "{what} not found at {}: this test needs a real browser; install it with \
                     `sudo apt-get install chromium chromium-driver` (`.ci/run` does this), \
                     or point KIPASS_CHROMIUM / KIPASS_CHROMEDRIVER at the binaries",
                    p.display()
                );
            }
        }
        let port = free_tcp_port()?;
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", driver.display()))?;
        let driver_proc = Proc(child);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(COMMAND_TIMEOUT))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + DRIVER_READY;
        loop {
            let ready = agent
                .get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"].as_bool() == Some(true));
            if ready {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "chromedriver on port {port} was not ready within {} s",
                    DRIVER_READY.as_secs()
                );
            }
            std::thread::sleep(POLL);
        }
        let profile = tempfile::tempdir().context("cannot create a browser profile folder")?;
        let mut args: Vec<String> = BASE_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": args,
                    }
                }
            }
        });
        let v = send(&agent, "POST", &format!("{base}/session"), Some(&caps))
            .context("cannot open a Chromium session")?;
        let session = v["sessionId"]
            .as_str()
            .context("chromedriver answered a new session without a session id")?
            .to_owned();
        Ok(Browser {
            agent,
            base,
            session,
            _driver: driver_proc,
            _profile: profile,
        })
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        send(&self.agent, method, &url, body).with_context(|| format!("webdriver {method} {path}"))
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// Reloads the page.
    pub fn refresh(&self) -> Result<()> {
        self.cmd("POST", "/refresh", Some(&json!({})))?;
        Ok(())
    }

    /// The first element matching a CSS selector (an error when there is none).
    pub fn find(&self, css: &str) -> Result<Element> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        element_of(&v).with_context(|| format!("element {css}"))
    }

    /// Every element matching a CSS selector (possibly none).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        v.as_array()
            .context("chromedriver answered find elements without a list")?
            .iter()
            .map(element_of)
            .collect()
    }

    /// Clicks an element.
    pub fn click(&self, el: &Element) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/click", el.0),
            Some(&json!({})),
        )?;
        Ok(())
    }

    /// Types `text` into an element.
    pub fn send_keys(&self, el: &Element, text: &str) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(&json!({ "text": text })),
        )?;
        Ok(())
    }

    /// Empties an input.
    pub fn clear(&self, el: &Element) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/clear", el.0),
            Some(&json!({})),
        )?;
        Ok(())
    }

    /// An element's rendered text (empty when it is hidden).
    pub fn text(&self, el: &Element) -> Result<String> {
        let v = self.cmd("GET", &format!("/element/{}/text", el.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Whether an element is displayed.
    pub fn is_displayed(&self, el: &Element) -> Result<bool> {
        let v = self.cmd("GET", &format!("/element/{}/displayed", el.0), None)?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// A DOM property of an element (`value`, `checked`, ...).
    pub fn property(&self, el: &Element, name: &str) -> Result<Value> {
        self.cmd("GET", &format!("/element/{}/property/{name}", el.0), None)
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn execute(&self, script: &str, args: &[Value]) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Polls `f` every 100 ms until it gives `Some`, for at most `timeout`. Errors from `f`
    /// count as "not yet" (the page may be mid-render) and the last one is reported on
    /// timeout, with `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Browser) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err: Option<anyhow::Error> = None;
        loop {
            match f(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                match last_err {
                    Some(e) => bail!(
                        "timed out after {} s waiting for {what}; last error: {e:#}",
                        timeout.as_secs_f32()
                    ),
                    None => bail!(
                        "timed out after {} s waiting for {what}",
                        timeout.as_secs_f32()
                    ),
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the element matching `css` shows text containing `needle`; returns it.
    pub fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for(&format!("{css} to contain {needle:?}"), timeout, |b| {
            let t = b.text(&b.find(css)?)?;
            Ok(t.contains(needle).then_some(t))
        })
    }

    /// Resizes the window, e.g. to a phone's screen.
    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )?;
        Ok(())
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot_png(&self) -> Result<Vec<u8>> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let b64 = v
            .as_str()
            .context("chromedriver answered a screenshot without data")?;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("chromedriver sent a screenshot that is not base64")
    }

    /// Saves a screenshot as `target/test-artifacts/<name>.png`; returns the path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = artifacts_dir()?.join(format!("{safe}.png"));
        std::fs::write(&path, self.screenshot_png()?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Quits Chromium; the driver is killed and reaped after this, when `_driver` drops.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = send(&self.agent, "DELETE", &url, None);
    }
}

fn element_of(v: &Value) -> Result<Element> {
    v[ELEMENT_KEY]
        .as_str()
        .map(|id| Element(id.to_owned()))
        .context("chromedriver answered without an element reference")
}

/// One WebDriver request; returns the answer's `value`, or the driver's error as an error.
fn send(agent: &ureq::Agent, method: &str, url: &str, body: Option<&Value>) -> Result<Value> {
    let resp = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        ("POST", Some(b)) => agent.post(url).send_json(b),
        ("POST", None) => agent.post(url).send_json(json!({})),
        _ => bail!("unsupported WebDriver method {method}"),
    };
    let mut resp = resp.with_context(|| format!("chromedriver did not answer {url}"))?;
    let status = resp.status();
    let v: Value = resp
        .body_mut()
        .read_json()
        .with_context(|| format!("chromedriver answered {status} without JSON"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if !status.is_success() {
        let error = value["error"].as_str().unwrap_or("unknown error");
        // The message carries a stack trace after the first line; the first line says it.
        let message = value["message"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default();
        bail!("{error}: {message}");
    }
    Ok(value)
}

/// Writes a Y4M video (4:2:0, what Chromium's `--use-file-for-fake-video-capture` reads and
/// loops) of luma `frames` at `fps`; colour planes are neutral grey. Every frame must have
/// the size of the first, with even sides.
pub fn write_y4m(path: &Path, frames: &[image::GrayImage], fps: u32) -> Result<()> {
    let first = frames.first().context("a video needs at least one frame")?;
    let (w, h) = first.dimensions();
    if w == 0 || h == 0 || w % 2 != 0 || h % 2 != 0 {
        bail!("Y4M 4:2:0 frames need even, non-zero sides (got {w}x{h})");
    }
    let chroma = vec![128u8; (w as usize / 2) * (h as usize / 2)];
    let mut out = format!("YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n").into_bytes();
    for (i, f) in frames.iter().enumerate() {
        if f.dimensions() != (w, h) {
            bail!("frame {i} is {:?}, the video is {w}x{h}", f.dimensions());
        }
        out.extend_from_slice(b"FRAME\n");
        out.extend_from_slice(f.as_raw());
        out.extend_from_slice(&chroma);
        out.extend_from_slice(&chroma);
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_a_page_and_takes_a_screenshot() -> Result<()> {
        let b = Browser::start(&[])?;
        b.goto(
            "data:text/html,<p id=t>ready</p><input id=i><button id=b \
             onclick=\"t.textContent=i.value\">go</button>",
        )?;
        let input = b.find("#i")?;
        b.send_keys(&input, "clicked 42")?;
        b.click(&b.find("#b")?)?;
        let text = b.wait_for_text("#t", "clicked", Duration::from_secs(10))?;
        assert_eq!(text, "clicked 42");
        assert_eq!(b.execute("return 6 * 7;", &[])?, json!(42));
        assert!(b.find("#missing").is_err());
        assert!(b.find_all("#missing")?.is_empty());
        let png = b.screenshot("browser-selftest")?;
        let img = image::open(&png)?;
        assert!(img.width() > 0 && img.height() > 0);
        let waited = b.wait_for(
            "something that never happens",
            Duration::from_millis(300),
            |_| Ok(None::<()>),
        );
        assert!(waited.is_err());
        Ok(())
    }

    #[test]
    fn y4m_has_the_layout_chromium_reads() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("v.y4m");
        let f = image::GrayImage::from_pixel(4, 2, image::Luma([7]));
        write_y4m(&path, &[f.clone(), f], 10)?;
        let bytes = std::fs::read(&path)?;
        let header = b"YUV4MPEG2 W4 H2 F10:1 Ip A1:1 C420jpeg\n";
        assert!(bytes.starts_with(header));
        // Two frames of "FRAME\n" + 8 luma + 2 + 2 chroma bytes.
        assert_eq!(bytes.len(), header.len() + 2 * (6 + 8 + 2 + 2));
        let odd = image::GrayImage::new(3, 2);
        assert!(write_y4m(&path, &[odd], 10).is_err());
        assert!(write_y4m(&path, &[], 10).is_err());
        Ok(())
    }
}
