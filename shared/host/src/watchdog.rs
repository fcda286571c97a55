//! systemd's service notifications (`sd_notify(3)`) without libsystemd: `READY=1` once a
//! binary serves, and `WATCHDOG=1` while its own health check passes, so a unit with
//! `Type=notify` and `WatchdogSec=` restarts a process that hangs or can no longer store.
//!
//! The protocol is one datagram per message to the `AF_UNIX` socket named by `NOTIFY_SOCKET`
//! (a path, or an abstract name after `@`). `WATCHDOG_USEC` gives the watchdog's period;
//! `WATCHDOG_PID`, when set, names the process meant. Without `NOTIFY_SOCKET` (not under
//! systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, or `None` when it is unset (not under systemd) or
    /// cannot be reached (logged).
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::connect(&target.to_string_lossy()) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET is set but cannot be reached: {e}");
                None
            }
        }
    }

    /// Connects to `target`: a socket path, or `@name` for an abstract socket.
    pub fn connect(target: &str) -> io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        if let Some(name) = target.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                socket.connect_addr(&addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract sockets exist on Linux only",
                ));
            }
        } else {
            socket.connect(target)?;
        }
        Ok(Notifier { socket })
    }

    /// Sends one state line (`READY=1`, `WATCHDOG=1`, `STATUS=...`).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket.send(state.as_bytes()).map(|_| ())
    }
}

/// Tells systemd the service is ready and, when a watchdog is asked for, sends `WATCHDOG=1`
/// every [`interval`] from a thread of its own while `healthy()` says so. `healthy` is the
/// binary's own health check (its store writable, its actor answering): when it fails or
/// hangs, the pings stop and systemd restarts the service after `WatchdogSec`. Not under
/// systemd, nothing happens.
pub fn serve(mut healthy: impl FnMut() -> bool + Send + 'static) {
    let Some(notifier) = Notifier::from_env() else {
        return;
    };
    if let Err(e) = notifier.notify("READY=1") {
        tracing::warn!("cannot tell systemd the service is ready: {e}");
    }
    let Some(every) = interval() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                if !healthy() {
                    tracing::warn!("health check failed: no watchdog ping");
                    continue;
                }
                if let Err(e) = notifier.notify("WATCHDOG=1") {
                    tracing::warn!("cannot ping systemd's watchdog: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the watchdog thread: {e}");
    }
}

/// How often to send `WATCHDOG=1`: half the period `WATCHDOG_USEC` gives, when it is meant
/// for this process; `None` when no watchdog is asked for.
pub fn interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_half_the_period_and_only_for_this_process() {
        assert_eq!(
            interval_from(Some("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            interval_from(Some("10000000"), Some("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(interval_from(Some("10000000"), Some("8"), 7), None);
        assert_eq!(interval_from(None, None, 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_state_reaches_the_socket() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path)?;
        let n = Notifier::connect(&path.to_string_lossy())?;
        n.notify("READY=1")?;
        let mut buf = [0u8; 64];
        let got = listener.recv(&mut buf)?;
        assert_eq!(&buf[..got], b"READY=1");
        Ok(())
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_name() -> io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("kipass-watchdog-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixDatagram::bind_addr(&addr)?;
        Notifier::connect(&format!("@{name}"))?.notify("WATCHDOG=1")?;
        let mut buf = [0u8; 64];
        let got = listener.recv(&mut buf)?;
        assert_eq!(&buf[..got], b"WATCHDOG=1");
        Ok(())
    }
}
