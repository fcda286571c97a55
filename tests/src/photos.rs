//! The real-photo corpus of issue 16: camera photos of QR codes from zxing's blackbox test sets
//! (`testdata/qr-photos/<category>/N.png` with the expected text in `N.txt`), each also at four
//! rotations (done here, not stored). Used by `tests/tests/decode_photos.rs` (the read-rate
//! floor) and `tests/benches/decode_photos.rs` (beside zxing-cpp).

use std::path::{Path, PathBuf};

use image::GrayImage;

/// One photo of the corpus as 8-bit luma, with the text its code holds.
pub struct Photo {
    /// The folder it came from (`qrcode-1` .. `qrcode-6`, zxing's set names).
    pub category: String,
    /// The file name without extension.
    pub name: String,
    /// The text zxing's `.txt` beside the image says the code holds.
    pub expected: String,
    pub luma: GrayImage,
}

/// `testdata/qr-photos` of this workspace.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/qr-photos")
}

/// Every photo of every category, in a stable order (category, then file name as a number).
///
/// Panics with the path on a missing or unreadable file: the corpus is part of the repository.
pub fn load_all() -> Vec<Photo> {
    let dir = corpus_dir();
    let mut categories: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable corpus folder").path())
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    let mut photos = Vec::new();
    for cat in categories {
        let category = cat
            .file_name()
            .expect("a folder name")
            .to_string_lossy()
            .into_owned();
        let mut images: Vec<PathBuf> = std::fs::read_dir(&cat)
            .unwrap_or_else(|e| panic!("{}: {e}", cat.display()))
            .map(|e| e.expect("readable corpus folder").path())
            .filter(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
            .collect();
        images.sort_by_key(|p| {
            let stem = p.file_stem().unwrap_or_default().to_string_lossy();
            (stem.parse::<u32>().unwrap_or(u32::MAX), stem.into_owned())
        });
        for path in images {
            let txt = path.with_extension("txt");
            let expected =
                std::fs::read_to_string(&txt).unwrap_or_else(|e| panic!("{}: {e}", txt.display()));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let luma = edge_node::frame::load_luma(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            photos.push(Photo {
                category: category.clone(),
                name: path
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                expected,
                luma,
            });
        }
    }
    photos
}

/// The four rotations zxing's blackbox tests use: 0, 90, 180 and 270 degrees clockwise.
pub const ROTATIONS: [u16; 4] = [0, 90, 180, 270];

/// `img` turned clockwise by `degrees` (one of [`ROTATIONS`]).
pub fn rotated(img: &GrayImage, degrees: u16) -> GrayImage {
    match degrees {
        90 => image::imageops::rotate90(img),
        180 => image::imageops::rotate180(img),
        270 => image::imageops::rotate270(img),
        _ => img.clone(),
    }
}

/// Whether a decoded text is the expected one. zxing's `.txt` files sometimes end with a
/// newline the code does not hold, so one trailing newline is ignored, as zxing's own tests do.
/// Photos that hold a second code beside the one their `.txt` names (`category/name`), with the
/// start of that code's text: reading it is no misread, and the frame counts as not read.
/// qrcode-2/16 is a "double QR", a small code printed inside a large one.
const OTHER_CODES: &[(&str, &str)] = &[("qrcode-2/16", "[内側QRコード]")];

/// Whether `decoded` is the other code printed in `photo` (`category/name`), not a misread.
pub fn is_other_code(photo: &str, decoded: &str) -> bool {
    OTHER_CODES
        .iter()
        .any(|(p, start)| *p == photo && decoded.starts_with(start))
}

pub fn matches(decoded: &str, expected: &str) -> bool {
    decoded == expected || decoded == expected.strip_suffix('\n').unwrap_or(expected)
}
