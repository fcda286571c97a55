//! The sync fuzz drivers run as a bounded, seeded test: 100,000 random and mutated inputs
//! through each of the frame decoder and the session, so every `cargo test` covers what
//! the cargo-fuzz targets (`fuzz/fuzz_targets/sync_*.rs`) explore without end.
//!
//! A failure prints the seed and the input; replay it with the matching fuzz target.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use shared::sync::harness::{FuzzFixture, fuzz_frame_decoder, fuzz_session};
use shared::sync::{Frame, PartitionSummary, Peer, Refusal, RefuseReason};
use shared::{Day, DeviceId, FacilityId, PartitionId};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

const INPUTS: usize = 100_000;

/// Random bytes, or a corpus entry with bytes flipped, inserted, deleted or spliced.
fn next_input(rng: &mut ChaCha8Rng, corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let pick = rng.next_u32() as usize;
    if corpus.is_empty() || pick.is_multiple_of(4) {
        let len = (rng.next_u32() as usize) % max_len;
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        return v;
    }
    let mut v = corpus[pick % corpus.len()].clone();
    for _ in 0..=(rng.next_u32() % 4) {
        let at = if v.is_empty() {
            0
        } else {
            (rng.next_u32() as usize) % v.len()
        };
        match rng.next_u32() % 5 {
            0 if !v.is_empty() => v[at] ^= 1 << (rng.next_u32() % 8),
            1 if !v.is_empty() => v[at] = rng.next_u32() as u8,
            2 => v.insert(at, rng.next_u32() as u8),
            3 if !v.is_empty() => {
                v.remove(at);
            }
            _ => {
                let other = &corpus[(rng.next_u32() as usize) % corpus.len()];
                let from = (rng.next_u32() as usize) % (other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
        }
    }
    v.truncate(max_len);
    v
}

fn run(name: &str, seed: u64, corpus: &[Vec<u8>], max_len: usize, target: impl Fn(&[u8])) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    for i in 0..INPUTS {
        let input = next_input(&mut rng, corpus, max_len);
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            panic!("{name}: input {i} of seed {seed} panicked: {input:?}");
        }
    }
    println!(
        "{name}: {INPUTS} inputs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

fn frame_corpus() -> Vec<Vec<u8>> {
    let facility = FacilityId::parse("fac_a").unwrap();
    let id = PartitionId {
        facility: facility.clone(),
        day: Day(20_000),
    };
    let frames = [
        Frame::Hello(shared::sync::Hello {
            version: 1,
            peer: Peer::Device {
                device: DeviceId::parse("dev_a").unwrap(),
                facility,
            },
            now: 1_728_000_000,
            horizon: Day(19_972),
            partitions: vec![
                PartitionSummary {
                    id: id.clone(),
                    heads: vec![[5; 32], [6; 32]],
                    records: 12,
                }
                .advertised(),
            ],
            in_sync: shared::sync::InSync {
                count: 3,
                digest: [4; 8],
            },
            push_only: false,
            credential: Some([1; 32]),
            refresh_have: None,
        }),
        Frame::Welcome(shared::sync::Welcome {
            version: 1,
            peer: Peer::Hub {
                region: "seoul".into(),
            },
            now: 1_728_000_000,
            horizon: Day(19_972),
            partitions: vec![],
            delta: true,
            refresh: Some(vec![1, 2, 3]),
        }),
        Frame::Sync {
            partition: id,
            message: vec![0x42, 0, 0, 0],
        },
        Frame::Done { received: 3 },
        Frame::Refused(Refusal::new(RefuseReason::Revoked, "revoked")),
    ];
    let encoded: Vec<Vec<u8>> = frames.iter().map(|f| f.encode().unwrap()).collect();
    // Chunk-size byte first, as the driver reads it; then one frame, then all of them.
    let mut corpus: Vec<Vec<u8>> = encoded
        .iter()
        .map(|e| [vec![3], e.clone()].concat())
        .collect();
    corpus.push([vec![0], encoded.concat()].concat());
    corpus
}

#[test]
fn frame_decoder_survives_100k_inputs() {
    run(
        "sync_frame",
        0x5EED_0001,
        &frame_corpus(),
        512,
        fuzz_frame_decoder,
    );
}

/// Builds `fuzz_session` scripts op by op (the byte layout the driver reads).
struct ScriptBuilder(Vec<u8>);

impl ScriptBuilder {
    fn responder() -> Self {
        ScriptBuilder(vec![0])
    }

    fn initiator() -> Self {
        ScriptBuilder(vec![1])
    }

    /// A hello (responder) or welcome (initiator) from device dev_a of fac_a listing one
    /// fac_a partition of today with heads unlike the node's.
    fn greet(mut self) -> Self {
        // op, now, one partition: fac_a, today, head byte, 1 head, 1 record;
        // peer dev_a, version 1, horizon of now, nothing in sync, not push-only, no
        // credential; a welcome then reads its delta flag (odd: a full list) and the length
        // of its refresh bytes.
        self.0.extend([0, 0, 1, 0, 2, 9, 1, 1, 1, 0, 1, 0, 0, 1, 1]);
        if self.0[0] == 1 {
            self.0.extend([1, 0]);
        }
        self
    }

    fn admit(mut self) -> Self {
        self.0.extend([1, 0, 1, 0]);
        self
    }

    /// Fixture message `index` for fac_a's partition of today, unmutated.
    fn sync(mut self, index: u8) -> Self {
        self.0.extend([2, 0, 0, 2, index, 0]);
        self
    }

    fn done(mut self, received: u8) -> Self {
        self.0.extend([5, 0, received]);
        self
    }
}

fn session_corpus() -> Vec<Vec<u8>> {
    vec![
        ScriptBuilder::responder()
            .greet()
            .admit()
            .sync(0)
            .sync(2)
            .done(1)
            .done(2)
            .0,
        ScriptBuilder::responder().greet().admit().done(1).0,
        ScriptBuilder::initiator().greet().sync(0).sync(2).done(1).0,
        ScriptBuilder::initiator().greet().done(1).0,
    ]
}

#[test]
fn session_corpus_reaches_deep_states() {
    let fixture = FuzzFixture::new().unwrap();
    let corpus = session_corpus();
    // The peer's records merge on both roles.
    for script in [&corpus[0], &corpus[2]] {
        let report = fuzz_session(&fixture, script);
        assert!(report.partitions_updated > 0, "{report:?}");
        assert!(!report.ended_badly, "{report:?}");
    }
    // A peer with nothing to send and a node whose first message is acknowledged finish.
    let report = fuzz_session(&fixture, &corpus[1]);
    assert!(report.frames_sent >= 2, "{report:?}");
}

#[test]
fn session_survives_100k_inputs() {
    let fixture = FuzzFixture::new().unwrap();
    let corpus = session_corpus();
    let completed = std::cell::Cell::new(0usize);
    let updated = std::cell::Cell::new(0usize);
    run("sync_session", 0x5EED_0002, &corpus, 256, |data| {
        let report = fuzz_session(&fixture, data);
        completed.set(completed.get() + usize::from(report.completed));
        updated.set(updated.get() + usize::from(report.partitions_updated > 0));
    });
    println!(
        "sync_session: {} inputs merged a partition, {} completed",
        updated.get(),
        completed.get()
    );
    // Mutated protocol-following scripts must keep reaching the merge; if this drops to
    // zero the driver or the corpus has stopped exercising the session.
    assert!(updated.get() > INPUTS / 100);
}
