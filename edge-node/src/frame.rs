//! Camera frames to QR text: the edge node's only contact with pixels.
//!
//! A frame arrives as PNG or JPEG bytes (from a file or the camera), is decoded to 8-bit luma
//! under hard size limits, and is searched for QR codes: first by `rxing` (a pure-Rust port of
//! zxing's QR detector and decoder), then by our own locator (`finder`), then by `rqrr`. Each
//! misses codes in blurred, noisy, tilted or low-contrast frames that another reader or a cheap
//! preprocessing pass recovers, so when one rung finds nothing we climb a short *ladder* of such
//! passes and stop at the first one that decodes. The ladder's order comes from the damaged-frame corpus in `tests/` (see
//! `tests/tests/decode_corpus.rs`): cheap and often-successful steps first.
//!
//! Everything here treats the frame as hostile outside data: no panics on any input, no
//! allocation sized by an unchecked header, clear errors that say what to do, and no frame that
//! makes a reader work for seconds (a frame printed full of finder patterns is given neither to
//! rxing's detector nor to rqrr's rungs: see `RXING_MAX_ROW_HITS` and `finder::crowded`).

use std::fs::File;
use std::io::{Cursor, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits};

mod finder;

/// How large a frame may be, checked against the image header before a pixel is decoded.
///
/// A frame's bytes say little about its decoded size: a 300 KB PNG of 6,320 x 6,320 16-bit
/// RGBA pixels (zeros compress about a thousandfold) decodes to 320 MB, and six at once took a
/// device to 711 MB under a pixel-count limit alone. So both the sides and the decoded bytes
/// (in the decoder's own format, before it becomes 8-bit luma) are capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// The longest side, in pixels.
    pub max_side: u32,
    /// The most the decoded image may take in memory, in bytes.
    pub max_decoded_bytes: u64,
    /// Take only sequential (baseline or extended, SOF0/SOF1) JPEGs of 1 or 3 components,
    /// checked by reading the markers before the decoder sees the frame (see
    /// [`check_sequential_jpeg`]).
    pub sequential_jpeg_only: bool,
}

impl FrameLimits {
    /// Photos and `scan`: a phone's 12-megapixel photo (4032x3024) is 36 MiB as 8-bit RGB and
    /// fits; a QR code needs a few hundred pixels on a side, so larger photos can be shrunk
    /// before scanning. At the limit a decode takes 64 MiB plus 16 MiB of luma.
    pub const PHOTO: FrameLimits = FrameLimits {
        max_side: 4096,
        max_decoded_bytes: 64 * 1024 * 1024,
        sequential_jpeg_only: false,
    };
    /// The kiosk's camera frames: its page sends JPEGs 640 pixels wide, and HD (1920x1080, even
    /// as 16-bit RGBA) is more than a camera stream needs. Any frame then costs at most 16 MiB
    /// plus 4 MiB of luma, so the kiosk's few decodes at once stay well inside a small
    /// device's memory whatever a client on the LAN sends.
    ///
    /// The decoded-bytes cap counts the output image only. A progressive JPEG (SOF2, SOF10)
    /// makes the decoder keep every component's coefficients (2 bytes a sample) besides the
    /// output, and a 4-component (CMYK/YCCK) one decodes a fourth plane and converts it: both
    /// take far more than the cap per pixel, and the JPEG decoder takes no allocation limit.
    /// A browser canvas's `toBlob("image/jpeg")` gives baseline YCbCr, so the kiosk refuses
    /// the others from their markers, before decoding.
    pub const KIOSK: FrameLimits = FrameLimits {
        max_side: 2048,
        max_decoded_bytes: 16 * 1024 * 1024,
        sequential_jpeg_only: true,
    };
}

/// Frame files larger than this are refused without being read.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Frames with a side longer than this are downscaled by the ladder: `rqrr`'s cost grows with the
/// pixel count, while a QR code filling part of an HD frame still has plenty of pixels per module.
const DOWNSCALE_ABOVE: u32 = 1000;
/// The longer side after downscaling, roughly: frames shrink by the integer part of
/// `side / DOWNSCALE_TO` (at least 2), so 1920x1080 becomes 960x540 and 4000x3000 800x600.
const DOWNSCALE_TO: u32 = 800;
/// Frames whose longer side is at most this get the 2x-upscale rungs: a small code in a VGA frame
/// has about two pixels per module, too few for `rqrr`'s capstone search. Larger frames have the
/// pixels already, and a 4x larger image would cost too much.
const UPSCALE_UP_TO: u32 = 700;

/// What went wrong with a frame, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is empty (0 bytes): the camera delivered nothing; check the capture device")]
    Empty,
    #[error("frame is {looks_like}, not PNG or JPEG: configure the camera to deliver PNG or JPEG")]
    UnsupportedFormat { looks_like: &'static str },
    #[error(
        "frame is {width}x{height} pixels, over the {max_side}x{max_side} limit: lower the camera resolution (1920x1080 is plenty)"
    )]
    TooLarge {
        width: u32,
        height: u32,
        max_side: u32,
    },
    #[error(
        "frame is {width}x{height} pixels of {bytes_per_pixel} bytes each ({} MiB decoded), over the {} MiB a frame may take: send an 8-bit JPEG or PNG at camera resolution",
        .decoded_bytes.div_ceil(1024 * 1024),
        .limit / (1024 * 1024)
    )]
    TooDeep {
        width: u32,
        height: u32,
        bytes_per_pixel: u8,
        decoded_bytes: u64,
        limit: u64,
    },
    #[error(
        "frame would take more memory to decode than a camera frame may ({0}): lower the camera resolution or send an 8-bit JPEG"
    )]
    OverLimit(String),
    #[error("frame could not be decoded ({0}): it is truncated or corrupt; capture it again")]
    Undecodable(String),
    #[error(
        "frame is {0}; the kiosk takes baseline JPEG frames of 1 or 3 components (what a browser canvas gives) or PNG: send the camera frame as a baseline JPEG"
    )]
    UnsupportedJpeg(String),
    #[error("frame file {} does not exist: check the path", .path.display())]
    FileMissing { path: PathBuf },
    #[error("frame path {} is a directory: pass the path of an image file", .path.display())]
    IsDirectory { path: PathBuf },
    #[error("frame path {} is not a regular file: pass the path of an image file", .path.display())]
    NotRegularFile { path: PathBuf },
    #[error("frame file {} is empty (0 bytes): the capture failed; capture it again", .path.display())]
    EmptyFile { path: PathBuf },
    #[error(
        "frame file {} is {size} bytes, over the {limit}-byte limit: it is not a camera frame; check the path",
        .path.display()
    )]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read frame file {}: {source}; check its permissions", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One rung of the decoding ladder.
///
/// [`LadderStep::Plain`] always scans the frame as it came. On a frame longer than 1000 px on a
/// side, [`LadderStep::Downscale`] runs first and the later rungs work on its downscaled copy:
/// they are per-pixel passes, and the code still has enough pixels per module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LadderStep {
    /// `rqrr` on the frame as it came (its own row-wise adaptive threshold).
    Plain,
    /// Shrink a frame longer than 1000 px on a side by an integer factor (box average) to about
    /// 800 px, then `rqrr`.
    Downscale,
    /// 3x3 median filter (removes salt-and-pepper and sensor noise), then `rqrr`.
    Median,
    /// One global threshold chosen by Otsu's method (blur makes `rqrr`'s local threshold wander).
    Otsu,
    /// Threshold against the mean of a window a few modules wide (uneven light).
    AdaptiveMean,
    /// Median filter, then Otsu: noise and dust first, then one clean cut.
    MedianOtsu,
    /// Median filter, then the local-mean threshold.
    MedianAdaptive,
    /// Stretch the 1st..99th percentile to 0..255 (dim, low-contrast frames).
    Stretch,
    /// Enlarge a small frame 2x with bilinear interpolation (tiny codes, ~2 px per module).
    Upscale,
    /// Enlarge 2x, then Otsu: interpolation smooths blurred and noisy module edges before the cut.
    UpscaleOtsu,
    /// Block-local threshold (zxing's "hybrid" binariser: 8x8 blocks, each cut at the mean of the
    /// 5x5 blocks around it, flat blocks taken as background): uneven light and shadows across
    /// the code, which `rqrr`'s row-wise running mean follows badly in a rotated photo.
    Hybrid,
    /// The block-local threshold with dark and light swapped: light-on-dark codes (a code shown
    /// inverted, or printed light on a dark surface).
    HybridInverted,
    /// Halve the frame (2x2 box average), then the block-local threshold: photos whose modules
    /// are many pixels wide and soft, where an 8x8 block holds too little edge.
    HalfHybrid,
    /// The block-local threshold, then our own locator (`frame/finder.rs`: 1:1:3:1:1 finder
    /// patterns on scanlines, the alignment pattern by template, a perspective map of the
    /// module centres) hands `rqrr`'s decoder a sampled grid: small and tilted codes in photos
    /// where `rqrr`'s own capstone search finds no grid.
    Finder,
    /// Our locator on the global Otsu cut.
    FinderOtsu,
    /// Our locator on the local-mean threshold.
    FinderAdaptive,
    /// Enlarge a small frame 2x, then the block-local threshold and our locator (codes of 2-3
    /// pixels a module).
    FinderUpscale,
    /// The 3x3 median filter twice, then the second reader (`rxing`): sensor noise and dust.
    /// Only on a speckled frame once rxing's rung ran (see `Shared::skips`).
    MedianRxing,
    /// A second reader: `rxing`'s port of zxing-cpp's QR detector (finder-pattern sets on our
    /// block-local threshold, zxing's hybrid cut), every code in the frame, a KP1 one preferred.
    Rxing,
}

impl LadderStep {
    /// The ladder in the order [`decode_luma`] climbs it.
    //
    // Chosen with `ladder_step_matrix` in tests/tests/decode_corpus.rs: every step alone on the
    // 360 damaged VGA frames of the corpus, then a greedy pick of the step that rescues the most
    // of plain rqrr's misses per millisecond. Of plain's 133 misses, median+otsu rescued 58, then
    // otsu 12, upscale+otsu 14, then median 7 (median+adaptive ties with it within the timing
    // noise of a shared machine; median is the simpler). The ladder stops there: median+adaptive
    // (3 more), adaptive (1) and upscale (2) rescue too few to pay for themselves: every frame with
    // no code in it (most of what a door camera sees) climbs the whole ladder; stretch rescued
    // none (rqrr thresholds against the local mean, so low contrast alone does not hurt it).
    // Downscale comes first, before plain, because on HD frames it read as many codes as plain
    // rqrr at under half the cost.
    //
    // Issue 16 added two rungs from the real-photo corpus (testdata/qr-photos, zxing's blackbox
    // photos at four rotations; `DECODE_PHOTOS_STEPS=1 cargo bench -p tests --bench
    // decode_photos`): of the 191 of 716 frames the six rungs above missed, the block-local
    // `hybrid` threshold alone rescued 39 at 22 ms a frame, the most of any rung; the local-mean
    // `adaptive` 28. Hybrid goes right after plain (on photos it reads more frames alone than
    // plain does, 446 against 384), adaptive last. Inverting (0 reads) and halving (10) did not
    // pay.
    //
    // Then our own locator (`frame/finder.rs`, the `finder` rungs): alone on the 716 photo frames
    // it reads 614 at 5 ms a frame (debug build), more than any rqrr rung (hybrid 483 at 14 ms,
    // plain 421 at 14 ms); the greedy order over every rung (`DECODE_PHOTOS_STEPS=1`) is finder,
    // finder+upscale, hybrid, then median+otsu and smaller rescues (94 % in all). So the locator
    // goes first after the downscale, plain rqrr right after it (it reads most damaged frames of
    // the corpus, and no frame plain reads may be lost), the 2x-upscaled locator and hybrid
    // next, then the damaged-frame rungs. The local-mean `adaptive` rung left the ladder: after
    // the locator it rescued no photo.
    //
    // Then a second reader (`rxing`, a pure-Rust port of zxing; measured beside zxing-cpp in the
    // same bench): its zxing-cpp detector alone reads 655 of the 716 photo frames at 0.44 ms a
    // frame (release), more than any other rung at the least cost, and its grid decoder now
    // decodes what our locator samples (rqrr's grid decoder cost 0.25-3.4 ms a grid, more than
    // zxing-cpp's whole read). So it goes first, on the downscaled copy of an HD frame. Our
    // locator and its 2x rung follow (photos: +8 and +7 frames), then rxing on the median
    // (damaged frames: +14, the noise and salt-and-pepper kinds, at a third of what the rqrr
    // median rungs cost for them), then rqrr's rungs: plain, hybrid, median+otsu and median
    // still rescue 10 photos the rungs above miss. Otsu and upscale+otsu left the ladder (0 and
    // 1 rescues on both corpora after the rungs above). The ladder in order, with what each
    // rung adds and the cost so far: `DECODE_PHOTOS_STEPS=1` ("the ladder in order").
    //
    // rxing on the median now runs only on a speckled frame (`Shared::skips`), so it moved up
    // to second: a noisy frame gets it before the locators, a clean one never pays for it.
    pub const LADDER: [LadderStep; 9] = [
        LadderStep::Rxing,
        LadderStep::MedianRxing,
        LadderStep::Finder,
        LadderStep::FinderUpscale,
        LadderStep::Downscale,
        LadderStep::Plain,
        LadderStep::Hybrid,
        LadderStep::MedianOtsu,
        LadderStep::Median,
    ];

