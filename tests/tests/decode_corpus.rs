//! The damaged-frame corpus: how often the edge node's frame decoder reads the code in a damaged
//! camera frame, plain `rqrr` against the whole preprocessing ladder.
//!
//! `corpus_decode_rates` prints a table (the one in BENCHMARKS.md; run with `--nocapture`) and
//! guards it: the ladder reads at least 90% of the frames of every damage kind a working entrance
//! camera produces, never reads fewer frames than plain `rqrr`, and never returns a text other
//! than the one encoded. `ladder_step_matrix` (ignored: it is a measurement, not a guard) runs
//! every rung alone on every frame, which is how the ladder's order was chosen.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_node::frame::{LadderStep, decode_frame_stats, decode_step};
use tests::frames::{Damage, frame_file, kp1_like_text};

const FRAMES_PER_KIND: u64 = 30;
/// Kinds that are only reported get fewer frames: nearly every rung runs on each of their frames,
/// and the guarded kinds are what the test's time is for.
const FRAMES_PER_REPORTED_KIND: u64 = 15;

/// The corpus: each damage kind, and the share of its frames the ladder must read (in percent),
/// or `None` for kinds that are only reported (damage beyond what a camera should deliver).
const KINDS: &[(Damage, Option<u32>)] = &[
    (Damage::Clean, Some(90)),
    (Damage::ByteMode, Some(90)),
    (Damage::Jpeg { quality: 40 }, Some(90)),
    (Damage::Rotate { max_degrees: 20.0 }, Some(90)),
    (Damage::Rotate90, Some(90)),
    (Damage::Dim { low: 20, high: 70 }, Some(90)),
    (Damage::Blur { sigma: 1.5 }, Some(90)),
    (Damage::Noise { sigma: 25.0 }, Some(90)),
    (Damage::SaltPepper { fraction: 0.03 }, Some(90)),
    (Damage::Hd, Some(90)),
    (Damage::Blur { sigma: 2.5 }, None),
    (Damage::Noise { sigma: 50.0 }, None),
    (Damage::Small { fraction: 0.2 }, None),
];

/// One corpus frame: its text, its file bytes, and the decoded luma for single-rung runs.
struct Sample {
    seed: u64,
    text: String,
    bytes: Vec<u8>,
    luma: image::GrayImage,
}

fn sample(kind_index: usize, damage: Damage, i: u64) -> Sample {
    // Seeds are stable per (kind position, frame) so a failure names a reproducible frame.
    let seed = kind_index as u64 * 1000 + i;
    let text = kp1_like_text(seed);
    let bytes = frame_file(&text, damage, seed).expect("corpus texts are encodable");
    let luma = image::load_from_memory(&bytes)
        .expect("the corpus writes valid PNG and JPEG")
        .into_luma8();
    Sample {
        seed,
        text,
        bytes,
        luma,
    }
}

fn samples(kind_index: usize, damage: Damage) -> Vec<Sample> {
    (0..FRAMES_PER_KIND)
        .map(|i| sample(kind_index, damage, i))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Run `f` over `0..n` on all cores; results come back in index order, so output stays stable.
fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism().map_or(1, |p| p.get());
    let next = AtomicUsize::new(0);
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let out = f(i);
                    results
                        .lock()
                        .expect("no worker panics while holding the lock")
                        .insert(i, out);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no worker panicked")
        .into_values()
        .collect()
}

