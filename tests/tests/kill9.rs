//! Crash safety of check-in: a process scanning continuously is killed with SIGKILL at
//! random moments, over and over. Every visit it reported `accepted` must still be stored
//! after each restart, and no visit may be stored twice.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::fixture::{self, HubFixture, bin};
use tests::frames::{Damage, encode_png, frame};

const KILLS: usize = 200;
const CODES_PER_RUN: usize = 8;

#[test]
fn kill_9_loses_no_accepted_visit_and_stores_none_twice() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("kiosk")?;
    let d = dev.display().to_string();
    let tmp = tempfile::tempdir()?;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let issuer = fixture::issuer();

    let mut accepted: BTreeSet<[u8; 16]> = BTreeSet::new();
    let mut shown: BTreeMap<[u8; 16], usize> = BTreeMap::new();
    let mut previous: Vec<(std::path::PathBuf, [u8; 16])> = Vec::new();
    let started = Instant::now();
    for kill in 0..KILLS {
        // Fresh codes, plus a few of the previous run's (still valid): those must come back
        // `duplicate` if the killed run stored them, and `accepted` if it did not.
        let now = fixture::now();
        let mut batch = Vec::new();
        for i in 0..CODES_PER_RUN {
            let token: [u8; 16] = rng.r#gen();
            let payload = issuer.issue(now, 60, token);
            let path = tmp.path().join(format!("k{kill}-{i}.png"));
            std::fs::write(
                &path,
                encode_png(&frame(&payload, Damage::Clean, u64::from(token[0]))?)?,
            )?;
            batch.push((path, token));
        }
        batch.extend(previous.iter().take(3).cloned());
        let mut child = Command::new(bin("edge-node"))
            .args(["--data", &d, "scan", "--json"])
            .args(batch.iter().map(|(p, _)| p))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take();
        let reader = std::thread::spawn(move || -> Vec<String> {
            stdout
                .map(|s| BufReader::new(s).lines().map_while(Result::ok).collect())
                .unwrap_or_default()
        });
        // A random moment: from before the store opens to after the last commit.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        let _ = child.kill();
        child.wait()?;
        let lines = reader.join().unwrap_or_default();
        for (line, (_, token)) in lines.iter().zip(&batch) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            match v["verdict"].as_str() {
                Some("accepted") => {
                    if !accepted.insert(*token) {
                        bail!("seed {seed}: a code was accepted twice");
                    }
                    *shown.entry(*token).or_default() += 1;
                }
                Some("duplicate") => {
                    *shown.entry(*token).or_default() += 1;
                }
                other => bail!("seed {seed}: unexpected verdict {other:?}: {line}"),
            }
        }
        previous = batch[..CODES_PER_RUN].to_vec();
        // After every restart-worthy kill, check durability (every 20 kills, to keep it quick).
        if kill % 20 == 19 || kill == KILLS - 1 {
            let stored = fixture::qr_tokens(&fixture::stored_records(&dev, &hub.data)?);
            let unique: BTreeSet<_> = stored.iter().copied().collect();
            if unique.len() != stored.len() {
                bail!(
                    "seed {seed}: {} visits stored twice",
                    stored.len() - unique.len()
                );
            }
            let lost = accepted.difference(&unique).count();
            if lost > 0 {
                bail!(
                    "seed {seed}: {lost} accepted visits lost after {} kills",
                    kill + 1
                );
            }
        }
    }
    let stored = fixture::qr_tokens(&fixture::stored_records(&dev, &hub.data)?);
    println!(
        "{KILLS} kills in {:.1?}: {} accepted and reported, {} stored, 0 lost, 0 stored twice",
        started.elapsed(),
        accepted.len(),
        stored.len()
    );
    assert!(
        accepted.len() > KILLS / 4,
        "too few visits got through to test anything"
    );
    Ok(())
}