    /// The kiosk's live pass ([`decode_live_luma`]): what every frame of the camera stream
    /// gets, the full [`LadderStep::LADDER`] coming once a second. A frame longer than 1000 px
    /// on a side is downscaled first and the rungs work on the copy.
    //
    // Measured on both corpora (`cargo bench -p tests --bench decode_photos`, the live
    // columns): rxing's detector reads the most at the least cost, our locator rescues part of
    // what it misses (small and strongly tilted codes), rxing on the median filter the noisy
    // frames of a dim entrance. rqrr's own scan left the live pass: at 5-9 ms a frame it cost
    // more than the three together and, after them, rescued almost nothing; the full ladder
    // (rqrr's rungs included) still comes once a second.
    //
    // rxing on the median filter comes before the locator and only on a speckled frame (see
    // `Shared::skips`): it rescues noisy frames (sensor noise, dust) and nothing else, where
    // the locator rescues a few of each at a higher cost.
    pub const LIVE: [LadderStep; 3] = [
        LadderStep::Rxing,
        LadderStep::MedianRxing,
        LadderStep::Finder,
    ];

    /// Every step, including those measured but left off the ladder (for `ladder_step_matrix`).
    pub const ALL: [LadderStep; 19] = [
        LadderStep::Plain,
        LadderStep::Downscale,
        LadderStep::Median,
        LadderStep::Otsu,
        LadderStep::AdaptiveMean,
        LadderStep::MedianOtsu,
        LadderStep::MedianAdaptive,
        LadderStep::Stretch,
        LadderStep::Upscale,
        LadderStep::UpscaleOtsu,
        LadderStep::Hybrid,
        LadderStep::HybridInverted,
        LadderStep::HalfHybrid,
        LadderStep::Finder,
        LadderStep::FinderOtsu,
        LadderStep::FinderAdaptive,
        LadderStep::FinderUpscale,
        LadderStep::Rxing,
        LadderStep::MedianRxing,
    ];

    /// A short stable name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            LadderStep::Plain => "plain",
            LadderStep::Downscale => "downscale",
            LadderStep::Median => "median",
            LadderStep::Otsu => "otsu",
            LadderStep::AdaptiveMean => "adaptive",
            LadderStep::MedianOtsu => "median+otsu",
            LadderStep::MedianAdaptive => "median+adaptive",
            LadderStep::Stretch => "stretch",
            LadderStep::Upscale => "upscale",
            LadderStep::UpscaleOtsu => "upscale+otsu",
            LadderStep::Hybrid => "hybrid",
            LadderStep::HybridInverted => "hybrid-inverted",
            LadderStep::HalfHybrid => "half+hybrid",
            LadderStep::Finder => "finder",
            LadderStep::FinderOtsu => "finder+otsu",
            LadderStep::FinderAdaptive => "finder+adaptive",
            LadderStep::FinderUpscale => "finder+upscale",
            LadderStep::Rxing => "rxing",
            LadderStep::MedianRxing => "median+rxing",
        }
    }

    /// Whether this rung is one of `rqrr`'s own scans (its capstone search and grouping). Those
    /// are skipped on a frame crowded with finder-like patterns (`finder::crowded`), where
    /// rqrr's grouping ran for seconds (6 s for one 320x240 frame tiled with patterns).
    pub fn scans_with_rqrr(self) -> bool {
        !matches!(
            self,
            LadderStep::Finder
                | LadderStep::FinderOtsu
                | LadderStep::FinderAdaptive
                | LadderStep::FinderUpscale
                | LadderStep::Rxing
                | LadderStep::MedianRxing
        )
    }

    /// Whether this step does anything for an image of this size (a step that does not apply is
    /// skipped, not counted as an attempt).
    pub fn applies_to(self, width: u32, height: u32) -> bool {
        let side = width.max(height);
        match self {
            LadderStep::Downscale => side > DOWNSCALE_ABOVE,
            LadderStep::Upscale | LadderStep::UpscaleOtsu | LadderStep::FinderUpscale => {
                side <= UPSCALE_UP_TO
            }
            LadderStep::HalfHybrid => width.min(height) >= 2 * HYBRID_MIN_SIDE,
            _ => true,
        }
    }
}

/// What the ladder did with one frame: for benchmarks, the corpus report and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeStats {
    /// The decoded text, if any rung found a code.
    pub text: Option<String>,
    /// The rung that found it.
    pub step: Option<LadderStep>,
    /// How many `rqrr` scans ran (rungs that applied), including the successful one.
    pub attempts: u32,
}

/// Decode a PNG or JPEG frame and return the text of the QR code in it, if any, under
/// [`FrameLimits::PHOTO`].
///
/// `Ok(None)` means the frame was a valid image with no readable code.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<String>, FrameError> {
    decode_frame_within(bytes, FrameLimits::PHOTO)
}

/// [`decode_frame`] under other limits (the kiosk's).
pub fn decode_frame_within(
    bytes: &[u8],
    limits: FrameLimits,
) -> Result<Option<String>, FrameError> {
    let luma = load_luma_within(bytes, limits)?;
    Ok(decode_luma_stats(&luma).text)
}

/// [`decode_frame`], also reporting which ladder step succeeded.
pub fn decode_frame_stats(bytes: &[u8]) -> Result<DecodeStats, FrameError> {
    let luma = load_luma(bytes)?;
    Ok(decode_luma_stats(&luma))
}

/// Find and decode a QR code in an 8-bit luma image, climbing the ladder as needed.
pub fn decode_luma(img: &GrayImage) -> Option<String> {
    decode_luma_stats(img).text
}

/// [`decode_luma`], also reporting which ladder step succeeded.
pub fn decode_luma_stats(img: &GrayImage) -> DecodeStats {
    climb(img, &LadderStep::LADDER, false)
}

/// The kiosk's live pass: the rungs of [`LadderStep::LIVE`] in order, on the frame as it came
/// or, for a frame longer than 1000 px on a side, on its downscaled copy (then the rqrr rung is
/// reported as [`LadderStep::Downscale`], as the old single pass did).
pub fn decode_live_luma(img: &GrayImage) -> DecodeStats {
    climb(img, &LadderStep::LIVE, true)
}

/// Climbs `steps` on `img` until one reads a code. A large frame is downscaled first, and the
/// rungs other than `Plain` work on the copy; `Plain` scans the frame as it came, unless
/// `plain_on_copy` (the live pass: one rqrr scan, on the copy, reported as `Downscale`).
fn climb(img: &GrayImage, steps: &[LadderStep], plain_on_copy: bool) -> DecodeStats {
    let mut stats = DecodeStats {
        text: None,
        step: None,
        attempts: 0,
    };
    if img.width() == 0 || img.height() == 0 {
        return stats;
    }
    let small = LadderStep::Downscale
        .applies_to(img.width(), img.height())
        .then(|| downscale(img));
    let mut work = Shared::new(small.as_ref().unwrap_or(img));
    for &step in steps {
        if work.skips(step) {
            continue;
        }
        let (step, found) = match (step, &small) {
            (LadderStep::Downscale, None) => continue,
            (LadderStep::Downscale, Some(small)) => (step, scan_gray(small)),
            (LadderStep::Plain, Some(small)) if plain_on_copy => {
                (LadderStep::Downscale, scan_gray(small))
            }
            (LadderStep::Plain, _) => (step, scan_gray(img)),
            _ => {
                if !step.applies_to(work.img.width(), work.img.height()) {
                    continue;
                }
                (step, work.run(step))
            }
        };
        stats.attempts += 1;
        if let Some(text) = found {
            stats.text = Some(text);
            stats.step = Some(step);
            return stats;
        }
    }
    stats
}

/// Run one ladder step alone on `img` (`None` also when the step does not apply to its size).
///
/// For measuring the ladder: which frames each step rescues, and at what cost.
pub fn decode_step(img: &GrayImage, step: LadderStep) -> Option<String> {
    if img.width() == 0 || img.height() == 0 || !step.applies_to(img.width(), img.height()) {
        return None;
    }
    let mut work = Shared::new(img);
    if work.skips(step) {
        return None;
    }
    work.run(step)
}

/// The cost of each stage the rungs are made of, run once each on `img` (for the photo bench's
/// breakdown of where a frame's time goes; `DECODE_PHOTOS_STAGES=1`).
#[doc(hidden)]
pub fn stage_times(img: &GrayImage) -> Vec<(&'static str, std::time::Duration)> {
    use std::time::Instant;
    let mut out = Vec::new();
    if img.width() == 0 || img.height() == 0 {
        return out;
    }
    let mut time = |name: &'static str, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        out.push((name, start.elapsed()));
    };
    let mut cut = Packed::with_size(0, 0);
    time("hybrid threshold (packed)", &mut || cut = hybrid_cut(img));
    let mut hybrid = Vec::new();
    time("unpacked", &mut || hybrid = cut.to_bools());
    time("locator on it", &mut || {
        let _ = locate(img, &hybrid, Some(&cut));
    });
    time("rxing's own threshold (baseline)", &mut || {
        if let Ok(source) =
            rxing::Luma8Source::new_with_slice(img.as_raw(), img.width(), img.height())
        {
            let bitmap = rxing::BinaryBitmap::new(rxing::common::HybridBinarizer::new(source));
            let _ = bitmap.get_black_matrix();
        }
    });
    time("rxing's detector and decoder on it", &mut || {
        let _ = rxing_read(&cut);
    });
    time("rqrr scan, own threshold (plain)", &mut || {
        let _ = scan_gray(img);
    });
    time("rqrr scan of the hybrid bitmap", &mut || {
        let _ = scan_bitmap(img, &hybrid);
    });
    let mut up = GrayImage::new(0, 0);
    time("2x upscale", &mut || up = upscale2(img));
    let mut up_cut = Packed::with_size(0, 0);
    time("hybrid threshold of the 2x", &mut || {
        up_cut = hybrid_cut(&up)
    });
    time("locator on the 2x", &mut || {
        let _ = locate(&up, &up_cut.to_bools(), Some(&up_cut));
    });
    time("rqrr scan of the 2x, Otsu cut", &mut || {
        let _ = scan_otsu(&up);
    });
    let mut median = GrayImage::new(0, 0);
    time("3x3 median", &mut || median = median3(img));
    time("rqrr scan of the median, Otsu cut", &mut || {
        let _ = scan_otsu(&median);
    });
    out
}

/// What the rungs of one frame share, each made at most once per frame and only when a rung
/// asks for it: the block-local threshold (the locator's and rqrr's `hybrid` rung), the median
/// filter (three rungs) and the 2x enlargement (two rungs, the locator's with its own threshold).
struct Shared<'a> {
    img: &'a GrayImage,
    cut: Option<Packed>,
    /// What rxing's rung saw on the frame, once it ran.
    rxing: Option<RxingWork>,
    hybrid: Option<Vec<bool>>,
    median: Option<GrayImage>,
    up: Option<GrayImage>,
    crowded: Option<bool>,
}

impl<'a> Shared<'a> {
    fn new(img: &'a GrayImage) -> Self {
        Shared {
            img,
            cut: None,
            rxing: None,
            hybrid: None,
            median: None,
            up: None,
            crowded: None,
        }
    }

    /// Whether the frame is crowded with finder-like patterns ([`finder::crowded`] on the
    /// block-local threshold): rqrr's rungs are then skipped.
    fn crowded(&mut self) -> bool {
        if let Some(crowded) = self.crowded {
            return crowded;
        }
        let (w, h) = (self.img.width() as usize, self.img.height() as usize);
        let (cut, bits) = self.cut_and_bits();
        let crowded = finder::crowded(&finder::Bitmap {
            bits,
            w,
            h,
            packed: Some(cut),
        });
        self.crowded = Some(crowded);
        crowded
    }

    /// Whether `step` is left out on this frame: rqrr's rungs on a crowded frame, and rxing
    /// on the median filter once rxing's rung found the frame clean (not speckled): the median
    /// only ever rescued noisy frames (on the photo corpus it read none that the other rungs
    /// of the live pass missed), and it costs about what rxing's rung does.
    fn skips(&mut self, step: LadderStep) -> bool {
        match step {
            LadderStep::MedianRxing => self.rxing.is_some_and(|work| !work.speckled()),
            _ => step.scans_with_rqrr() && self.crowded(),
        }
    }

    fn cut(&mut self) -> &Packed {
        let img = self.img;
        self.cut.get_or_insert_with(|| hybrid_cut(img))
    }

    fn hybrid(&mut self) -> &[bool] {
        self.cut_and_bits().1
    }

    /// The block-local threshold packed (what rxing reads) and one `bool` a pixel (what our
    /// locator and rqrr's rungs read), each made at most once.
    fn cut_and_bits(&mut self) -> (&Packed, &[bool]) {
        let img = self.img;
        let cut = self.cut.get_or_insert_with(|| hybrid_cut(img));
        let bits = self.hybrid.get_or_insert_with(|| cut.to_bools());
        (cut, bits)
    }

    fn median(&mut self) -> &GrayImage {
        let img = self.img;
        self.median.get_or_insert_with(|| median3(img))
    }

    fn up(&mut self) -> &GrayImage {
        let img = self.img;
        self.up.get_or_insert_with(|| upscale2(img))
    }

