//! Bad camera frames at an enrolled device: each gets a clear one-line error, no panic,
//! and the visits already stored survive.

use anyhow::Result;
use tests::fixture::{self, HubFixture, code_frame, run, run_ok};

#[test]
fn bad_frames_are_refused_and_lose_nothing() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    let d = dev.display().to_string();
    let tmp = tempfile::tempdir()?;
    let (good, _, _) = code_frame(tmp.path(), "good", fixture::now())?;
    run_ok(
        "edge-node",
        &["--data", &d, "scan", good.to_str().unwrap_or_default()],
    )?;

    let png = std::fs::read(&good)?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.png", png[..png.len() / 3].to_vec(), "png"),
        (
            "garbage.jpg",
            b"\xff\xd8\xff\xe0 this is not really a jpeg".to_vec(),
            "jpeg",
        ),
        ("zero.png", Vec::new(), "empty"),
        (
            "text.png",
            b"hello, I am a text file".to_vec(),
            "png or jpeg",
        ),
        (
            "huge.png",
            huge_png_header(12_000, 9_000),
            "4096x4096 limit",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes)?;
        let out = run(
            "edge-node",
            &[
                "--data",
                &d,
                "scan",
                "--json",
                p.to_str().unwrap_or_default(),
            ],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: should fail");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(
            err.to_lowercase().contains(needle),
            "{name}: {err:?} lacks {needle:?}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{name}: no verdict line for a bad file"
        );
    }
    // A directory and a missing file.
    for p in [tmp.path().to_path_buf(), tmp.path().join("missing.png")] {
        let out = run(
            "edge-node",
            &["--data", &d, "scan", p.to_str().unwrap_or_default()],
        )?;
        assert!(!out.status.success());
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    // A good frame after bad ones in the same call still works; the earlier visit stands.
    let (good2, _, _) = code_frame(tmp.path(), "good2", fixture::now())?;
    let zero = tmp.path().join("zero.png");
    let out = run(
        "edge-node",
        &[
            "--data",
            &d,
            "scan",
            "--json",
            zero.to_str().unwrap_or_default(),
            good2.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"accepted\""));
    assert_eq!(fixture::stored_records(&dev, &hub.data)?.len(), 2);
    Ok(())
}

/// A PNG whose header claims `w` x `h` pixels, with a tiny (invalid) body: the decoder must
/// refuse it from the header alone, before allocating anything of that size.
fn huge_png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // A short IDAT so decoders reach the point where they know the size.
    let idat: &[u8] = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(idat);
    out.extend_from_slice(&crc32(idat).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"IEND");
    out.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
