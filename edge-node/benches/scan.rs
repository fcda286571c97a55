//! The check-in path at one entrance device, stage by stage: how long a visitor waits between
//! the camera delivering a frame and the verdict, and how many durable check-ins a device
//! sustains.
//!
//! Renders a fixed set of camera frames (clean QR codes of genuine KP1 tokens from a test
//! issuer, off-centre on unevenly lit 640x480 backgrounds, delivered as PNG), enrolls devices in
//! temporary folders from a ticket built in-process, and times each stage per frame: frame
//! decoding, token verification, sealing with the durable commit, and the whole pipeline. Then
//! a separate loop of durable check-ins measures sustained throughput. Prints tables. Run it in
//! release mode:
//!
//! ```text
//! cargo bench -p edge-node --bench scan
//! ```
//!
//! Targets: the whole pipeline at most 1.3x frame decoding alone at p99 (storing a visit durably
//! must not noticeably lengthen the wait at the door), and at least 50 durable check-ins a second.

use edge_node::device::Device;
use edge_node::frame::{decode_frame, decode_frame_stats};
use image::{GrayImage, ImageFormat};
use qrcode::bits::Bits;
use qrcode::{Color, EcLevel, QrCode, Version};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::daykey::DayKeyRatchet;
use shared::facility::{BusinessNumber, Facility, FacilityStatus, Registration};
use shared::ticket::{Credential, EnrollmentTicket, HubContact, TICKET_KIND, TICKET_VERSION};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::token::{Keyring, TestIssuer, Verdict, verify};
use shared::{DeviceId, FacilityId};
use std::collections::BTreeMap;
use std::error::Error;
use std::io::Cursor;
use std::time::{Duration, Instant};