    /// One rung on the frame (the caller checked that it applies).
    fn run(&mut self, step: LadderStep) -> Option<String> {
        let img = self.img;
        match step {
            LadderStep::Plain => scan_gray(img),
            LadderStep::Downscale => scan_gray(&downscale(img)),
            LadderStep::Median => scan_gray(self.median()),
            LadderStep::Otsu => scan_otsu(img),
            LadderStep::AdaptiveMean => scan_bitmap(img, &adaptive_mean(img)),
            LadderStep::MedianOtsu => scan_otsu(self.median()),
            LadderStep::MedianAdaptive => {
                let filtered = self.median();
                scan_bitmap(filtered, &adaptive_mean(filtered))
            }
            LadderStep::Stretch => scan_gray(&stretch(img)),
            LadderStep::Upscale => scan_gray(self.up()),
            LadderStep::UpscaleOtsu => scan_otsu(self.up()),
            LadderStep::Hybrid => scan_bitmap(img, self.hybrid()),
            LadderStep::HybridInverted => {
                let black: Vec<bool> = self.hybrid().iter().map(|b| !b).collect();
                scan_bitmap(img, &black)
            }
            LadderStep::HalfHybrid => {
                let half = downscale_by(img, 2);
                scan_bitmap(&half, &hybrid_binarize(&half))
            }
            LadderStep::Finder => {
                let (cut, bits) = self.cut_and_bits();
                locate(img, bits, Some(cut))
            }
            LadderStep::FinderOtsu => {
                let t = otsu_threshold(img);
                let black: Vec<bool> = img.as_raw().iter().map(|&v| v <= t).collect();
                locate(img, &black, None)
            }
            LadderStep::FinderAdaptive => locate(img, &adaptive_mean(img), None),
            LadderStep::FinderUpscale => {
                let up = self.up();
                let cut = hybrid_cut(up);
                locate(up, &cut.to_bools(), Some(&cut))
            }
            LadderStep::Rxing => {
                let (text, work) = rxing_read(self.cut());
                self.rxing = Some(work);
                text
            }
            // The median twice: sensor noise strong enough to defeat rxing on the frame leaves
            // specks through one pass (noise 50: one pass read 9 of the corpus's 10 frames,
            // two passes all 10, as rqrr's median rungs together did at 15 times the cost).
            LadderStep::MedianRxing => scan_rxing(&median3(self.median())),
        }
    }
}

/// Our own locator ([`finder`]) on a binarised image: `black` holds one entry per pixel of
/// `img`, row-major; `packed`, the same pixels packed, when the caller has them.
fn locate(img: &GrayImage, black: &[bool], packed: Option<&Packed>) -> Option<String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    guarded(|| {
        finder::decode(&finder::Bitmap {
            bits: black,
            w,
            h,
            packed,
        })
    })
}

/// Read a frame file into memory, refusing what cannot be a camera frame before reading it.
pub fn read_frame_file(path: &Path) -> Result<Vec<u8>, FrameError> {
    let io_err = |source: std::io::Error| FrameError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FrameError::FileMissing {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    if meta.is_dir() {
        return Err(FrameError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    // Devices and pipes report no meaningful length and may never end (/dev/zero).
    if !meta.is_file() {
        return Err(FrameError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    check_file_len(path, meta.len())?;
    let file = File::open(path).map_err(io_err)?;
    // The file may grow between metadata() and reading: never read more than the cap (+1 byte
    // to notice that it did).
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    check_file_len(path, bytes.len() as u64)?;
    Ok(bytes)
}

fn check_file_len(path: &Path, len: u64) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if len > MAX_FILE_BYTES {
        return Err(FrameError::FileTooLarge {
            path: path.to_path_buf(),
            size: len,
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(())
}

/// Sniff the container, check the header's dimensions, then decode to 8-bit luma, under
/// [`FrameLimits::PHOTO`].
pub fn load_luma(bytes: &[u8]) -> Result<GrayImage, FrameError> {
    load_luma_within(bytes, FrameLimits::PHOTO)
}

/// [`load_luma`] under other limits. Public for callers that choose their own rungs (the
/// kiosk's live camera stream).
pub fn load_luma_within(bytes: &[u8], limits: FrameLimits) -> Result<GrayImage, FrameError> {
    let format = sniff(bytes)?;
    if format == ImageFormat::Jpeg && limits.sequential_jpeg_only {
        check_sequential_jpeg(bytes)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The decoders' own ceiling too (the PNG decoder's buffers for chunks and rows), beside
    // the header checks below.
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(decoder_limits);
    let undecodable = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => FrameError::OverLimit(l.to_string()),
        e => FrameError::Undecodable(e.to_string()),
    };
    // `into_decoder` reads only the header; the pixel buffer is allocated by `from_decoder`,
    // after the size checks.
    let decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    if width.max(height) > limits.max_side {
        return Err(FrameError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    let decoded_bytes = decoder.total_bytes();
    if decoded_bytes > limits.max_decoded_bytes {
        return Err(FrameError::TooDeep {
            width,
            height,
            bytes_per_pixel: decoder.color_type().bytes_per_pixel(),
            decoded_bytes,
            limit: limits.max_decoded_bytes,
        });
    }
    let img = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    Ok(img.into_luma8())
}

/// Marker segments [`check_sequential_jpeg`] walks at most before the frame header.
const MAX_JPEG_SEGMENTS: usize = 256;

/// Reads a JPEG's markers up to its frame header (SOFn) and refuses, before any decoding,
/// what is not a sequential (SOF0 baseline or SOF1 extended, Huffman-coded) frame of 1 or 3
/// components: progressive (SOF2, SOF6, SOF10, SOF14), lossless, hierarchical and
/// arithmetic-coded frames, and 4-component (CMYK/YCCK) ones. Bounded: it reads only the
/// 2-byte lengths of the segments before the frame header (at most [`MAX_JPEG_SEGMENTS`] of
/// them) and never indexes past the end of `bytes`.
pub fn check_sequential_jpeg(bytes: &[u8]) -> Result<(), FrameError> {
    let damaged = |why: &str| FrameError::Undecodable(format!("JPEG markers: {why}"));
    if bytes.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return Err(damaged("no start-of-image marker"));
    }
    let mut at = 2usize;
    for _ in 0..MAX_JPEG_SEGMENTS {
        if bytes.get(at) != Some(&0xFF) {
            return Err(damaged("a segment does not start with a marker"));
        }
        // Fill bytes (0xFF) may precede a marker.
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let marker = *bytes
            .get(at)
            .ok_or_else(|| damaged("the frame ends before its frame header"))?;
        at += 1;
        match marker {
            // Standalone markers without a length: TEM, RSTn.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err(damaged("a second start-of-image marker")),
            0xD9 => return Err(damaged("the image ends before its frame header")),
            0xDA => return Err(damaged("a scan starts before the frame header")),
            _ => {}
        }
        let len = bytes
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| damaged("the frame ends inside a segment's length"))?;
        if len < 2 {
            return Err(damaged("a segment length under 2"));
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if !is_sof {
            at += len;
            continue;
        }
        let kind = match marker {
            0xC0 | 0xC1 => None,
            0xC2 => Some("a progressive JPEG (SOF2)"),
            0xCA => Some("a progressive arithmetic-coded JPEG (SOF10)"),
            0xC6 | 0xCE => Some("a progressive hierarchical JPEG"),
            0xC3 | 0xC7 | 0xCB | 0xCF => Some("a lossless JPEG"),
            0xC5 => Some("a hierarchical JPEG"),
            _ => Some("an arithmetic-coded JPEG"),
        };
        if let Some(kind) = kind {
            return Err(FrameError::UnsupportedJpeg(kind.into()));
        }
        // SOFn: length, precision, height, width, number of components.
        let components = *bytes
            .get(at + 7)
            .ok_or_else(|| damaged("the frame ends inside the frame header"))?;
        return match components {
            1 | 3 => Ok(()),
            4 => Err(FrameError::UnsupportedJpeg(
                "a 4-component (CMYK or YCCK) JPEG".into(),
            )),
            n => Err(FrameError::UnsupportedJpeg(format!(
                "a JPEG of {n} components"
            ))),
        };
    }
    Err(damaged("too many segments before the frame header"))
}

/// Recognise PNG and JPEG by their magic bytes; name what anything else looks like.
fn sniff(bytes: &[u8]) -> Result<ImageFormat, FrameError> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF];
    if bytes.is_empty() {
        return Err(FrameError::Empty);
    }
    if bytes.starts_with(PNG) {
        return Ok(ImageFormat::Png);
    }
    if bytes.starts_with(JPEG) {
        return Ok(ImageFormat::Jpeg);
    }
    let ftyp = bytes.get(4..8) == Some(b"ftyp");
    let looks_like = if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        "a GIF image"
    } else if bytes.starts_with(b"BM") {
        "a BMP image"
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        "a WebP image"
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        "a TIFF image"
    } else if ftyp {
        "a HEIF/AVIF image or MP4 video"
    } else if bytes.starts_with(b"%PDF") {
        "a PDF document"
    } else if bytes.starts_with(b"PK\x03\x04") {
        "a ZIP archive"
    } else if bytes.starts_with(b"\x89PNG") {
        "a PNG with a damaged signature"
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        "a JPEG with a damaged header"
    } else if bytes
        .iter()
        .take(256)
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "text"
    } else {
        "unrecognised binary data"
    };
    Err(FrameError::UnsupportedFormat { looks_like })
}

/// Run `rqrr` with its own thresholding on a gray image.
fn scan_gray(img: &GrayImage) -> Option<String> {
    if img.width() == 0 || img.height() == 0 {
        return None;
    }
    guarded(|| pick_text(rqrr::PreparedImage::prepare(img.clone()).detect_grids()))
}

/// Run `rqrr` on a binarised image: `black` holds one entry per pixel of `img`, row-major.
fn scan_bitmap(img: &GrayImage, black: &[bool]) -> Option<String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || black.len() != w * h {
        return None;
    }
    guarded(|| {
        let mut prepared = rqrr::PreparedImage::prepare_from_bitmap(w, h, |x, y| black[y * w + x]);
        pick_text(prepared.detect_grids())
    })
}

fn scan_otsu(img: &GrayImage) -> Option<String> {
    let t = otsu_threshold(img);
    let black: Vec<bool> = img.as_raw().iter().map(|&v| v <= t).collect();
    scan_bitmap(img, &black)
}

/// `rqrr` is known to panic on some degenerate capstone geometry (rqrr issue #54, an assertion
/// in `Perspective::map`, still open for 0.11). A hostile or unlucky frame must give "no code",
/// not kill the check-in loop, so each scan is isolated. `AssertUnwindSafe` holds: the closure
/// owns or only reads its state, and nothing it touched is used after a panic.
///
/// Such a panic is expected, so it is not printed with a backtrace to the device's stderr (one
/// a frame, ten frames a second, from whoever holds a crafted picture to the camera): it is
/// counted ([`reader_panics`]) and logged at debug level. Panics anywhere else still reach the
/// process's panic hook as before.
fn guarded(scan: impl FnOnce() -> Option<String>) -> Option<String> {
    quiet_panic_hook();
    GUARDED.with(|depth| depth.set(depth.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(scan));
    GUARDED.with(|depth| depth.set(depth.get() - 1));
    result.ok().flatten()
}

thread_local! {
    /// How many [`guarded`] calls this thread is inside.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Panics of the readers caught by [`guarded`] since the process started.
static READER_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a QR reader panicked on a frame (and the frame was read as "no code") since
/// the process started.
pub fn reader_panics() -> u64 {
    READER_PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs, once, a panic hook in front of the one in place: a panic on a thread inside
/// [`guarded`] is counted and logged at debug level; any other goes to the previous hook.
fn quiet_panic_hook() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|depth| depth.get()) > 0 {
                READER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                tracing::debug!(%message, %at, "a QR reader panicked on a frame; read as no code");
            } else {
                previous(info);
            }
        }));
    });
}

/// Decode every grid `rqrr` finds; prefer a KP1 token over any other code in the same frame.
fn pick_text<G: rqrr::BitGrid>(grids: Vec<rqrr::Grid<G>>) -> Option<String> {
    prefer_check_in(grids.iter().filter_map(grid_text))
}

/// Of the texts of one frame's codes, in the order a reader decodes them, the first KP1
/// check-in code, else the first other one (a poster's URL code next to the phone must not
/// hide the check-in code). Every reader's rule; decoding stops at the check-in code.
fn prefer_check_in(texts: impl IntoIterator<Item = String>) -> Option<String> {
    let mut first_other = None;
    for text in texts {
        if text.starts_with(shared::token::PREFIX) {
            return Some(text);
        }
        first_other.get_or_insert(text);
    }
    first_other
}

/// At most this many of the finder patterns rxing's detector finds in a frame (the largest) are
/// grouped into threes: its grouping looks at every triple, so a frame printed full of finder
/// patterns (a hostile poster, a tiled test card) cost rxing's own reader 1 s at VGA and 6 s
/// at 1000x750 before this cap. A real frame shows three a code.
const RXING_MAX_PATTERNS: usize = 24;
/// At most this many of its best-shaped triples are sampled and decoded a frame.
const RXING_MAX_SETS: usize = 16;
/// More finder-like row hits than this (1:1:3:1:1 windows that pass zxing's plausibility test,
/// on the rows rxing's detector scans, every third) and the frame is given up as crowded: the
/// detector deduplicates every hit against every pattern found so far (quadratic: 63 ms for
/// the 4,800 patterns of a VGA frame tiled with them, 467 ms at 1000x1000, before this limit).
/// A real frame holds a few dozen to a few hundred (three patterns a code, each hit on several
/// rows, plus texture; at most 567 in the corpora), sensor noise over a thousand.
const RXING_MAX_ROW_HITS: usize = 1500;
/// At most this many pixels of failed concentric-pattern searches (the widths of the row hits
/// rxing's `LocateConcentricPattern` tried and refused, summed) a frame. Each search traces up
/// to 24 times the hit's width before it gives up, and a refused hit is searched again on each
/// row it spans: a reviewer's poster of finder-like patterns with a bridge, a gap and combs
/// that defeat the search (1000x1000, modules of 8-30 px) cost 60-110 ms a pass while staying
/// under the row-hit limit. The most any frame of the corpora spends is 19,796 (a real photo
/// with texture beside the code; noisy frames reach the row-hit limit near 18,000 first).
const RXING_MAX_FAILED_WIDTH: usize = 32_768;