/// One table row and the problems found, for one damage kind.
fn measure_kind(kind_index: usize, damage: Damage, required: Option<u32>) -> (String, Vec<String>) {
    let name = damage.name();
    let mut problems = Vec::new();
    let (mut plain_ok, mut ladder_ok) = (0u32, 0u32);
    let mut rescued: BTreeMap<LadderStep, u32> = BTreeMap::new();
    let mut ladder_time = Duration::ZERO;
    let frames = if required.is_some() {
        FRAMES_PER_KIND
    } else {
        FRAMES_PER_REPORTED_KIND
    };
    for i in 0..frames {
        let sample = sample(kind_index, damage, i);
        let plain = decode_step(&sample.luma, LadderStep::Plain);
        let start = Instant::now();
        let stats = match decode_frame_stats(&sample.bytes) {
            Ok(stats) => stats,
            Err(e) => {
                problems.push(format!("{name} seed {}: frame refused: {e}", sample.seed));
                continue;
            }
        };
        ladder_time += start.elapsed();
        for (who, got) in [("plain", &plain), ("ladder", &stats.text)] {
            if let Some(got) = got
                && *got != sample.text
            {
                problems.push(format!(
                    "{name} seed {}: {who} decoded a different text: {got:?}",
                    sample.seed
                ));
            }
        }
        if plain.is_some() {
            plain_ok += 1;
            if stats.text.is_none() {
                problems.push(format!(
                    "{name} seed {}: plain rqrr read it, the ladder did not",
                    sample.seed
                ));
            }
        }
        if stats.text.is_some() {
            ladder_ok += 1;
        }
        if let Some(step) = stats.step.filter(|s| *s != LadderStep::Plain) {
            *rescued.entry(step).or_default() += 1;
        }
    }
    let rate = f64::from(ladder_ok) * 100.0 / frames as f64;
    let rescued = if rescued.is_empty() {
        "-".to_string()
    } else {
        rescued
            .iter()
            .map(|(step, n)| format!("{} {n}", step.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let row = format!(
        "| {name} | {frames} | {plain_ok} | {ladder_ok} | {rate:.0}%{} | {rescued} | {:.1} |",
        if required.is_some() {
            ""
        } else {
            " (reported only)"
        },
        ms(ladder_time) / frames as f64,
    );
    if let Some(required) = required
        && rate < f64::from(required)
    {
        problems.push(format!(
            "{name}: the ladder read {rate:.0}% of frames, below the required {required}%"
        ));
    }
    (row, problems)
}

#[test]
fn corpus_decode_rates() {
    let start = Instant::now();
    let results = parallel(KINDS.len(), |k| {
        let (damage, required) = KINDS[k];
        measure_kind(k, damage, required)
    });
    println!(
        "| damage | frames | plain rqrr | ladder | ladder rate | rescued by | ladder ms/frame |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut problems = Vec::new();
    for (row, kind_problems) in results {
        println!("{row}");
        problems.extend(kind_problems);
    }
    println!(
        "({:.1} s in all, frame generation included)",
        start.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every rung alone on every frame: how many frames each reads and what it costs, then the order
/// a greedy choice would give the rungs after `plain` (most frames rescued per millisecond first),
/// over the camera-sized (VGA) frames. Run with
/// `cargo test -p tests --test decode_corpus -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement for ordering the ladder, not a guard"]
fn ladder_step_matrix() {
    let steps = LadderStep::ALL;
    println!(
        "| damage |{}",
        steps.map(|s| format!(" {} |", s.name())).concat()
    );
    println!("|---|{}", "---|".repeat(steps.len()));
    // For every VGA frame, the set of rungs that read it; per rung, time spent and frames tried.
    let mut decoded_by: Vec<Vec<LadderStep>> = Vec::new();
    let mut cost: BTreeMap<LadderStep, (Duration, u32)> = BTreeMap::new();
    for (kind_index, &(damage, _)) in KINDS.iter().enumerate() {
        let frames = samples(kind_index, damage);
        let mut row = format!("| {} |", damage.name());
        let mut per_frame = vec![Vec::new(); frames.len()];
        for step in steps {
            let (mut ok, mut ran, mut spent) = (0u32, 0u32, Duration::ZERO);
            for (i, sample) in frames.iter().enumerate() {
                if !step.applies_to(sample.luma.width(), sample.luma.height()) {
                    continue;
                }
                ran += 1;
                let start = Instant::now();
                let got = decode_step(&sample.luma, step);
                spent += start.elapsed();
                if got.as_deref() == Some(sample.text.as_str()) {
                    ok += 1;
                    per_frame[i].push(step);
                }
            }
            if ran == 0 {
                row.push_str(" n/a |");
            } else {
                let mean = ms(spent) / f64::from(ran);
                row.push_str(&format!(" {ok}/{ran} {mean:.0}ms |"));
            }
            if damage != Damage::Hd {
                let c = cost.entry(step).or_default();
                c.0 += spent;
                c.1 += ran;
            }
        }
        println!("{row}");
        if damage != Damage::Hd {
            decoded_by.extend(per_frame);
        }
    }
    let mean_ms = |step: LadderStep| {
        let (spent, ran) = cost.get(&step).copied().unwrap_or_default();
        ms(spent) / f64::from(ran.max(1))
    };
    let mut left: Vec<&Vec<LadderStep>> = decoded_by
        .iter()
        .filter(|set| !set.contains(&LadderStep::Plain))
        .collect();
    println!(
        "\nVGA frames: {}, plain misses {}; greedy order after plain:",
        decoded_by.len(),
        left.len()
    );
    let mut candidates: Vec<LadderStep> = steps
        .into_iter()
        .filter(|s| !matches!(s, LadderStep::Plain | LadderStep::Downscale))
        .collect();
    loop {
        let best = candidates
            .iter()
            .map(|&s| (s, left.iter().filter(|set| set.contains(&s)).count()))
            .filter(|&(_, n)| n > 0)
            .max_by(|a, b| (a.1 as f64 / mean_ms(a.0)).total_cmp(&(b.1 as f64 / mean_ms(b.0))));
        let Some((step, n)) = best else { break };
        left.retain(|set| !set.contains(&step));
        candidates.retain(|&s| s != step);
        println!(
            "  {} rescues {n} ({:.0} ms/frame), {} still missed",
            step.name(),
            mean_ms(step),
            left.len()
        );
    }
    let unused: Vec<&str> = candidates.iter().map(|s| s.name()).collect();
    println!("  rescue nothing more: {}", unused.join(", "));
}