/// Frames in the fixed set.
const FRAMES: usize = 200;
/// Passes over the frame set, each with fresh devices: 600 samples a stage, so that p99 is not
/// decided by one or two frames.
const ROUNDS: usize = 3;
/// Check-ins in the sustained-throughput loop.
const SUSTAINED: usize = 2_000;
/// Arrival rate the sustained loop's clock advances at (visitors a second): the seen-token
/// memory then holds and prunes about as many codes as at a busy door.
const SIMULATED_RATE: u64 = 50;
/// The device clock: noon of a fixed day, so the run never crosses a UTC midnight.
const NOW: UnixSeconds = 20_400 * DAY_SECONDS + 12 * 3_600;
/// Code lifetime, seconds (the spec's usual 60).
const TTL: u8 = 60;
/// Camera frame size (VGA).
const SIZE: (u32, u32) = (640, 480);
/// Modules of quiet zone around the code (the QR standard's minimum).
const QUIET: u32 = 4;
/// The RFC 9285 base45 alphabet: exactly the QR alphanumeric set, which KP1 texts use.
const BASE45: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let issuer = TestIssuer::new([0x11; 32], 1, 1);
    let mut rng = StdRng::seed_from_u64(0x5ca1);
    println!(
        "edge-node scan benchmark: {FRAMES} clean {}x{} PNG frames, {SUSTAINED} sustained check-ins",
        SIZE.0, SIZE.1
    );

    let started = Instant::now();
    let mut frames = Vec::with_capacity(FRAMES);
    for _ in 0..FRAMES {
        let text = issuer.issue(NOW, TTL, rng.r#gen());
        let png = render_png(&text, &mut rng)?;
        frames.push((text, png));
    }
    let png_bytes: usize = frames.iter().map(|(_, png)| png.len()).sum();
    println!(
        "rendered in {:.1} s; mean PNG size {} bytes",
        started.elapsed().as_secs_f64(),
        png_bytes / FRAMES
    );

    let tmp = tempfile::tempdir()?;
    let ticket = tmp.path().join("bench.ticket");
    std::fs::write(&ticket, ticket_json(&issuer)?)?;

    // The stages are timed frame by frame in one loop, each frame going through every stage
    // before the next frame, so that load from elsewhere on the machine falls on all stages
    // alike and the whole/decode ratio compares like with like. Device A checks in the decoded
    // text alone; device B runs the whole pipeline on the same frame (A has already seen the
    // token, so B must be another device).
    let ring = keyring(&issuer)?;
    let samples = FRAMES * ROUNDS;
    let mut decode = Vec::with_capacity(samples);
    let mut verifying = Vec::with_capacity(samples);
    let mut check_in = Vec::with_capacity(samples);
    let mut whole = Vec::with_capacity(samples);
    let mut first_session = Duration::ZERO;
    // Which ladder rung read each frame, to tell a slow rqrr scan from a frame that needed
    // preprocessing.
    let mut rungs: BTreeMap<&'static str, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        // Fresh devices each round: the previous ones have seen these tokens.
        let mut device_a = Device::init(&tmp.path().join(format!("dev-a{round}")), &ticket, NOW)?;
        let warm = warm_up(&mut device_a, &issuer, &mut rng)?;
        if round == 0 {
            first_session = warm;
        }
        let mut device_b = Device::init(&tmp.path().join(format!("dev-b{round}")), &ticket, NOW)?;
        warm_up(&mut device_b, &issuer, &mut rng)?;
        for (text, png) in &frames {
            // Frame decoding alone.
            let t = Instant::now();
            let stats = decode_frame_stats(png)?;
            decode.push(t.elapsed());
            *rungs
                .entry(stats.step.map_or("none", |s| s.name()))
                .or_default() += 1;
            if stats.text.as_deref() != Some(text.as_str()) {
                return Err(
                "a frame decoded to another text (or none): the decoder or the renderer is broken"
                    .into(),
            );
            }

            // Token verification alone (pure: Ed25519 and the checks of the spec).
            let t = Instant::now();
            let ok = verify(text, &ring, NOW, 10).is_ok();
            verifying.push(t.elapsed());
            if !ok {
                return Err("a freshly issued code did not verify".into());
            }

            // The device's check-in: verify, seen-token check, seal, durable commit.
            let t = Instant::now();
            let r = device_a.check_in(NOW, text)?;
            check_in.push(t.elapsed());
            if r.verdict != Verdict::Accepted {
                return Err(
                    format!("check-in gave {} instead of accepted", r.verdict.as_str()).into(),
                );
            }

            // The whole pipeline, frame bytes to durable verdict.
            let t = Instant::now();
            let decoded = decode_frame(png)?.ok_or("a frame decoded to no text")?;
            let r = device_b.check_in(NOW, &decoded)?;
            whole.push(t.elapsed());
            if r.verdict != Verdict::Accepted {
                return Err(
                    format!("pipeline gave {} instead of accepted", r.verdict.as_str()).into(),
                );
            }
        }
    }
    // Sealing and committing: the check-in less that frame's verification.
    let seal_commit: Vec<Duration> = check_in
        .iter()
        .zip(&verifying)
        .map(|(c, v)| c.saturating_sub(*v))
        .collect();
    // What storing adds to the wait at the door, frame by frame.
    let added: Vec<Duration> = whole
        .iter()
        .zip(&decode)
        .map(|(w, d)| w.saturating_sub(*d))
        .collect();

    println!();
    println!("per-frame latency ({FRAMES} frames x {ROUNDS} rounds = {samples} samples a stage)");
    println!("| stage | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, samples) in [
        ("decode (PNG -> text)", &decode),
        ("verify (KP1 token)", &verifying),
        ("check-in (verify + seal + durable commit)", &check_in),
        ("seal + durable commit (check-in - verify)", &seal_commit),
        ("whole pipeline (decode + check-in)", &whole),
        ("added by check-in (whole - decode, same frame)", &added),
    ] {
        let s = Summary::of(samples);
        println!("| {name} | {} | {} | {} |", ms(s.p50), ms(s.p99), ms(s.max));
    }
    let rungs: Vec<String> = rungs.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "frames read per ladder rung (all rounds): {}",
        rungs.join(", ")
    );
    let ratio = Summary::of(&whole).p99.as_secs_f64() / Summary::of(&decode).p99.as_secs_f64();
    println!(
        "\nfirst check-in of a session (wraps a new session key with age): {}",
        ms(first_session)
    );
    println!(
        "whole / decode at p99: {ratio:.3} (target <= 1.3: {})",
        verdict(ratio <= 1.3)
    );

    // Sustained durable check-ins with pre-issued codes, the clock advancing at a busy door's
    // rate so the seen-token memory fills and prunes as it would.
    let codes: Vec<(UnixSeconds, String)> = (0..SUSTAINED as u64)
        .map(|i| {
            let now = NOW + i / SIMULATED_RATE;
            (now, issuer.issue(now, TTL, rng.r#gen()))
        })
        .collect();
    let mut device = Device::init(&tmp.path().join("dev-c"), &ticket, NOW)?;
    warm_up(&mut device, &issuer, &mut rng)?;
    let mut each = Vec::with_capacity(SUSTAINED);
    let started = Instant::now();
    for (now, text) in &codes {
        let t = Instant::now();
        let r = device.check_in(*now, text)?;
        each.push(t.elapsed());
        if r.verdict != Verdict::Accepted {
            return Err(format!("sustained check-in gave {}", r.verdict.as_str()).into());
        }
    }
    let total = started.elapsed();
    drop(device);
    let rate = SUSTAINED as f64 / total.as_secs_f64();
    let s = Summary::of(&each);
    println!();
    println!("sustained durable check-ins ({SUSTAINED}, one redb transaction each)");
    println!("| check-ins | total | per second | p50 | p99 | max |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {SUSTAINED} | {:.2} s | {rate:.0} | {} | {} | {} |",
        total.as_secs_f64(),
        ms(s.p50),
        ms(s.p99),
        ms(s.max)
    );
    println!(
        "sustained rate: {rate:.0}/s (target >= 50/s: {})",
        verdict(rate >= 50.0)
    );
    Ok(())
}

/// One check-in before measuring: the first of a process wraps a new session key with age to
/// the day's hub key, a once-per-process cost reported apart.
fn warm_up(device: &mut Device, issuer: &TestIssuer, rng: &mut StdRng) -> Result<Duration> {
    let text = issuer.issue(NOW, TTL, rng.r#gen());
    let t = Instant::now();
    let r = device.check_in(NOW, &text)?;
    let took = t.elapsed();
    if r.verdict != Verdict::Accepted {
        return Err(format!("warm-up check-in gave {}", r.verdict.as_str()).into());
    }
    Ok(took)
}

fn keyring(issuer: &TestIssuer) -> Result<Keyring> {
    let mut ring = Keyring::new();
    ring.insert(issuer.keyring_entry("bench-issuer", 1_577_836_800, 4_102_444_800))?;
    Ok(ring)
}

/// An enrollment ticket as a hub would write it, for a hub that never runs: the bench only
/// checks in, so the hub's address and id are placeholders of the right form.
fn ticket_json(issuer: &TestIssuer) -> Result<String> {
    let today = Day::of(NOW);
    let ratchet = DayKeyRatchet::generate(&mut rand_core::OsRng, today);
    let day_keys = ratchet.publics(today, 42);
    // The health authority's key only seals paper-log entries, which this bench never makes;
    // any age recipient will do, and a day key is one (edge-node has no direct `age` dependency).
    let authority_recipient = day_keys
        .first()
        .map(|k| k.recipient.clone())
        .ok_or("the ratchet gave no day keys")?;
    let ticket = EnrollmentTicket {
        kind: TICKET_KIND.into(),
        version: TICKET_VERSION,
        issued_at: NOW,
        hub: HubContact {
            endpoint_id: "ab".repeat(32),
            addrs: vec!["127.0.0.1:7447".into()],
            region: "mapo".into(),
        },
        facility: Facility {
            id: FacilityId::parse("f-bench")?,
            registration: Registration {
                name: "Star Karaoke".into(),
                business_number: Some(BusinessNumber::parse("123-45-67891")?),
                representative: "Kim".into(),
                phone: "02-123-4567".into(),
                category: "karaoke".into(),
                region: "mapo".into(),
                address: "1 Wausan-ro".into(),
            },
            status: FacilityStatus::Approved,
            registered_at: NOW,
        },
        device_id: DeviceId::parse("d-0123456789abcdef")?,
        device_name: "front door".into(),
        credential: Credential([7; 32]),
        keyring: keyring(issuer)?,
        day_keys,
        authority_recipient,
        peer_hubs: Vec::new(),
    };
    Ok(ticket.to_json())
}

/// A clean camera frame of `text` as PNG bytes: the code encoded as the spec prescribes
/// (alphanumeric, version 6, level M), its side 40-60% of the frame height, anywhere in the
/// frame, on a background lit unevenly, with anti-aliased module edges. The same rendering as
/// `tests/src/frames.rs` with `Damage::Clean` (edge-node cannot depend on the `tests` crate).
fn render_png(text: &str, rng: &mut StdRng) -> Result<Vec<u8>> {
    if !text.bytes().all(|b| BASE45.contains(&b)) {
        return Err("the code text is not QR-alphanumeric".into());
    }
    let mut bits = Bits::new(Version::Normal(6));
    bits.push_alphanumeric_data(text.as_bytes())?;
    bits.push_terminator(EcLevel::M)?;
    let code = QrCode::with_bits(bits, EcLevel::M)?;
    let modules = code.width() as u32;
    let colors = code.to_colors();
    let total = (modules + 2 * QUIET) as f32;
    let side = rng.gen_range(0.4..0.6) * SIZE.1 as f32;
    let module_px = side / total;
    let half = side / 2.0 + 4.0;
    let center = (
        rng.gen_range(half..SIZE.0 as f32 - half),
        rng.gen_range(half..SIZE.1 as f32 - half),
    );
    let base: f32 = rng.gen_range(120.0..170.0);
    let gx = rng.gen_range(-40.0..40.0) / SIZE.0 as f32;
    let gy = rng.gen_range(-30.0..30.0) / SIZE.1 as f32;
    let dark: f32 = rng.gen_range(20.0..50.0);
    let light: f32 = rng.gen_range(200.0..235.0);
    let sample = |x: f32, y: f32| -> f32 {
        let u = (x - center.0) / module_px + total / 2.0;
        let v = (y - center.1) / module_px + total / 2.0;
        if !(0.0..total).contains(&u) || !(0.0..total).contains(&v) {
            return base + gx * x + gy * y;
        }
        let (mu, mv) = (u as u32, v as u32);
        let inside =
            (QUIET..QUIET + modules).contains(&mu) && (QUIET..QUIET + modules).contains(&mv);
        let is_dark =
            inside && colors[((mv - QUIET) * modules + (mu - QUIET)) as usize] == Color::Dark;
        if is_dark { dark } else { light }
    };
    // 2x2 supersampling gives module edges the grey a lens gives them.
    let img = GrayImage::from_fn(SIZE.0, SIZE.1, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let v = (sample(fx + 0.25, fy + 0.25)
            + sample(fx + 0.75, fy + 0.25)
            + sample(fx + 0.25, fy + 0.75)
            + sample(fx + 0.75, fy + 0.75))
            / 4.0;
        image::Luma([v.round().clamp(0.0, 255.0) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)?;
    Ok(out)
}

/// Nearest-rank percentiles of a sample.
struct Summary {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(samples: &[Duration]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * sorted.len() as f64).ceil() as usize).saturating_sub(1);
            sorted.get(i).copied().unwrap_or_default()
        };
        Summary {
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