/// The second reader ([`LadderStep::Rxing`]): `rxing`'s port of zxing-cpp's QR detector and
/// decoder, driven here rather than through its `QrReader`, on our block-local threshold
/// ([`hybrid_binarize`], the same cut as zxing's hybrid binariser, computed once a frame and
/// shared with our locator) so that the work a frame can cause is bounded
/// ([`RXING_MAX_ROW_HITS`], [`RXING_MAX_PATTERNS`], [`RXING_MAX_SETS`]) and only full-size QR
/// codes are looked for. Every code found is decoded; a KP1 one is preferred.
fn scan_rxing(img: &GrayImage) -> Option<String> {
    rxing_read(&hybrid_cut(img)).0
}

/// What [`rxing_read`] did with a frame: finder-like row hits, patterns found, grouped,
/// triples decoded, and whether it gave up on a crowded frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RxingWork {
    /// Runs on the scanned rows, and how many of them were one pixel long (speckle).
    runs: usize,
    speckle: usize,
    hits: usize,
    /// The widths of the hits rxing's concentric-pattern search tried and refused, summed.
    failed_width: usize,
    found: usize,
    grouped: usize,
    tried: usize,
    crowded: bool,
}

/// One run in this many on rxing's scan rows a single pixel long makes a frame *speckled*:
/// sensor noise or dust, which the median filter clears. On the corpora: real photos that
/// rxing misses stay under 1 in 6 (0.16), salt-and-pepper frames reach 0.27 and more, noisy
/// low-light frames 0.47.
const SPECKLED_ONE_IN: usize = 5;

impl RxingWork {
    fn speckled(&self) -> bool {
        self.speckle * SPECKLED_ONE_IN > self.runs
    }
}

/// [`scan_rxing`] on a frame already cut.
fn rxing_read(packed: &Packed) -> (Option<String>, RxingWork) {
    use rxing::common::DetectorRXingResult;
    use rxing::qrcode::cpp_port::{decoder, detector};
    let mut work = RxingWork::default();
    // Run lengths and a row's number of runs (up to its width + 2) are rxing's 16-bit counts;
    // the ladder hands it at most 1000 px a side.
    if packed.w == 0 || packed.height() == 0 || packed.w > usize::from(u16::MAX) - 2 {
        return (None, work);
    }
    let text = guarded(|| {
        let matrix = packed.bit_matrix()?;
        let mut patterns = finder_patterns(&matrix, packed, &mut work)?;
        work.found = patterns.len();
        patterns.sort_by_key(|p| std::cmp::Reverse(p.size));
        patterns.truncate(RXING_MAX_PATTERNS);
        work.grouped = patterns.len();
        let mut used = Vec::new();
        let texts = detector::GenerateFinderPatternSets(&mut patterns)
            .into_iter()
            .take(RXING_MAX_SETS)
            .filter_map(|set| {
                if [set.bl, set.tl, set.tr].iter().any(|p| used.contains(p)) {
                    return None;
                }
                work.tried += 1;
                let sampled = detector::SampleQR(&matrix, &set).ok()?;
                let decoded = decoder::Decode(sampled.getBits()).ok()?;
                if !decoded.isValid() {
                    return None;
                }
                used.extend([set.bl, set.tl, set.tr]);
                Some(decoded.text())
            });
        prefer_check_in(texts)
    });
    (text, work)
}

/// A cut frame packed a machine word of pixels at a time (bit `x % BITS` of word
/// `y * stride + x / BITS`, set = dark), rxing's own layout: the bit matrix is made from it a
/// row at a time, and a row's run lengths come from its transitions, a word at a time.
struct Packed {
    words: Vec<usize>,
    stride: usize,
    w: usize,
}

impl Packed {
    const BITS: usize = usize::BITS as usize;

    /// An all-light frame of `w` x `h` pixels.
    fn with_size(w: usize, h: usize) -> Packed {
        let stride = w.div_ceil(Self::BITS);
        Packed {
            words: vec![0; stride * h],
            stride,
            w,
        }
    }

    /// Row `y`: pixel `x` dark where `line[x] <= cut[x]` (both `w` long). Sixty-four pixels
    /// compared at once into 0/1 bytes (vector code), then each eight gathered into a byte by
    /// one multiplication: each byte's bit lands at a distinct place of the product's top byte,
    /// without carries.
    fn set_row_at_or_below(&mut self, y: usize, line: &[u8], cut: &[u8]) {
        const BITS: usize = Packed::BITS;
        let words = &mut self.words[y * self.stride..(y + 1) * self.stride];
        let (pixels, cuts) = (line.chunks_exact(BITS), cut.chunks_exact(BITS));
        let (last_pixels, last_cuts) = (pixels.remainder(), cuts.remainder());
        let gather = |dark: &[u8; BITS]| {
            let mut bits = 0usize;
            for (i, eight) in dark.chunks_exact(8).enumerate() {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(eight);
                let byte = u64::from_le_bytes(bytes).wrapping_mul(0x0102_0408_1020_4080) >> 56;
                bits |= (byte as usize) << (8 * i);
            }
            bits
        };
        let mut dark = [0u8; BITS];
        for (word, (pixels, cuts)) in words.iter_mut().zip(pixels.zip(cuts)) {
            for ((d, &v), &c) in dark.iter_mut().zip(pixels).zip(cuts) {
                *d = u8::from(v <= c);
            }
            *word = gather(&dark);
        }
        if !last_pixels.is_empty() {
            dark.fill(0);
            for ((d, &v), &c) in dark.iter_mut().zip(last_pixels).zip(last_cuts) {
                *d = u8::from(v <= c);
            }
            if let Some(word) = words.last_mut() {
                *word = gather(&dark);
            }
        }
    }

    /// One `bool` a pixel, row-major, `true` = dark (what our locator and rqrr's rungs read).
    fn to_bools(&self) -> Vec<bool> {
        let mut out = vec![false; self.w * self.height()];
        for (line, words) in out
            .chunks_exact_mut(self.w.max(1))
            .zip(self.words.chunks_exact(self.stride.max(1)))
        {
            for (pixels, &word) in line.chunks_mut(Self::BITS).zip(words) {
                for (i, dark) in pixels.iter_mut().enumerate() {
                    *dark = (word >> i) & 1 == 1;
                }
            }
        }
        out
    }

    /// `black` (`w` entries a row, `true` = dark) packed.
    #[cfg(test)]
    fn from_bools(black: &[bool], w: usize) -> Packed {
        let mut packed = Packed::with_size(w, black.len() / w);
        for (y, line) in black.chunks_exact(w).enumerate() {
            let line: Vec<u8> = line.iter().map(|&d| u8::from(!d)).collect();
            packed.set_row_at_or_below(y, &line, &vec![0; w]);
        }
        packed
    }

    fn height(&self) -> usize {
        self.words.len().checked_div(self.stride).unwrap_or(0)
    }

    fn bit_matrix(&self) -> Option<rxing::common::BitMatrix> {
        let mut matrix = rxing::common::BitMatrix::new(
            u32::try_from(self.w).ok()?,
            u32::try_from(self.height()).ok()?,
        )
        .ok()?;
        let mut row = rxing::common::BitArray::with_size(self.w);
        for (y, words) in self.words.chunks_exact(self.stride.max(1)).enumerate() {
            for (i, &word) in words.iter().enumerate() {
                row.setBulk(i * Self::BITS, word);
            }
            matrix.setRow(u32::try_from(y).ok()?, &row);
        }
        Some(matrix)
    }

    /// Row `y`'s run lengths, light run first (0 when the row starts dark) and a closing 0
    /// after a dark last run, as rxing's `PatternRow` holds them. The caller keeps rows at most
    /// `u16::MAX` long.
    fn runs_white_first(&self, y: usize, runs: &mut Vec<u16>) {
        runs.clear();
        let words = &self.words[y * self.stride..(y + 1) * self.stride];
        let mut last = 0usize;
        let mut carry = 0usize;
        for (i, &word) in words.iter().enumerate() {
            // Bit x set where pixel x differs from pixel x - 1 (the row starts light).
            let mut changes = word ^ ((word << 1) | carry);
            carry = word >> (Self::BITS - 1);
            let left = self.w - i * Self::BITS;
            if left < Self::BITS {
                changes &= (1usize << left) - 1;
            }
            while changes != 0 {
                let x = i * Self::BITS + changes.trailing_zeros() as usize;
                runs.push((x - last) as u16);
                last = x;
                changes &= changes - 1;
            }
        }
        runs.push((self.w - last) as u16);
        let last_dark = (words[(self.w - 1) / Self::BITS] >> ((self.w - 1) % Self::BITS)) & 1 == 1;
        if last_dark {
            runs.push(0);
        }
    }
}

/// The finder patterns of a cut frame as zxing-cpp's detector finds them (every third row
/// scanned for plausible 1:1:3:1:1 windows, each confirmed as concentric squares around its
/// centre unless it lies inside one already found), with the run lengths taken from the
/// packed rows' transitions rather than bit by bit from the matrix. `None` when the frame is crowded
/// ([`RXING_MAX_ROW_HITS`], [`RXING_MAX_FAILED_WIDTH`]).
fn finder_patterns(
    matrix: &rxing::common::BitMatrix,
    packed: &Packed,
    work: &mut RxingWork,
) -> Option<Vec<rxing::common::cpp_essentials::ConcentricPattern>> {
    use rxing::common::cpp_essentials::{
        FindLeftGuardBy, FixedPattern, IsPattern, LocateConcentricPattern, PatternType, PatternView,
    };
    const FINDER: FixedPattern<5, 7, false> = FixedPattern::new([1, 1, 3, 1, 1]);
    // zxing's quick test before the ratio test: a wide centre, narrow sides.
    let plausible = |view: &PatternView, space: Option<f32>| {
        view[2_usize] >= 3
            && view[2_usize] >= 2 * view[0_usize].max(view[4_usize])
            && view[2_usize] >= view[1_usize].max(view[3_usize])
            && IsPattern::<true, 5, 7, false>(view, &FINDER, space, 0.1, 0.0, 0.0) != 0.0
    };
    let mut found: Vec<rxing::common::cpp_essentials::ConcentricPattern> = Vec::new();
    let mut runs = Vec::new();
    for y in (2..packed.height()).step_by(3) {
        packed.runs_white_first(y, &mut runs);
        work.runs += runs.len();
        work.speckle += runs.iter().filter(|&&r| r == 1).count();
        let mut next = PatternView::from_slice(&runs);
        while let Ok(hit) = FindLeftGuardBy::<5, _>(next, 5, plausible) {
            next = hit;
            if !next.isValid() {
                break;
            }
            work.hits += 1;
            if work.hits > RXING_MAX_ROW_HITS {
                work.crowded = true;
                return None;
            }
            let centre = rxing::point(
                f32::from(next.pixelsInFront())
                    + f32::from(next[0_usize])
                    + f32::from(next[1_usize])
                    + f32::from(next[2_usize]) / 2.0,
                y as f32 + 0.5,
            );
            let inside_one = found
                .iter()
                .any(|old| rxing::Point::distance(centre, old.p) < old.size as f32 / 2.0);
            if !inside_one {
                let width: PatternType = (0..5_usize).map(|i| next[i]).sum();
                if let Some(pattern) = LocateConcentricPattern::<true, 5, 7>(
                    matrix,
                    &FINDER.into(),
                    centre,
                    // 3 for very skewed samples, as zxing-cpp allows.
                    i32::from(width) * 3,
                ) {
                    found.push(pattern);
                } else {
                    work.failed_width += usize::from(width);
                    if work.failed_width > RXING_MAX_FAILED_WIDTH {
                        work.crowded = true;
                        return None;
                    }
                }
            }
            next.skipPair();
            next.skipPair();
            next.extend();
        }
    }
    Some(found)
}

/// The text of a grid our locator sampled (`bits`: `dim x dim` modules, row-major, `true` =
/// dark), through `rxing`'s grid decoder: format and version, Reed-Solomon correction, the
/// payload's segments and character sets, as zxing reads them. `rqrr`'s grid decoder would do
/// the same at 20-30 times the cost (its syndromes raise the generator to a power per symbol:
/// 0.25 ms for a version-4 grid, 3.4 ms for a version-18 one, against 0.01 and 0.1 ms), more
/// than zxing-cpp takes for the whole frame; every wrongly placed grid the locator tries costs
/// that too.
fn grid_bits_text(dim: usize, bits: &[bool]) -> Option<String> {
    let side = u32::try_from(dim).ok()?;
    if bits.len() != dim * dim {
        return None;
    }
    let mut matrix = rxing::common::BitMatrix::with_single_dimension(side).ok()?;
    for (i, _) in bits.iter().enumerate().filter(|(_, dark)| **dark) {
        matrix.set((i % dim) as u32, (i / dim) as u32);
    }
    let decoded = rxing::qrcode::decoder::qrcode_decoder::decode_bitmatrix(&matrix).ok()?;
    Some(decoded.getText().to_owned())
}

/// A grid's text, if `rqrr` decodes it. `rqrr` hands back the payload's bytes as they are: Kanji
/// segments as Shift_JIS, byte segments in whatever the encoder used. UTF-8 is taken as it is;
/// otherwise, as zxing does, Shift_JIS if the bytes are valid Shift_JIS (Japanese codes, by far
/// the most common non-UTF-8 ones), else ISO-8859-1 (the standard's default for byte mode).
/// A KP1 code is ASCII and takes the first branch.
fn grid_text<G: rqrr::BitGrid>(grid: &rqrr::Grid<G>) -> Option<String> {
    let mut bytes = Vec::new();
    grid.decode_to(&mut bytes).ok()?;
    Some(payload_text(bytes))
}

