//! Logs on stderr, set up once for both binaries: `--log-format text` (the default, for people)
//! or `--log-format json` (one JSON object per line, for journald and log shippers), filtered
//! by the binary's own variable (`EDGE_NODE_LOG`, `SYNC_HUB_LOG`; `warn` when unset or not a
//! valid filter).
//!
//! Nothing here keeps a token, a name, a phone number or a PIN out of the logs: the types that
//! carry them redact their `Debug`, and `tests/tests/log_secrets.rs` greps the JSON logs of a
//! whole multi-process run at debug level for every one it used.

use std::fmt;
use std::str::FromStr;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields (its text
    /// in `message`) and the spans it happened in.
    Json,
}

/// A `--log-format` value that is neither `text` nor `json`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown log format {0:?}: expected text or json")]
pub struct UnknownLogFormat(String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(s.to_owned())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The filter in the variable `filter_env`, else `warn`.
fn filter(filter_env: &str) -> EnvFilter {
    EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new("warn"))
}

/// The subscriber [`init`] installs, writing to `writer` (a test's buffer, or stderr).
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// Sends this process's logs (and those of dependencies that use the `log` crate) to stderr
/// in `format`, filtered by the variable `filter_env`. Call once, first thing in `main`; a
/// second call changes nothing.
pub fn init(filter_env: &str, format: LogFormat) {
    // Also routes dependencies that log through the `log` crate (ureq) to the same formatter.
    let _ = subscriber(filter(filter_env), format, std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    fn logged(format: LogFormat) -> String {
        let buf = Buffer::default();
        let sub = subscriber(EnvFilter::new("debug"), format, buf.clone());
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("session", peer = "hub");
            let _in = span.enter();
            tracing::warn!(day = 20_000, "partition \"refused\"\nby the hub");
            tracing::debug!(bytes = 12, "sent");
            tracing::trace!("not at debug");
        });
        let bytes = buf.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).unwrap_or_default()
    }

    #[test]
    fn json_writes_one_object_per_event_with_its_fields_and_span() {
        let out = logged(LogFormat::Json);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["message"], "partition \"refused\"\nby the hub");
        assert_eq!(lines[0]["day"], 20_000);
        assert_eq!(lines[0]["span"]["peer"], "hub");
        assert!(lines[0]["timestamp"].is_string());
        assert_eq!(lines[1]["level"], "DEBUG");
        assert_eq!(lines[1]["bytes"], 12);
    }

    #[test]
    fn text_stays_the_human_format() {
        let out = logged(LogFormat::Text);
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("WARN") && out.contains("partition"), "{out}");
        assert!(
            serde_json::from_str::<serde_json::Value>(out.lines().next().unwrap_or("")).is_err()
        );
    }

    #[test]
    fn formats_parse_from_their_names_only() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse(), Ok(LogFormat::Text));
        assert_eq!(LogFormat::default(), LogFormat::Text);
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse(), Ok(f));
        }
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.to_string().contains("text or json"), "{e}");
    }
}
