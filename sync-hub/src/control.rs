//! Commands while `run` is active: `run` holds the store, so a command finds the running
//! process through `DATA/run.json` and asks its HTTP API with the operator token
//! (`keys/operator.token`, owner-readable only).

use anyhow::{Context, Result};
use rand_core::{OsRng, RngCore};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

fn token_path(data: &Path) -> PathBuf {
    data.join("keys").join("operator.token")
}

fn run_file(data: &Path) -> PathBuf {
    data.join("run.json")
}

/// The operator's API token, created on first use.
pub fn operator_token(data: &Path) -> Result<String> {
    let path = token_path(data);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if t.len() == 64 {
            return Ok(t);
        }
    }
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    let t = hex::encode(b);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, t.as_bytes())?;
    Ok(t)
}

/// Records where the running hub answers.
pub fn write_run_file(data: &Path, http: SocketAddr, sync: &[SocketAddr]) -> Result<()> {
    let v = serde_json::json!({
        "pid": std::process::id(),
        "http": http.to_string(),
        "sync": sync.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    });
    std::fs::write(run_file(data), v.to_string()).context("cannot write run.json")
}

/// Removes the run file at shutdown.
pub fn remove_run_file(data: &Path) {
    let _ = std::fs::remove_file(run_file(data));
}

/// Where the running hub answers, from its run file.
pub fn running(data: &Path) -> Result<(String, Vec<SocketAddr>)> {
    let text = std::fs::read_to_string(run_file(data)).context(
        "the hub store is busy but no run.json says where the running hub answers: is another command holding it?",
    )?;
    let v: serde_json::Value = serde_json::from_str(&text).context("run.json is damaged")?;
    let http = v["http"]
        .as_str()
        .context("run.json has no http address")?
        .to_owned();
    let sync = v["sync"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()?.parse().ok()).collect())
        .unwrap_or_default();
    Ok((http, sync))
}

/// Calls the running hub's API; returns its answer's status and text.
fn call_raw(
    data: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String, String)> {
    let (http, _) = running(data)?;
    let token = operator_token(data)?;
    let url = format!("http://{http}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build()
        .into();
    let auth = format!("Bearer {token}");
    let mut resp = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &auth).call(),
        (_, Some(b)) => agent
            .post(&url)
            .header("authorization", &auth)
            .send_json(&b),
        (_, None) => agent.post(&url).header("authorization", &auth).send_empty(),
    }
    .with_context(|| format!("the running hub at {http} did not answer"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .with_context(|| format!("the running hub at {http} answered {status} unreadably"))?;
    Ok((status, text, http))
}

fn refused(status: u16, text: &str) -> anyhow::Error {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    anyhow::anyhow!(
        "the running hub refused ({status}): {}",
        v["error"].as_str().unwrap_or("unknown error")
    )
}

/// Calls the running hub's API; returns its JSON answer.
pub fn call(
    data: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let (status, text, http) = call_raw(data, method, path, body)?;
    if !(200..300).contains(&status) {
        return Err(refused(status, &text));
    }
    serde_json::from_str(&text)
        .with_context(|| format!("the running hub at {http} answered {status} without JSON"))
}

/// Calls the running hub's API; returns its answer's text (JSON or CSV).
pub fn call_text(
    data: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<String> {
    let (status, text, _) = call_raw(data, method, path, body)?;
    if !(200..300).contains(&status) {
        return Err(refused(status, &text));
    }
    Ok(text)
}
