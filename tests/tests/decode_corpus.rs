//! The damaged-frame corpus: how often the edge node's frame decoder reads the code in a damaged
//! camera frame, plain `rqrr` against the whole preprocessing ladder.
//!
//! `corpus_decode_rates` prints a table (the one in BENCHMARKS.md; run with `--nocapture`) and
//! guards it: the ladder reads at least 90% of the frames of every damage kind a working entrance
//! camera produces, never reads fewer frames than plain `rqrr`, and never returns a text other
//! than the one encoded. `ladder_step_matrix` (ignored: it is a measurement, not a guard) runs
//! every rung alone on every frame, which is how the ladder's order was chosen.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edge_node::frame::{LadderStep, decode_frame_stats, decode_step};
use tests::frames::{Damage, frame_file, kp1_like_text};

const FRAMES_PER_KIND: u64 = 30;

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

fn samples(kind_index: usize, damage: Damage) -> Vec<Sample> {
    (0..FRAMES_PER_KIND)
        .map(|i| {
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
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn corpus_decode_rates() {
    let mut problems = Vec::new();
    println!(
        "| damage | frames | plain rqrr | ladder | ladder rate | rescued by | ladder ms/frame |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (kind_index, &(damage, required)) in KINDS.iter().enumerate() {
        let name = damage.name();
        let (mut plain_ok, mut ladder_ok) = (0u32, 0u32);
        let mut rescued: BTreeMap<LadderStep, u32> = BTreeMap::new();
        let mut ladder_time = Duration::ZERO;
        for sample in samples(kind_index, damage) {
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
                if let Some(got) = got {
                    if *got != sample.text {
                        problems.push(format!(
                            "{name} seed {}: {who} decoded a different text: {got:?}",
                            sample.seed
                        ));
                    }
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
        let rate = f64::from(ladder_ok) * 100.0 / FRAMES_PER_KIND as f64;
        let rescued = if rescued.is_empty() {
            "-".to_string()
        } else {
            rescued
                .iter()
                .map(|(step, n)| format!("{} {n}", step.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {name} | {FRAMES_PER_KIND} | {plain_ok} | {ladder_ok} | {rate:.0}%{} | {rescued} | {:.1} |",
            if required.is_some() { "" } else { " (reported only)" },
            ms(ladder_time) / FRAMES_PER_KIND as f64,
        );
        if let Some(required) = required {
            if rate < f64::from(required) {
                problems.push(format!(
                    "{name}: the ladder read {rate:.0}% of frames, below the required {required}%"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every rung alone on every frame: how many frames each reads, and what it costs. Run with
/// `cargo test -p tests --test decode_corpus -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement for ordering the ladder, not a guard"]
fn ladder_step_matrix() {
    let mut header = String::from("| damage |");
    for step in LadderStep::LADDER {
        header.push_str(&format!(" {} |", step.name()));
    }
    println!("{header}");
    println!("|---|{}", "---|".repeat(LadderStep::LADDER.len()));
    let mut totals: BTreeMap<LadderStep, (u32, Duration, u32)> = BTreeMap::new();
    for (kind_index, &(damage, _)) in KINDS.iter().enumerate() {
        let frames = samples(kind_index, damage);
        let mut row = format!("| {} |", damage.name());
        for step in LadderStep::LADDER {
            let mut ok = 0u32;
            let mut ran = 0u32;
            let start = Instant::now();
            for sample in &frames {
                if !step.applies_to(sample.luma.width(), sample.luma.height()) {
                    continue;
                }
                ran += 1;
                if decode_step(&sample.luma, step).as_deref() == Some(sample.text.as_str()) {
                    ok += 1;
                }
            }
            let elapsed = start.elapsed();
            let total = totals.entry(step).or_default();
            total.0 += ok;
            total.1 += elapsed;
            total.2 += ran;
            if ran == 0 {
                row.push_str(" n/a |");
            } else {
                row.push_str(&format!(" {ok}/{ran} |"));
            }
        }
        println!("{row}");
    }
    let mut cost = String::from("| ms per frame |");
    for step in LadderStep::LADDER {
        let (_, elapsed, ran) = totals.get(&step).copied().unwrap_or_default();
        cost.push_str(&format!(" {:.1} |", ms(elapsed) / f64::from(ran.max(1))));
    }
    println!("{cost}");
}