fn payload_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let bytes = e.into_bytes();
            match encoding_rs::SHIFT_JIS.decode_without_bom_handling_and_without_replacement(&bytes)
            {
                Some(text) => text.into_owned(),
                None => bytes.iter().map(|&b| char::from(b)).collect(),
            }
        }
    }
}

/// Shrink by an integer factor `k` (the longer side becomes 800 to 1600 px), averaging each
/// `k x k` block: a box filter cannot alias module edges, and it is far cheaper than resampling.
fn downscale(img: &GrayImage) -> GrayImage {
    let k = (img.width().max(img.height()) / DOWNSCALE_TO).max(2);
    downscale_by(img, k)
}

/// Shrink by the integer factor `k` (at least 1), averaging each `k x k` block.
fn downscale_by(img: &GrayImage, k: u32) -> GrayImage {
    let (w, h) = img.dimensions();
    let k = k.max(1);
    let (ow, oh) = (w / k, h / k);
    if ow == 0 || oh == 0 {
        // A frame thinner than the factor (1 x 2048): nothing of it survives, and no code fits.
        return GrayImage::new(ow, oh);
    }
    let (w, k) = (w as usize, k as usize);
    let area = (k * k) as u32;
    let src = img.as_raw();
    let mut out = GrayImage::new(ow, oh);
    let dst: &mut [u8] = &mut out;
    for (oy, dst_row) in dst.chunks_exact_mut(ow as usize).enumerate() {
        for (ox, px) in dst_row.iter_mut().enumerate() {
            let mut sum = 0u32;
            for dy in 0..k {
                let start = (oy * k + dy) * w + ox * k;
                for &v in &src[start..start + k] {
                    sum += u32::from(v);
                }
            }
            *px = ((sum + area / 2) / area) as u8;
        }
    }
    out
}

/// Enlarge 2x with bilinear interpolation (edge pixels repeat).
fn upscale2(img: &GrayImage) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = GrayImage::new(img.width() * 2, img.height() * 2);
    let dst: &mut [u8] = &mut out;
    let ow = 2 * w;
    for y in 0..h {
        let below = (y + 1).min(h - 1);
        for x in 0..w {
            let right = (x + 1).min(w - 1);
            let a = u16::from(src[y * w + x]);
            let b = u16::from(src[y * w + right]);
            let c = u16::from(src[below * w + x]);
            let d = u16::from(src[below * w + right]);
            let top = 2 * y * ow + 2 * x;
            dst[top] = a as u8;
            dst[top + 1] = (a + b).div_ceil(2) as u8;
            dst[top + ow] = (a + c).div_ceil(2) as u8;
            dst[top + ow + 1] = ((a + b + c + d + 2) / 4) as u8;
        }
    }
    out
}

/// 3x3 median with edges clamped.
///
/// Each column's three values are sorted once per row (shared by the three windows that hold
/// that column); the median of the nine is then the median of the largest of the three lows,
/// the median of the three middles and the smallest of the three highs: a dozen compares a pixel
/// instead of a sort (the 19-exchange network this replaced cost ten times as much).
fn median3(img: &GrayImage) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = GrayImage::new(img.width(), img.height());
    if w == 0 || h == 0 {
        return out;
    }
    let dst: &mut [u8] = &mut out;
    let (mut lo, mut mid, mut hi) = (vec![0u8; w], vec![0u8; w], vec![0u8; w]);
    let med3 = |a: u8, b: u8, c: u8| a.max(b).min(a.min(b).max(c));
    for (y, dst_row) in dst.chunks_exact_mut(w).enumerate() {
        let above = &src[y.saturating_sub(1) * w..][..w];
        let row = &src[y * w..][..w];
        let below = &src[(y + 1).min(h - 1) * w..][..w];
        for (((l, m), hh), ((&a, &b), &c)) in lo
            .iter_mut()
            .zip(&mut mid)
            .zip(&mut hi)
            .zip(above.iter().zip(row).zip(below))
        {
            *l = a.min(b).min(c);
            *hh = a.max(b).max(c);
            *m = med3(a, b, c);
        }
        let window = |x: usize| {
            let (l, r) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let max_lo = lo[l].max(lo[x]).max(lo[r]);
            let min_hi = hi[l].min(hi[x]).min(hi[r]);
            med3(max_lo, med3(mid[l], mid[x], mid[r]), min_hi)
        };
        if w < 3 {
            for (x, px) in dst_row.iter_mut().enumerate() {
                *px = window(x);
            }
            continue;
        }
        dst_row[0] = window(0);
        dst_row[w - 1] = window(w - 1);
        // The inside of the row as three shifted slices (vector code).
        let inside = dst_row[1..w - 1]
            .iter_mut()
            .zip(lo.iter().zip(&lo[1..]).zip(&lo[2..]))
            .zip(mid.iter().zip(&mid[1..]).zip(&mid[2..]))
            .zip(hi.iter().zip(&hi[1..]).zip(&hi[2..]));
        for (((px, ((&l0, &l1), &l2)), ((&m0, &m1), &m2)), ((&h0, &h1), &h2)) in inside {
            *px = med3(l0.max(l1).max(l2), med3(m0, m1, m2), h0.min(h1).min(h2));
        }
    }
    out
}

fn histogram(img: &GrayImage) -> [u64; 256] {
    let mut hist = [0u64; 256];
    for &v in img.as_raw() {
        hist[usize::from(v)] += 1;
    }
    hist
}

/// Otsu's threshold: the gray level that maximises the between-class variance. Pixels `<=` it are
/// dark.
fn otsu_threshold(img: &GrayImage) -> u8 {
    let hist = histogram(img);
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(v, &n)| v as f64 * n as f64)
        .sum();
    let (mut weight_dark, mut sum_dark) = (0u64, 0f64);
    let (mut best, mut best_var) = (0u8, -1f64);
    for (v, &n) in hist.iter().enumerate() {
        weight_dark += n;
        sum_dark += v as f64 * n as f64;
        let weight_light = total - weight_dark;
        if weight_dark == 0 || weight_light == 0 {
            continue;
        }
        let mean_dark = sum_dark / weight_dark as f64;
        let mean_light = (sum_all - sum_dark) / weight_light as f64;
        let var = weight_dark as f64 * weight_light as f64 * (mean_dark - mean_light).powi(2);
        if var > best_var {
            best_var = var;
            best = v as u8;
        }
    }
    best
}

/// Local-mean threshold over a square window about 1/16 of the shorter side (several modules of a
/// code that fills half the frame): a pixel is dark when it is clearly below its neighbourhood.
/// Returns one `bool` per pixel, row-major, `true` = dark.
fn adaptive_mean(img: &GrayImage) -> Vec<bool> {
    /// How far below the local mean (in gray levels) a pixel must be to count as dark; keeps flat
    /// noisy areas (quiet zone, background) from turning into speckle.
    const OFFSET: i64 = 6;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let radius = (w.min(h) / 32).max(4);
    // Integral image with a zero row and column in front; u64 because 40 MP x 255 overflows u32.
    let stride = w + 1;
    let mut integral = vec![0u64; stride * (h + 1)];
    let src = img.as_raw();
    for y in 0..h {
        let mut row_sum = 0u64;
        for x in 0..w {
            row_sum += u64::from(src[y * w + x]);
            integral[(y + 1) * stride + x + 1] = integral[y * stride + x + 1] + row_sum;
        }
    }
    let mut black = vec![false; w * h];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(radius), (y + radius + 1).min(h));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(radius), (x + radius + 1).min(w));
            let sum = integral[y1 * stride + x1] + integral[y0 * stride + x0]
                - integral[y0 * stride + x1]
                - integral[y1 * stride + x0];
            let area = ((y1 - y0) * (x1 - x0)) as i64;
            let v = i64::from(src[y * w + x]);
            black[y * w + x] = (v + OFFSET) * area < sum as i64;
        }
    }
    black
}

/// The side of a block of [`hybrid_binarize`], in pixels.
const HYBRID_BLOCK: usize = 8;
/// Images with a side shorter than this (5 blocks) get one global Otsu cut instead.
const HYBRID_MIN_SIDE: u32 = 5 * HYBRID_BLOCK as u32;
/// A block whose pixels span at most this many gray levels holds no edge: background.
const HYBRID_FLAT_RANGE: u32 = 24;

/// zxing's hybrid binariser, re-implemented: the image in 8x8 blocks; each block's level is its
/// mean, or for a flat block (no edge in it) a guess that it is background, taken from its
/// already-visited neighbours; each block is then cut at the mean level of the 5x5 blocks around
/// it. Local enough for shadows and uneven light, wide enough (40 px) that a module's inside
/// keeps its colour. Returns one `bool` per pixel, row-major, `true` = dark.
fn hybrid_binarize(img: &GrayImage) -> Vec<bool> {
    hybrid_cut(img).to_bools()
}

/// [`hybrid_binarize`], packed as rxing reads it (what its detector and our locator share).
fn hybrid_cut(img: &GrayImage) -> Packed {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    if img.width() < HYBRID_MIN_SIDE || img.height() < HYBRID_MIN_SIDE {
        let t = otsu_threshold(img);
        let cuts = vec![t; w];
        let mut packed = Packed::with_size(w, h);
        for (y, line) in src.chunks_exact(w.max(1)).enumerate() {
            packed.set_row_at_or_below(y, line, &cuts);
        }
        return packed;
    }
    const B: usize = HYBRID_BLOCK;
    let (bw, bh) = (w.div_ceil(B), h.div_ceil(B));
    // The last block in a row or column overlaps its neighbour instead of running off the image.
    let origin = |b: usize, side: usize| (b * B).min(side - B);
    // Each block's level, a row of blocks at a time: its 8 pixel rows folded column-wise into
    // a sum, a minimum and a maximum a column (whole rows at once, which the compiler turns
    // into vector code), then each block's 8 columns.
    let mut level = vec![0u32; bw * bh];
    let (mut col_sum, mut col_lo, mut col_hi) = (vec![0u16; w], vec![0u8; w], vec![0u8; w]);
    let (mut sum, mut lo, mut hi) = (vec![0u32; bw], vec![0u8; bw], vec![0u8; bw]);
    for by in 0..bh {
        let y0 = origin(by, h);
        col_sum.fill(0);
        col_lo.fill(u8::MAX);
        col_hi.fill(0);
        for line in src[y0 * w..].chunks_exact(w).take(B) {
            for (((s, l), hh), &v) in col_sum
                .iter_mut()
                .zip(&mut col_lo)
                .zip(&mut col_hi)
                .zip(line)
            {
                *s += u16::from(v);
                *l = (*l).min(v);
                *hh = (*hh).max(v);
            }
        }
        for bx in 0..bw {
            let x0 = origin(bx, w);
            sum[bx] = col_sum[x0..x0 + B].iter().map(|&v| u32::from(v)).sum();
            lo[bx] = col_lo[x0..x0 + B].iter().copied().fold(u8::MAX, u8::min);
            hi[bx] = col_hi[x0..x0 + B].iter().copied().fold(0, u8::max);
        }
        for bx in 0..bw {
            let (lo, hi) = (u32::from(lo[bx]), u32::from(hi[bx]));
            let mut avg = sum[bx] / (B * B) as u32;
            if hi - lo <= HYBRID_FLAT_RANGE {
                // Flat: assume background (light) unless the neighbours say the area is darker.
                avg = lo / 2;
                if by > 0 && bx > 0 {
                    let up = level[(by - 1) * bw + bx];
                    let left = level[by * bw + bx - 1];
                    let diag = level[(by - 1) * bw + bx - 1];
                    let neighbours = (up + 2 * left + diag) / 4;
                    if lo < neighbours {
                        avg = neighbours;
                    }
                }
            }
            level[by * bw + bx] = avg;
        }
    }
    // Each block's cut: the mean level of the 5x5 blocks around it (levels are at most 255).
    // (Sums of five along each row first, then of five of those down each column.)
    let mut across = vec![0u32; bw * bh];
    for (sums, levels) in across.chunks_exact_mut(bw).zip(level.chunks_exact(bw)) {
        for (bx, sum) in sums.iter_mut().enumerate() {
            let cx = bx.clamp(2, bw - 3);
            *sum = levels[cx - 2..=cx + 2].iter().sum();
        }
    }
    let mut cut = vec![0u8; bw * bh];
    for by in 0..bh {
        let cy = by.clamp(2, bh - 3);
        for bx in 0..bw {
            let total: u32 = (cy - 2..=cy + 2).map(|ny| across[ny * bw + bx]).sum();
            cut[by * bw + bx] = u8::try_from(total / 25).unwrap_or(u8::MAX);
        }
    }
    // A pixel takes the cut of the block that covers it last: its own, or the overlapping last
    // block of its row or column. Then one comparison a pixel, a row at a time.
    let block_of = |i: usize, side: usize, blocks: usize| {
        if i + B >= side { blocks - 1 } else { i / B }
    };
    let mut packed = Packed::with_size(w, h);
    let mut row_cut = vec![0u8; w];
    let mut row_block = usize::MAX;
    for (y, line) in src.chunks_exact(w).enumerate() {
        let by = block_of(y, h, bh);
        if by != row_block {
            row_block = by;
            for (bx, cuts) in row_cut.chunks_mut(B).enumerate() {
                cuts.fill(cut[by * bw + bx]);
            }
            row_cut[w - B..].fill(cut[by * bw + bw - 1]);
        }
        packed.set_row_at_or_below(y, line, &row_cut);
    }
    packed
}

/// Map the 1st..99th percentile of the histogram onto 0..255.
fn stretch(img: &GrayImage) -> GrayImage {
    let hist = histogram(img);
    let total: u64 = hist.iter().sum();
    let percentile = |p: u64| -> u8 {
        let target = total * p / 100;
        let mut seen = 0;
        for (v, &n) in hist.iter().enumerate() {
            seen += n;
            if seen > target {
                return v as u8;
            }
        }
        u8::MAX
    };
    let (lo, hi) = (percentile(1), percentile(99));
    let mut out = img.clone();
    if hi <= lo {
        return out;
    }
    let span = u32::from(hi - lo);
    let lut: [u8; 256] = std::array::from_fn(|v| {
        let v = (v as u8).clamp(lo, hi) - lo;
        ((u32::from(v) * 255 + span / 2) / span) as u8
    });
    let dst: &mut [u8] = &mut out;
    for px in dst {
        *px = lut[usize::from(*px)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const TOKEN: &str = "KP1:6BFOXN*TS0BB7D4.8MH7ALV.QS+6KMS1:3T0FQ5W  8W*J4WPU2:W6G7 AKC%Y$*0LP/N\
                         %D6 MGUZFKS8JAA5LZYS/E66UG7%Z0.6V4:HTO-W:6-6R/3*1KRK0C07%VNM.IA8D$8";

    /// A frame of pseudo-random texture (xorshift): light and dark blobs, edges, flat areas.
    fn texture(w: u32, h: u32, seed: u64) -> GrayImage {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base: Vec<u8> = (0..64).map(|_| (next() % 256) as u8).collect();
        GrayImage::from_fn(w, h, |x, y| {
            let blob = base[((x / 11 + y / 7 * 3) % 64) as usize];
            let grain = (next() % 40) as u8;
            image::Luma([if (x / 5 + y / 3) % 4 == 0 {
                blob / 3
            } else {
                blob.saturating_add(grain)
            }])
        })
    }

    /// rxing on the median filter runs only on a speckled frame, and before the locator there:
    /// a salt-and-pepper frame is read by it, a clean frame without a code never pays for it.
    #[test]
    fn the_median_rung_runs_only_on_speckled_frames() {
        let mut img = GrayImage::from_pixel(640, 480, image::Luma([200]));
        draw_code(&mut img, TOKEN, 4, 150, 80);
        let clean = img.clone();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for px in img.as_mut().iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match state % 16 {
                0 => *px = 0,
                1 => *px = 255,
                _ => {}
            }
        }
        let (_, work) = rxing_read(&hybrid_cut(&img));
        assert!(work.speckled(), "{work:?}");
        let stats = decode_live_luma(&img);
        assert_eq!(stats.text.as_deref(), Some(TOKEN));
        assert_eq!(stats.step, Some(LadderStep::MedianRxing));
        assert_eq!(stats.attempts, 2);
        // The same code without the speckle: rxing reads it first.
        let (_, work) = rxing_read(&hybrid_cut(&clean));
        assert!(!work.speckled(), "{work:?}");
        assert_eq!(decode_live_luma(&clean).step, Some(LadderStep::Rxing));
        // A clean frame without a code: rxing and the locator, no median.
        let empty = GrayImage::from_fn(640, 480, |x, y| {
            image::Luma([((x / 9 + y / 7) % 2 * 150 + 50) as u8])
        });
        let stats = decode_live_luma(&empty);
        assert_eq!((stats.text, stats.attempts), (None, 2));
    }

    /// zxing's hybrid cut written plainly, block by block, pixel by pixel: what the row-wise
    /// [`hybrid_binarize`] must equal.
    fn hybrid_by_blocks(img: &GrayImage) -> Vec<bool> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let px = |x: usize, y: usize| u32::from(img.as_raw()[y * w + x]);
        const B: usize = HYBRID_BLOCK;
        let (bw, bh) = (w.div_ceil(B), h.div_ceil(B));
        let origin = |b: usize, side: usize| (b * B).min(side - B);
        let mut level = vec![0u32; bw * bh];
        for by in 0..bh {
            for bx in 0..bw {
                let (x0, y0) = (origin(bx, w), origin(by, h));
                let values: Vec<u32> = (0..B * B).map(|i| px(x0 + i % B, y0 + i / B)).collect();
                let (lo, hi) = (*values.iter().min().unwrap(), *values.iter().max().unwrap());
                let mut avg = values.iter().sum::<u32>() / (B * B) as u32;
                if hi - lo <= HYBRID_FLAT_RANGE {
                    avg = lo / 2;
                    if by > 0 && bx > 0 {
                        let n = (level[(by - 1) * bw + bx]
                            + 2 * level[by * bw + bx - 1]
                            + level[(by - 1) * bw + bx - 1])
                            / 4;
                        if lo < n {
                            avg = n;
                        }
                    }
                }
                level[by * bw + bx] = avg;
            }
        }
        let mut black = vec![false; w * h];
        for by in 0..bh {
            for bx in 0..bw {
                let (cx, cy) = (bx.clamp(2, bw - 3), by.clamp(2, bh - 3));
                let mut total = 0;
                for ny in cy - 2..=cy + 2 {
                    for nx in cx - 2..=cx + 2 {
                        total += level[ny * bw + nx];
                    }
                }
                let (x0, y0) = (origin(bx, w), origin(by, h));
                for y in y0..y0 + B {
                    for x in x0..x0 + B {
                        black[y * w + x] = px(x, y) <= total / 25;
                    }
                }
            }
        }
        black
    }

    #[test]
    fn the_row_wise_hybrid_cut_equals_the_block_by_block_one() {
        for (i, (w, h)) in [
            (40, 40),
            (41, 47),
            (64, 64),
            (65, 130),
            (240, 240),
            (333, 77),
        ]
        .into_iter()
        .enumerate()
        {
            let img = texture(w, h, 7 + i as u64);
            assert_eq!(hybrid_binarize(&img), hybrid_by_blocks(&img), "{w}x{h}");
        }
    }

    /// The packed rows rxing reads hold the same pixels as the cut, and their run lengths are
    /// rxing's (`GetPatternRowTP` on its own bit matrix), at every width around a word's edge.
    #[test]
    fn packed_rows_and_their_runs_match_rxings_own() {
        use rxing::common::cpp_essentials::{GetPatternRowTP, PatternRow};
        for (i, w) in [1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 200]
            .into_iter()
            .enumerate()
        {
            let h = 5;
            let img = texture(w, h, 99 + i as u64);
            let t = otsu_threshold(&img);
            let mut black: Vec<bool> = img.as_raw().iter().map(|&v| v <= t).collect();
            // Rows that start and end dark, and one all dark.
            black[0] = true;
            black[w as usize - 1] = true;
            black[(w as usize) * 4..].fill(true);
            let packed = Packed::from_bools(&black, w as usize);
            let matrix = packed.bit_matrix().expect("a matrix");
            let mut runs = Vec::new();
            let mut theirs = PatternRow::default();
            for y in 0..h as usize {
                for x in 0..w as usize {
                    assert_eq!(matrix.get(x as u32, y as u32), black[y * w as usize + x]);
                }
                packed.runs_white_first(y, &mut runs);
                GetPatternRowTP(&matrix, y as u32, &mut theirs, false);
                let theirs: Vec<u16> = (0..theirs.len()).map(|i| theirs[i]).collect();
                assert_eq!(runs, theirs, "width {w}, row {y}");
            }
        }
    }

    /// A quiet-zoned QR code for `text`, `scale` pixels per module, placed at `(x0, y0)` on a
    /// light gray canvas.
    fn draw_code(canvas: &mut GrayImage, text: &str, scale: u32, x0: u32, y0: u32) {
        let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)
            .expect("test text fits a QR code");
        let n = code.width() as u32;
        let colors = code.to_colors();
        for my in 0..n + 8 {
            for mx in 0..n + 8 {
                let dark = mx >= 4
                    && my >= 4
                    && mx < n + 4
                    && my < n + 4
                    && colors[((my - 4) * n + (mx - 4)) as usize] == qrcode::Color::Dark;
                let v = if dark { 20 } else { 235 };
                for dy in 0..scale {
                    for dx in 0..scale {
                        canvas.put_pixel(
                            x0 + mx * scale + dx,
                            y0 + my * scale + dy,
                            image::Luma([v]),
                        );
                    }
                }
            }
        }
    }

    fn code_frame(text: &str) -> GrayImage {
        let mut img = GrayImage::from_pixel(640, 480, image::Luma([180]));
        draw_code(&mut img, text, 4, 150, 60);
        img
    }

    fn png(img: &GrayImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("PNG encoding to memory works");
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// A PNG whose valid IHDR claims `width x height` 8-bit gray pixels, followed by a tiny IDAT
    /// and IEND: a decoder that trusted the header would try to allocate width*height bytes.
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        png_claiming_as(width, height, 8, 0)
    }

    /// [`png_claiming`] with another bit depth and colour type (6: RGBA).
    fn png_claiming_as(width: u32, height: u32, depth: u8, colour: u8) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        // deflate, adaptive filtering, no interlace
        ihdr.extend_from_slice(&[depth, colour, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        // zlib stream of one empty stored block.
        chunk(
            &mut out,
            b"IDAT",
            &[0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0, 0, 0, 1],
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn crc32_matches_the_png_reference_value() {
        // CRC of the IEND chunk type, fixed in every PNG file.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn decodes_a_clean_png_frame() {
        let bytes = png(&code_frame(TOKEN));
        let stats = decode_frame_stats(&bytes).expect("valid PNG");
        assert_eq!(stats.text.as_deref(), Some(TOKEN));
        assert_eq!(stats.step, Some(LadderStep::Rxing));
        assert_eq!(stats.attempts, 1);
        for step in [LadderStep::Finder, LadderStep::Rxing] {
            assert_eq!(
                decode_step(&load_luma(&bytes).expect("valid PNG"), step).as_deref(),
                Some(TOKEN),
                "{step:?}"
            );
        }
        assert_eq!(
            decode_step(&load_luma(&bytes).expect("valid PNG"), LadderStep::Plain).as_deref(),
            Some(TOKEN)
        );
    }

    #[test]
    fn decodes_a_jpeg_frame() {
        let bytes = jpeg(&code_frame(TOKEN));
        assert_eq!(
            decode_frame(&bytes).expect("valid JPEG").as_deref(),
            Some(TOKEN)
        );
    }

    #[test]
    fn a_frame_without_a_code_is_none_after_the_whole_ladder() {
        let img = GrayImage::from_fn(640, 480, |x, y| image::Luma([((x ^ y) & 0xFF) as u8]));
        let stats = decode_frame_stats(&png(&img)).expect("valid PNG");
        assert_eq!(stats.text, None);
        assert_eq!(stats.step, None);
        // Every rung that applies to VGA ran: all but the downscale, and rxing on the median
        // (the frame is not speckled).
        assert_eq!(stats.attempts, LadderStep::LADDER.len() as u32 - 2);
    }

    #[test]
    fn prefers_the_kp1_code_over_another_code_in_the_frame() {
        // Both left-right orders, so the test fails whichever grid rqrr happens to report first.
        for kp1_left in [true, false] {
            let mut img = GrayImage::from_pixel(1000, 480, image::Luma([180]));
            let (a, b) = if kp1_left {
                (TOKEN, "HTTPS://EXAMPLE.ORG/MENU")
            } else {
                ("HTTPS://EXAMPLE.ORG/MENU", TOKEN)
            };
            draw_code(&mut img, a, 4, 20, 40);
            draw_code(&mut img, b, 4, 520, 40);
            assert_eq!(
                decode_luma(&img).as_deref(),
                Some(TOKEN),
                "kp1_left={kp1_left}"
            );
        }
    }

    #[test]
    fn returns_another_code_when_there_is_no_kp1() {
        let mut img = GrayImage::from_pixel(640, 480, image::Luma([180]));
        draw_code(&mut img, "HTTPS://EXAMPLE.ORG/MENU", 6, 100, 60);
        assert_eq!(
            decode_luma(&img).as_deref(),
            Some("HTTPS://EXAMPLE.ORG/MENU")
        );
    }

    #[test]
    fn the_hybrid_threshold_reads_a_code_and_takes_any_size() {
        // Light falling off from left to right across the code.
        let mut img = code_frame(TOKEN);
        for (x, _, px) in img.enumerate_pixels_mut() {
            px.0[0] = (u32::from(px.0[0]) * (640 + x) / 1280) as u8;
        }
        assert_eq!(
            decode_step(&img, LadderStep::Hybrid).as_deref(),
            Some(TOKEN)
        );
        // Under 5 blocks on a side (global cut instead), a side not a multiple of the block,
        // a single pixel: no panic, no code.
        for (w, h) in [(1, 1), (39, 40), (41, 43), (40, 200)] {
            let img = GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
            assert_eq!(decode_step(&img, LadderStep::Hybrid), None, "{w}x{h}");
            assert_eq!(hybrid_binarize(&img).len(), (w * h) as usize);
        }
    }

    /// zxing's qrcode-2 photos hold Japanese codes whose bytes are Shift_JIS: `rqrr` corrects
    /// them but its `decode` refuses non-UTF-8, so the old ladder read none of them.
    #[test]
    fn a_shift_jis_code_reads_as_its_text() {
        let byte_code = |bytes: &[u8]| {
            let code = qrcode::QrCode::with_error_correction_level(bytes, qrcode::EcLevel::M)
                .expect("fits a code");
            let n = code.width() as u32;
            let colors = code.to_colors();
            GrayImage::from_fn(320, 320, |x, y| {
                let (mx, my) = (x / 6, y / 6);
                let dark = (4..n + 4).contains(&mx)
                    && (4..n + 4).contains(&my)
                    && colors[((my - 4) * n + mx - 4) as usize] == qrcode::Color::Dark;
                image::Luma([if dark { 20 } else { 235 }])
            })
        };
        // "ﾃﾞｻﾞｲﾝQR 入り" in Shift_JIS: half-width katakana (one byte each) and two kanji.
        // Through rqrr: its bytes, read as UTF-8, else Shift_JIS, else ISO-8859-1.
        let sjis: &[u8] = &[
            0xC3, 0xDE, 0xBB, 0xDE, 0xB2, 0xDD, 0x51, 0x52, 0x20, 0x93, 0xFC, 0x82, 0xE8,
        ];
        assert_eq!(
            decode_step(&byte_code(sjis), LadderStep::Plain).as_deref(),
            Some("ﾃﾞｻﾞｲﾝQR 入り")
        );
        // Through the ladder (rxing first, which guesses the character set as zxing does): a
        // business card's Japanese text.
        let text = "デザインQRコード入りの名刺です";
        let (sjis, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
        assert!(!unmappable);
        assert_eq!(decode_luma(&byte_code(&sjis)).as_deref(), Some(text));
        // UTF-8 stays UTF-8; bytes that are neither are read as ISO-8859-1.
        assert_eq!(payload_text("KP1:é".as_bytes().to_vec()), "KP1:é");
        assert_eq!(payload_text(vec![b'a', 0xFF, 0xA0]), "a\u{ff}\u{a0}");
    }

    /// A frame printed full of finder patterns (a hostile poster held up to the door) made
    /// rxing's own reader group every triple of them: 1 s a VGA frame, 6 s at 1000x750. A
    /// frame with thousands is not given to rxing at all (`finder::crowded`, the next test);
    /// one with fewer than that gate's limit but more than a code's three still gets at most
    /// the largest `RXING_MAX_PATTERNS` grouped and `RXING_MAX_SETS` triples decoded. (A code
    /// among such decoys may then go unread by this rung: whoever holds up the poster could as
    /// well cover the camera.)
    #[test]
    fn a_frame_full_of_finder_patterns_costs_rxing_a_bounded_amount_of_work() {
        // 8 x 8 patterns of 3-pixel modules in one corner of a VGA frame.
        let img = GrayImage::from_fn(640, 480, |x, y| {
            let (tx, ty) = ((x % 27) / 3, (y % 27) / 3);
            let ring = (tx as i32 - 3).abs().max((ty as i32 - 3).abs());
            let dark = x < 8 * 27 && y < 8 * 27 && tx < 7 && ty < 7 && ring != 2;
            image::Luma([if dark { 20 } else { 230 }])
        });
        let (text, work) = rxing_read(&hybrid_cut(&img));
        assert_eq!(text, None);
        // More patterns than the cap reach the detector...
        assert!(work.found > 2 * RXING_MAX_PATTERNS, "{work:?}");
        // ...and the work stays bounded.
        assert_eq!(work.grouped, RXING_MAX_PATTERNS);
        assert!(work.tried <= RXING_MAX_SETS, "{work:?}");
        // A frame with one code: its three patterns, all grouped, and it reads.
        let mut img = GrayImage::from_pixel(640, 480, image::Luma([230]));
        draw_code(&mut img, TOKEN, 5, 100, 60);
        let (text, work) = rxing_read(&hybrid_cut(&img));
        assert_eq!(text.as_deref(), Some(TOKEN));
        assert_eq!((work.found, work.grouped, work.tried), (3, 3, 1));
    }

    /// A poster of finder-like patterns made to defeat rxing's concentric-pattern search (a
    /// bridge from the centre to the ring, a gap in the outer ring, combs of 1-px teeth above
    /// and below; a reviewer's recipe): every row hit through one starts a long contour trace
    /// that fails, and no pattern is ever found to stop the next row's hits. It stayed under
    /// the row-hit limit and cost 60-110 ms a pass at 1000x1000; the failed searches' budget
    /// ends it (about 35 ms, release).
    #[test]
    fn failed_concentric_searches_are_bounded_a_frame() {
        fn poster(w: u32, h: u32, m: u32, teeth: u32) -> GrayImage {
            let side = 7 * m;
            let (tile_w, tile_h) = (side + 3, side + 2 * teeth + 4);
            GrayImage::from_fn(w, h, |x, y| {
                let (tx, ty) = (x / tile_w, y / tile_h);
                let (lx, ly) = (x - tx * tile_w, y - ty * tile_h);
                let (ox, oy) = (1, teeth + 2);
                let inside = (tx + 1) * tile_w <= w && (ty + 1) * tile_h <= h;
                let dark = inside
                    && if (ox..ox + side).contains(&lx) && (oy..oy + side).contains(&ly) {
                        let (i, j) = (lx - ox, ly - oy);
                        let (mi, mj) = (i / m, j / m);
                        let ring = mi.min(mj).min(6 - mi).min(6 - mj);
                        let bridge = i == 2 * m + 1 && (m..2 * m).contains(&j);
                        let gap = (i == 5 * m || i == 5 * m + 1) && j >= 6 * m;
                        (ring != 1 || bridge) && !gap
                    } else {
                        let tooth_column = (ox + 2..ox + side - 2).contains(&lx)
                            && (lx - ox) % 2 == 0
                            && (i64::from(lx - ox) - i64::from(side / 2)).abs() > 2;
                        let above = ly < oy && ly + teeth >= oy;
                        let below = ly >= oy + side && ly < oy + side + teeth;
                        tooth_column && (above || below)
                    };
                image::Luma([if dark { 20 } else { 230 }])
            })
        }
        for (m, teeth) in [(8, 12), (16, 13), (30, 14)] {
            let img = poster(1000, 1000, m, teeth);
            let (text, work) = rxing_read(&hybrid_cut(&img));
            assert_eq!(text, None);
            assert!(work.crowded, "module {m}: {work:?}");
            assert!(work.hits <= RXING_MAX_ROW_HITS, "module {m}: {work:?}");
            // Given up within one search of the budget.
            assert!(
                work.failed_width <= RXING_MAX_FAILED_WIDTH + usize::from(u16::MAX),
                "module {m}: {work:?}"
            );
        }
        // A real frame with a code and texture around it stays well under the budget.
        let mut img = texture(640, 480, 5);
        draw_code(&mut img, TOKEN, 5, 160, 70);
        let (text, work) = rxing_read(&hybrid_cut(&img));
        assert_eq!(text.as_deref(), Some(TOKEN), "{work:?}");
        assert!(!work.crowded, "{work:?}");
    }

    /// A frame tiled with finder patterns of one-pixel modules (the reviewer's recipe): before
    /// the gates, rxing's detector spent 63 ms deduplicating 4,800 patterns at 640x480 (467 ms
    /// at 1000x1000), and rqrr's plain and hybrid scans 6 s each on 320x240. Now rxing's
    /// detector does not see the VGA one (its 1,200 patterns at 320x240 cost it a few ms),
    /// rqrr's rungs see neither; our locator (bounded) still looks.
    #[test]
    fn a_frame_crowded_with_finder_patterns_is_not_given_to_rxing_or_rqrr() {
        let tiled = |w: u32, h: u32| {
            GrayImage::from_fn(w, h, |x, y| {
                let (tx, ty) = (x % 8, y % 8);
                let ring = (tx as i32 - 3).abs().max((ty as i32 - 3).abs());
                let dark = tx < 7 && ty < 7 && ring != 2;
                image::Luma([if dark { 20 } else { 230 }])
            })
        };
        let vga = tiled(640, 480);
        let (text, work) = rxing_read(&hybrid_cut(&vga));
        assert_eq!(text, None);
        // Given up at the row-hit limit, before any pattern was grouped or decoded.
        assert!(work.crowded, "{work:?}");
        assert_eq!(work.hits, RXING_MAX_ROW_HITS + 1);
        assert_eq!((work.grouped, work.tried), (0, 0));
        let tile = tiled(320, 240);
        let stats = decode_luma_stats(&tile);
        assert_eq!(stats.text, None);
        let others = LadderStep::LADDER
            .iter()
            .filter(|s| !s.scans_with_rqrr() && s.applies_to(320, 240))
            .count();
        assert_eq!(stats.attempts as usize, others, "rqrr's rungs were skipped");
        assert_eq!(decode_step(&tile, LadderStep::Plain), None);
        // 90 patterns of 3-pixel modules in one corner of a VGA frame cost rqrr's rungs 0.47 s
        // under the first limit (96 candidates): crowded now.
        let corner = GrayImage::from_fn(640, 480, |x, y| {
            let (tx, ty) = ((x % 27) / 3, (y % 27) / 3);
            let ring = (tx as i32 - 3).abs().max((ty as i32 - 3).abs());
            let dark = x < 270 && y < 243 && tx < 7 && ty < 7 && ring != 2;
            image::Luma([if dark { 20 } else { 230 }])
        });
        assert!(Shared::new(&corner).crowded());
        // A real frame is not crowded: every rung may run on it.
        let mut img = GrayImage::from_pixel(640, 480, image::Luma([230]));
        draw_code(&mut img, TOKEN, 5, 100, 60);
        assert!(!Shared::new(&img).crowded());
        assert_eq!(decode_step(&img, LadderStep::Plain).as_deref(), Some(TOKEN));
    }

    /// A frame thinner than the downscale factor (1 x 2048) panicked in the downscale, outside
    /// the guard every scan has (`scan` crashed on it; the kiosk answered 500).
    #[test]
    fn a_frame_thinner_than_the_downscale_factor_is_no_code() {
        for (w, h) in [(1, 1001), (1, 2048), (3, 4096), (4096, 3), (2048, 1)] {
            let img = GrayImage::from_pixel(w, h, image::Luma([128]));
            assert_eq!(decode_luma(&img), None, "{w}x{h}");
            assert_eq!(decode_live_luma(&img).text, None, "{w}x{h}");
        }
    }

    #[test]
    fn a_panicking_scan_is_no_code() {
        assert_eq!(guarded(|| panic!("stands in for rqrr issue #54")), None);
        assert_eq!(guarded(|| Some("x".to_string())).as_deref(), Some("x"));
    }

    #[test]
    fn empty_input_is_an_empty_error() {
        assert!(matches!(decode_frame(&[]), Err(FrameError::Empty)));
    }

    #[test]
    fn garbage_is_unsupported() {
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let err = decode_frame(&garbage).expect_err("garbage is not a frame");
        assert!(
            matches!(
                err,
                FrameError::UnsupportedFormat {
                    looks_like: "unrecognised binary data"
                }
            ),
            "{err}"
        );
        let text = decode_frame(b"KP1:NOT AN IMAGE").expect_err("text is not a frame");
        assert!(matches!(
            text,
            FrameError::UnsupportedFormat { looks_like: "text" }
        ));
    }

    #[test]
    fn gif_is_unsupported_and_named() {
        let err = decode_frame(b"GIF89a\x01\x00\x01\x00\x80\x00\x00").expect_err("GIF");
        assert!(matches!(
            err,
            FrameError::UnsupportedFormat {
                looks_like: "a GIF image"
            }
        ));
        assert!(err.to_string().contains("GIF"), "{err}");
        assert!(err.to_string().contains("PNG or JPEG"), "{err}");
    }

    #[test]
    fn truncated_png_is_undecodable() {
        let bytes = png(&code_frame(TOKEN));
        for cut in [9, 40, bytes.len() / 2, bytes.len() - 13] {
            let err = decode_frame(&bytes[..cut]).expect_err("truncated");
            assert!(
                matches!(err, FrameError::Undecodable(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    fn jpeg(img: &GrayImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 80)
            .encode_image(img)
            .expect("JPEG encoding to memory works");
        bytes
    }

    #[test]
    fn truncated_jpeg_is_undecodable_or_codeless() {
        let bytes = jpeg(&code_frame(TOKEN));
        // Cut inside the headers: nothing to show.
        let err = decode_frame(&bytes[..200]).expect_err("headers cut");
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        // Cut inside the scan: the decoder may refuse it or paint the rest gray; either way no
        // panic and no wrong text.
        match decode_frame(&bytes[..bytes.len() / 3]) {
            Err(FrameError::Undecodable(_)) | Ok(None) => {}
            Ok(Some(text)) => assert_eq!(text, TOKEN),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// `bytes` (a baseline JPEG) with its frame header rewritten as `marker` (SOFn) with
    /// `components` components, all other segments as they were.
    fn with_frame_header(bytes: &[u8], marker: u8, components: u8) -> Vec<u8> {
        let sof = bytes
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline JPEG has SOF0");
        let len = usize::from(u16::from_be_bytes([bytes[sof + 2], bytes[sof + 3]]));
        let mut out = bytes[..sof].to_vec();
        let new_len = 8 + 3 * u16::from(components);
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&new_len.to_be_bytes());
        // Precision, height, width as they were.
        out.extend_from_slice(&bytes[sof + 4..sof + 9]);
        out.push(components);
        for id in 1..=components {
            out.extend_from_slice(&[id, 0x11, 0]);
        }
        out.extend_from_slice(&bytes[sof + 2 + len..]);
        out
    }

    /// Finding 3 of the edge review: the kiosk's pixel cap does not bound what a progressive
    /// or 4-component JPEG takes to decode, so those are refused from their markers, with a
    /// clear error, before any decoding; a baseline camera frame still decodes.
    #[test]
    fn the_kiosk_refuses_progressive_and_cmyk_jpegs_before_decoding() {
        let baseline = jpeg(&code_frame(TOKEN));
        assert_eq!(
            decode_frame_within(&baseline, FrameLimits::KIOSK).expect("a baseline frame"),
            Some(TOKEN.to_owned())
        );
        assert!(check_sequential_jpeg(&baseline).is_ok());
        // Extended sequential (SOF1) is decoded like baseline.
        assert!(check_sequential_jpeg(&with_frame_header(&baseline, 0xC1, 3)).is_ok());
        for (marker, components, says) in [
            (0xC2, 1, "progressive JPEG (SOF2)"),
            (0xC2, 3, "progressive JPEG (SOF2)"),
            (0xCA, 3, "progressive arithmetic-coded JPEG (SOF10)"),
            (0xC3, 1, "lossless"),
            (0xC0, 4, "4-component (CMYK or YCCK)"),
            (0xC1, 4, "4-component (CMYK or YCCK)"),
            (0xC0, 2, "2 components"),
        ] {
            let bytes = with_frame_header(&baseline, marker, components);
            for load in [
                load_luma_within(&bytes, FrameLimits::KIOSK).map(|_| ()),
                decode_frame_within(&bytes, FrameLimits::KIOSK).map(|_| ()),
            ] {
                let err = load.expect_err("refused");
                assert!(
                    matches!(err, FrameError::UnsupportedJpeg(_)),
                    "SOF {marker:#x} x{components}: {err}"
                );
                let msg = err.to_string();
                assert!(msg.contains(says) && msg.contains("baseline JPEG"), "{msg}");
            }
        }
    }

    #[test]
    fn the_jpeg_marker_walk_is_bounded_and_never_panics() {
        let baseline = with_frame_header(&jpeg(&GrayImage::new(16, 16)), 0xC2, 4);
        // Every prefix: refused with an error (the SOF is cut or missing), never a panic.
        for n in 0..baseline.len() {
            let _ = check_sequential_jpeg(&baseline[..n]);
        }
        assert!(matches!(
            check_sequential_jpeg(&baseline),
            Err(FrameError::UnsupportedJpeg(_))
        ));
        // A scan before any frame header, a zero length, endless empty segments.
        for bad in [
            vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x08],
            vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00],
            vec![0xFF, 0xD8, 0xFF, 0xD9],
            vec![0xFF, 0xD8, 0x00],
            [0xFF, 0xD8]
                .into_iter()
                .chain([0xFF, 0xFE, 0x00, 0x02].repeat(100_000))
                .collect(),
        ] {
            assert!(
                matches!(check_sequential_jpeg(&bad), Err(FrameError::Undecodable(_))),
                "{:?}",
                &bad[..bad.len().min(8)]
            );
        }
    }

    #[test]
    fn a_jpeg_claiming_100_megapixels_is_refused() {
        let mut bytes = jpeg(&GrayImage::new(16, 16));
        // Patch the baseline frame header (SOF0: FF C0, length, precision, height, width).
        let sof = bytes
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline JPEG has SOF0");
        bytes[sof + 5..sof + 7].copy_from_slice(&10_000u16.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&10_000u16.to_be_bytes());
        let start = Instant::now();
        let err = decode_frame(&bytes).expect_err("too large");
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    width: 10_000,
                    height: 10_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn colour_frames_are_converted_to_luma() {
        let gray = code_frame(TOKEN);
        let rgb = image::RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
            let v = gray.get_pixel(x, y)[0];
            image::Rgb([v, v / 2, 255 - (255 - v) / 2])
        });
        let mut bytes = Vec::new();
        rgb.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .expect("PNG encoding to memory works");
        assert_eq!(
            decode_frame(&bytes).expect("valid PNG").as_deref(),
            Some(TOKEN)
        );
    }

    #[test]
    fn png_with_a_corrupt_body_is_undecodable() {
        let mut bytes = png(&code_frame(TOKEN));
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5A;
        }
        let err = decode_frame(&bytes).expect_err("corrupt");
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
    }

    #[test]
    fn a_108_megapixel_header_is_refused_quickly_without_decoding() {
        let bytes = png_claiming(12_000, 9_000);
        let start = Instant::now();
        let err = decode_frame(&bytes).expect_err("too large");
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    width: 12_000,
                    height: 9_000,
                    max_side: 4096
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("12000x9000"), "{err}");
        // Allocating and inflating 108 MB would take far longer than this.
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_header_at_the_limits_passes_the_size_checks() {
        // 4096x4096 gray is allowed (16 MiB); the (empty) pixel data then fails to decode.
        let err = decode_frame(&png_claiming(4096, 4096)).expect_err("no pixel data");
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        // The kiosk's camera frames: 2048 on a side, and HD even as 16-bit RGBA (15.8 MiB).
        let kiosk = FrameLimits::KIOSK;
        for bytes in [png_claiming(2048, 2048), png_claiming_as(1920, 1080, 16, 6)] {
            let err = decode_frame_within(&bytes, kiosk).expect_err("no pixel data");
            assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        }
        let err = decode_frame_within(&png_claiming(2049, 100), kiosk).expect_err("too wide");
        assert!(
            matches!(err, FrameError::TooLarge { max_side: 2048, .. }),
            "{err}"
        );
    }

    /// The review's image bomb: 6,320 x 6,320 16-bit RGBA (39.9 MP, under the old 40 MP limit;
    /// 320 MB decoded) in a few hundred kilobytes of PNG. Only the header is needed to refuse
    /// it, so the header alone is what this test sends.
    #[test]
    fn a_16_bit_rgba_bomb_is_refused_from_its_header_without_decoding() {
        let bomb = png_claiming_as(6_320, 6_320, 16, 6);
        for limits in [FrameLimits::PHOTO, FrameLimits::KIOSK] {
            let start = Instant::now();
            let err = decode_frame_within(&bomb, limits).expect_err("a bomb");
            assert!(
                matches!(
                    err,
                    FrameError::TooLarge {
                        width: 6_320,
                        height: 6_320,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains("lower the camera resolution"),
                "{err}"
            );
            assert!(start.elapsed() < Duration::from_millis(500));
            assert!(matches!(
                load_luma_within(&bomb, limits),
                Err(FrameError::TooLarge { .. })
            ));
        }
        // Within the sides, too many bytes a pixel: 4000x3000 RGBA16 would take 92 MiB.
        let deep = png_claiming_as(4_000, 3_000, 16, 6);
        let err = decode_frame(&deep).expect_err("too deep");
        assert!(
            matches!(
                err,
                FrameError::TooDeep {
                    bytes_per_pixel: 8,
                    decoded_bytes: 96_000_000,
                    limit: 67_108_864,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("92 MiB decoded"), "{err}");
        assert!(err.to_string().contains("64 MiB"), "{err}");
    }

    #[test]
    fn otsu_splits_a_bimodal_histogram() {
        let img = GrayImage::from_fn(100, 10, |x, _| image::Luma([if x < 50 { 30 } else { 200 }]));
        let t = otsu_threshold(&img);
        assert!((30..200).contains(&t), "{t}");
    }

    #[test]
    fn adaptive_threshold_follows_uneven_light() {
        // A dark bar on a background that brightens left to right: one global threshold cannot
        // separate the left background (60) from the right bar (~79); a local one can.
        let img = GrayImage::from_fn(200, 100, |x, y| {
            let light = 60 + (x / 2) as u8;
            let bar = (48..52).contains(&y);
            image::Luma([if bar { light / 2 } else { light }])
        });
        let black = adaptive_mean(&img);
        for x in [5u32, 100, 195] {
            assert!(black[(50 * 200 + x) as usize], "bar at x={x}");
            assert!(!black[(10 * 200 + x) as usize], "background at x={x}");
        }
    }

    #[test]
    fn median_removes_salt_and_pepper() {
        let mut img = GrayImage::from_pixel(20, 20, image::Luma([128]));
        img.put_pixel(5, 5, image::Luma([0]));
        img.put_pixel(10, 10, image::Luma([255]));
        img.put_pixel(0, 0, image::Luma([255]));
        let out = median3(&img);
        assert!(out.pixels().all(|p| p[0] == 128));
    }

    /// The median of nine values with the 19-exchange network of Paeth (Graphics Gems, 1990): no
    /// sorting, no branches the compiler cannot turn into min/max.
    fn median9(mut p: [u8; 9]) -> u8 {
        const NETWORK: [(usize, usize); 19] = [
            (1, 2),
            (4, 5),
            (7, 8),
            (0, 1),
            (3, 4),
            (6, 7),
            (1, 2),
            (4, 5),
            (7, 8),
            (0, 3),
            (5, 8),
            (4, 7),
            (3, 6),
            (1, 4),
            (2, 5),
            (4, 7),
            (4, 2),
            (6, 4),
            (4, 2),
        ];
        for (a, b) in NETWORK {
            let (lo, hi) = (p[a].min(p[b]), p[a].max(p[b]));
            p[a] = lo;
            p[b] = hi;
        }
        p[4]
    }

    #[test]
    fn median3_is_the_median_of_each_window() {
        // Against the sorting network on every pixel of a few pseudo-random images (edges
        // included: their windows repeat the edge row and column).
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (w, h) in [(1u32, 1u32), (1, 7), (7, 1), (2, 2), (31, 17)] {
            let img = GrayImage::from_fn(w, h, |_, _| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                image::Luma([(state % 9) as u8 * 30])
            });
            let out = median3(&img);
            for y in 0..h {
                for x in 0..w {
                    let at = |dx: i64, dy: i64| {
                        let cx = (i64::from(x) + dx).clamp(0, i64::from(w) - 1) as u32;
                        let cy = (i64::from(y) + dy).clamp(0, i64::from(h) - 1) as u32;
                        img.get_pixel(cx, cy)[0]
                    };
                    let window: [u8; 9] =
                        std::array::from_fn(|i| at(i as i64 % 3 - 1, i as i64 / 3 - 1));
                    assert_eq!(
                        out.get_pixel(x, y)[0],
                        median9(window),
                        "{w}x{h} at {x},{y}"
                    );
                }
            }
        }
    }

    #[test]
    fn median9_is_the_median() {
        // A fixed pseudo-random walk over many 9-value windows, against sorting.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            let window: [u8; 9] = std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 7) as u8 * 40 // few distinct values: exercises ties
            });
            let mut sorted = window;
            sorted.sort_unstable();
            assert_eq!(median9(window), sorted[4], "{window:?}");
        }
    }

    #[test]
    fn upscale_doubles_and_interpolates() {
        let img = GrayImage::from_fn(3, 2, |x, _| image::Luma([(x * 100) as u8]));
        let up = upscale2(&img);
        assert_eq!(up.dimensions(), (6, 4));
        let row: Vec<u8> = (0..6).map(|x| up.get_pixel(x, 0)[0]).collect();
        assert_eq!(row, [0, 50, 100, 150, 200, 200]);
    }

    #[test]
    fn stretch_spreads_a_dim_range() {
        let img = GrayImage::from_fn(100, 10, |x, _| image::Luma([20 + (x / 2) as u8]));
        let out = stretch(&img);
        let max = out.pixels().map(|p| p[0]).max();
        let min = out.pixels().map(|p| p[0]).min();
        assert_eq!((min, max), (Some(0), Some(255)));
    }

    #[test]
    fn downscale_applies_only_to_large_frames() {
        assert!(!LadderStep::Downscale.applies_to(1000, 700));
        assert!(LadderStep::Downscale.applies_to(1920, 1080));
        assert_eq!(
            downscale(&GrayImage::new(1920, 1080)).dimensions(),
            (960, 540)
        );
        assert_eq!(
            downscale(&GrayImage::new(4000, 3000)).dimensions(),
            (800, 600)
        );
        // Each output pixel is the rounded mean of its block.
        let img = GrayImage::from_fn(2000, 4, |x, _| {
            image::Luma([if x % 2 == 0 { 10 } else { 21 }])
        });
        assert!(downscale(&img).pixels().all(|p| p[0] == 16));
    }

    #[test]
    fn a_large_frame_decodes() {
        let mut img = GrayImage::from_pixel(1920, 1080, image::Luma([180]));
        draw_code(&mut img, TOKEN, 10, 700, 200);
        let stats = decode_luma_stats(&img);
        assert_eq!(stats.text.as_deref(), Some(TOKEN));
        // rxing, the first rung, on the downscaled copy; rqrr's rung on that copy reads it too.
        assert_eq!((stats.step, stats.attempts), (Some(LadderStep::Rxing), 1));
        assert_eq!(
            decode_step(&downscale(&img), LadderStep::Plain).as_deref(),
            Some(TOKEN)
        );
    }

    #[test]
    fn zero_sized_images_give_no_code() {
        assert_eq!(decode_luma(&GrayImage::new(0, 0)), None);
        for step in LadderStep::ALL {
            assert_eq!(decode_step(&GrayImage::new(0, 7), step), None);
        }
    }

    #[test]
    fn file_errors_are_specific() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.png");
        assert!(matches!(
            read_frame_file(&missing),
            Err(FrameError::FileMissing { .. })
        ));
        assert!(matches!(
            read_frame_file(dir.path()),
            Err(FrameError::IsDirectory { .. })
        ));
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").expect("write");
        let err = read_frame_file(&empty).expect_err("empty");
        assert!(matches!(err, FrameError::EmptyFile { .. }), "{err}");
        assert!(err.to_string().contains("empty.png"), "{err}");

        let good = dir.path().join("good.png");
        let bytes = png(&code_frame(TOKEN));
        std::fs::write(&good, &bytes).expect("write");
        assert_eq!(read_frame_file(&good).expect("readable"), bytes);
    }

    #[test]
    fn an_oversized_file_is_refused_from_its_metadata() {
        let dir = tempfile::tempdir().expect("temp dir");
        let big = dir.path().join("big.png");
        // A sparse file: set_len takes no disk space or time, and read_frame_file must not read it.
        let file = File::create(&big).expect("create");
        file.set_len(MAX_FILE_BYTES + 1).expect("set_len");
        let err = read_frame_file(&big).expect_err("too big");
        assert!(
            matches!(err, FrameError::FileTooLarge { size, .. } if size == MAX_FILE_BYTES + 1),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_not_a_regular_file() {
        let err = read_frame_file(Path::new("/dev/zero")).expect_err("device");
        assert!(matches!(err, FrameError::NotRegularFile { .. }), "{err}");
    }
}
