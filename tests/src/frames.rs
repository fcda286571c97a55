//! Damaged camera frames holding a QR code, generated deterministically from a seed.
//!
//! This is the corpus that measures and guards the edge node's frame decoder
//! (`edge_node::frame`): a KP1-like text is encoded as a QR code (alphanumeric mode as the spec
//! prescribes, or byte mode as some issuers do), placed off-centre in a camera-sized frame on an
//! unevenly lit background, and then damaged the way real entrance cameras damage it: blur,
//! sensor noise, tilt, low light, distance, JPEG compression. The same `(text, damage, seed)`
//! always gives the same pixels, so a failing frame can be regenerated from the seed printed by
//! the test.

use std::f32::consts::PI;
use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageFormat};
use qrcode::bits::Bits;
use qrcode::types::QrError;
use qrcode::{Color, EcLevel, QrCode, Version};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The RFC 9285 base45 alphabet, what follows `KP1:` in a token: exactly the 45 characters of
/// the QR alphanumeric mode.
pub const BASE45_ALPHABET: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/// The length of a KP1 text (`KP1:` + base45 of 93 bytes).
pub const KP1_TEXT_LEN: usize = 144;

/// A camera frame of the common VGA size.
const VGA: (u32, u32) = (640, 480);
/// A full-HD frame, for the downscale rung.
const HD: (u32, u32) = (1920, 1080);
/// Modules of quiet zone around the code (the QR standard's minimum).
const QUIET: u32 = 4;

/// What went wrong generating a corpus frame.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error(
        "text cannot be encoded as this QR code: {0}; use the base45 alphabet and <= 144 chars"
    )]
    Qr(#[from] QrError),
    #[error(
        "text has a character outside the QR alphanumeric set (0-9 A-Z space $%*+-./:); use byte mode"
    )]
    NotAlphanumeric,
    #[error("image encoding failed: {0}; this is a bug in the corpus generator")]
    Image(#[from] image::ImageError),
}

/// How a frame is damaged, with its severity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Damage {
    /// The code exactly as rendered (anti-aliased edges only).
    Clean,
    /// Gaussian blur with this sigma in pixels (defocus, motion).
    Blur { sigma: f32 },
    /// Additive Gaussian sensor noise with this standard deviation in gray levels.
    Noise { sigma: f32 },
    /// This fraction of pixels set to pure black or white (dead pixels, dust, dropouts).
    SaltPepper { fraction: f32 },
    /// The code tilted by a random angle of up to this many degrees either way.
    Rotate { max_degrees: f32 },
    /// The whole frame turned 90° (a phone held sideways in a portrait camera): 480x640.
    Rotate90,
    /// Low light: all values squashed into `low..=high`, with mild sensor noise.
    Dim { low: u8, high: u8 },
    /// The code far from the camera: its side is this fraction of the frame height.
    Small { fraction: f32 },
    /// The frame compressed as JPEG at this quality.
    Jpeg { quality: u8 },
    /// The text encoded in byte mode (a larger QR version) instead of alphanumeric.
    ByteMode,
    /// A 1920x1080 frame with mild optical blur and noise.
    Hd,
}

impl Damage {
    /// A short name with the severity, for tables (`blur 1.5`, `jpeg q40`).
    pub fn name(&self) -> String {
        match self {
            Damage::Clean => "clean".into(),
            Damage::Blur { sigma } => format!("blur {sigma}"),
            Damage::Noise { sigma } => format!("noise {sigma}"),
            Damage::SaltPepper { fraction } => format!("salt-pepper {:.0}%", fraction * 100.0),
            Damage::Rotate { max_degrees } => format!("rotate ±{max_degrees}°"),
            Damage::Rotate90 => "rotate 90°".into(),
            Damage::Dim { low, high } => format!("dim {low}..{high}"),
            Damage::Small { fraction } => format!("small {:.0}%", fraction * 100.0),
            Damage::Jpeg { quality } => format!("jpeg q{quality}"),
            Damage::ByteMode => "byte-mode".into(),
            Damage::Hd => "hd 1920x1080".into(),
        }
    }
}

/// A random text shaped like a KP1 token: `KP1:` and 140 base45 characters.
pub fn kp1_like_text(seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::with_capacity(KP1_TEXT_LEN);
    text.push_str("KP1:");
    while text.len() < KP1_TEXT_LEN {
        text.push(char::from(
            BASE45_ALPHABET[rng.gen_range(0..BASE45_ALPHABET.len())],
        ));
    }
    text
}

/// Encode `text` in alphanumeric mode at version 6, level M (the spec's form).
pub fn alphanumeric_code(text: &str) -> Result<QrCode, CorpusError> {
    // qrcode does not check: it would encode other bytes as wrong alphanumeric values, and the
    // corpus would then blame the decoder for reading a different text.
    if !text.bytes().all(|b| BASE45_ALPHABET.contains(&b)) {
        return Err(CorpusError::NotAlphanumeric);
    }
    let mut bits = Bits::new(Version::Normal(6));
    bits.push_alphanumeric_data(text.as_bytes())?;
    bits.push_terminator(EcLevel::M)?;
    Ok(QrCode::with_bits(bits, EcLevel::M)?)
}

/// Encode `text` in byte mode at level M, in the smallest version that holds it (8 for 144
/// characters).
pub fn byte_mode_code(text: &str) -> Result<QrCode, CorpusError> {
    let mut last = QrError::DataTooLong;
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        let pushed = bits
            .push_byte_data(text.as_bytes())
            .and_then(|()| bits.push_terminator(EcLevel::M));
        match pushed {
            Ok(()) => return Ok(QrCode::with_bits(bits, EcLevel::M)?),
            Err(e) => last = e,
        }
    }
    Err(last.into())
}

/// A camera-like frame holding `text` as a QR code, damaged by `damage`; the same arguments
/// always give the same pixels.
///
/// For [`Damage::Jpeg`] the returned pixels have been through JPEG and back; [`frame_file`]
/// gives the JPEG bytes themselves.
pub fn frame(text: &str, damage: Damage, seed: u64) -> Result<GrayImage, CorpusError> {
    let img = render(text, damage, seed)?;
    match damage {
        Damage::Jpeg { quality } => {
            let bytes = encode_jpeg(&img, quality)?;
            Ok(image::load_from_memory_with_format(&bytes, ImageFormat::Jpeg)?.into_luma8())
        }
        _ => Ok(img),
    }
}

/// The frame as the file a camera would deliver: JPEG for [`Damage::Jpeg`], PNG otherwise.
pub fn frame_file(text: &str, damage: Damage, seed: u64) -> Result<Vec<u8>, CorpusError> {
    let img = render(text, damage, seed)?;
    match damage {
        Damage::Jpeg { quality } => encode_jpeg(&img, quality),
        _ => encode_png(&img),
    }
}

/// PNG bytes of a luma image.
pub fn encode_png(img: &GrayImage) -> Result<Vec<u8>, CorpusError> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)?;
    Ok(out)
}

/// JPEG bytes of a luma image at `quality` (1..=100).
pub fn encode_jpeg(img: &GrayImage, quality: u8) -> Result<Vec<u8>, CorpusError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img)?;
    Ok(out)
}

/// Render and damage, everything but the container.
fn render(text: &str, damage: Damage, seed: u64) -> Result<GrayImage, CorpusError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let code = match damage {
        Damage::ByteMode => byte_mode_code(text)?,
        _ => alphanumeric_code(text)?,
    };
    let (width, height) = if damage == Damage::Hd { HD } else { VGA };
    let fraction = match damage {
        Damage::Small { fraction } => fraction * rng.gen_range(0.9..1.1),
        _ => rng.gen_range(0.4..0.6),
    };
    let angle = match damage {
        Damage::Rotate { max_degrees } => {
            let max = max_degrees.abs();
            rng.gen_range(-max..=max) * PI / 180.0
        }
        _ => 0.0,
    };
    let scene = Scene::new(&code, (width, height), fraction, angle, &mut rng);
    let mut img = scene.draw();
    match damage {
        Damage::Clean | Damage::Rotate { .. } | Damage::Small { .. } => {}
        Damage::Jpeg { .. } | Damage::ByteMode => {}
        Damage::Blur { sigma } => img = blur(img, sigma),
        Damage::Noise { sigma } => add_noise(&mut img, sigma, &mut rng),
        Damage::SaltPepper { fraction } => {
            // One random u16 per pixel: below `cut` it becomes dust, its low bit picks the colour.
            let cut = (fraction.clamp(0.0, 1.0) * 65536.0) as u32;
            let mut draws = vec![0u8; img.len() * 2];
            rng.fill(&mut draws[..]);
            let pixels: &mut [u8] = &mut img;
            for (px, d) in pixels.iter_mut().zip(draws.chunks_exact(2)) {
                let r = u32::from(u16::from_le_bytes([d[0], d[1]]));
                if r < cut {
                    *px = if r & 1 == 0 { 0 } else { 255 };
                }
            }
        }
        Damage::Rotate90 => img = DynamicImage::ImageLuma8(img).rotate90().into_luma8(),
        Damage::Dim { low, high } => {
            let span = f32::from(high.saturating_sub(low));
            let lut: [u8; 256] =
                std::array::from_fn(|v| low + (v as f32 * span / 255.0).round() as u8);
            let pixels: &mut [u8] = &mut img;
            for px in pixels {
                *px = lut[usize::from(*px)];
            }
            add_noise(&mut img, 2.0, &mut rng);
        }
        Damage::Hd => {
            img = blur(img, 1.0);
            add_noise(&mut img, 4.0, &mut rng);
        }
    }
    Ok(img)
}

/// Where and how the code sits in the frame.
struct Scene {
    colors: Vec<Color>,
    modules: u32,
    size: (u32, u32),
    /// Frame pixels per module.
    module_px: f32,
    center: (f32, f32),
    cos: f32,
    sin: f32,
    /// Background brightness: `base + gx * x + gy * y` (uneven room light).
    base: f32,
    gx: f32,
    gy: f32,
    dark: f32,
    light: f32,
}

impl Scene {
    fn new(
        code: &QrCode,
        size: (u32, u32),
        fraction: f32,
        angle: f32,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let modules = code.width() as u32;
        let side = fraction * size.1 as f32;
        let (cos, sin) = (angle.cos(), angle.sin());
        // Keep the whole tilted code, quiet zone included, inside the frame with a small margin,
        // anywhere else: real codes are rarely centred.
        let half_extent = side / 2.0 * (cos.abs() + sin.abs()) + 4.0;
        let place = |len: u32, rng: &mut ChaCha8Rng| {
            let (lo, hi) = (half_extent, len as f32 - half_extent);
            if hi > lo {
                rng.gen_range(lo..hi)
            } else {
                len as f32 / 2.0
            }
        };
        let center = (place(size.0, rng), place(size.1, rng));
        Scene {
            colors: code.to_colors(),
            modules,
            size,
            module_px: side / (modules + 2 * QUIET) as f32,
            center,
            cos,
            sin,
            base: rng.gen_range(120.0..170.0),
            gx: rng.gen_range(-40.0..40.0) / size.0 as f32,
            gy: rng.gen_range(-30.0..30.0) / size.1 as f32,
            dark: rng.gen_range(20.0..50.0),
            light: rng.gen_range(200.0..235.0),
        }
    }

    /// The brightness at a point of the frame, in continuous coordinates.
    fn sample(&self, x: f32, y: f32) -> f32 {
        let (dx, dy) = (x - self.center.0, y - self.center.1);
        // Inverse rotation into the code's own frame, in modules from its top-left corner.
        let total = (self.modules + 2 * QUIET) as f32;
        let u = (self.cos * dx + self.sin * dy) / self.module_px + total / 2.0;
        let v = (-self.sin * dx + self.cos * dy) / self.module_px + total / 2.0;
        if !(0.0..total).contains(&u) || !(0.0..total).contains(&v) {
            return self.base + self.gx * x + self.gy * y;
        }
        let (mu, mv) = (u as u32, v as u32);
        let inside = (QUIET..QUIET + self.modules).contains(&mu)
            && (QUIET..QUIET + self.modules).contains(&mv);
        let dark = inside
            && self.colors[((mv - QUIET) * self.modules + (mu - QUIET)) as usize] == Color::Dark;
        if dark { self.dark } else { self.light }
    }

    /// Render with 2x2 supersampling near the code (anti-aliased module edges, as a lens gives)
    /// and the plain background elsewhere.
    fn draw(&self) -> GrayImage {
        let reach = (self.modules + 2 * QUIET) as f32 * self.module_px * std::f32::consts::SQRT_2
            / 2.0
            + 2.0;
        let mut img = GrayImage::new(self.size.0, self.size.1);
        let width = self.size.0 as usize;
        let pixels: &mut [u8] = &mut img;
        for (y, row) in pixels.chunks_exact_mut(width).enumerate() {
            let fy = y as f32;
            let near_row = (fy - self.center.1).abs() < reach;
            for (x, px) in row.iter_mut().enumerate() {
                let fx = x as f32;
                let v = if near_row && (fx - self.center.0).abs() < reach {
                    (self.sample(fx + 0.25, fy + 0.25)
                        + self.sample(fx + 0.75, fy + 0.25)
                        + self.sample(fx + 0.25, fy + 0.75)
                        + self.sample(fx + 0.75, fy + 0.75))
                        / 4.0
                } else {
                    self.base + self.gx * fx + self.gy * fy
                };
                *px = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        img
    }
}

/// Gaussian blur. Through `DynamicImage` because its methods are compiled (optimised) inside
/// `image`, while the generic `imageops::blur` would be compiled unoptimised in this crate.
fn blur(img: GrayImage, sigma: f32) -> GrayImage {
    DynamicImage::ImageLuma8(img).blur(sigma).into_luma8()
}

/// Additive, approximately Gaussian noise with standard deviation `sigma`, clamped to 0..=255.
///
/// Each pixel's noise is the sum of four random bytes, centred and scaled (Irwin-Hall: within a
/// few percent of a Gaussian, and cheap enough for whole frames in an unoptimised test build).
fn add_noise(img: &mut GrayImage, sigma: f32, rng: &mut ChaCha8Rng) {
    // Four uniform bytes have variance 4 * (256^2 - 1) / 12.
    let std_of_sum = (4.0f32 * (65536.0 - 1.0) / 12.0).sqrt();
    let offset: [i16; 1021] =
        std::array::from_fn(|sum| ((sum as f32 - 510.0) / std_of_sum * sigma).round() as i16);
    let mut draws = vec![0u8; img.len() * 4];
    rng.fill(&mut draws[..]);
    let pixels: &mut [u8] = img;
    for (px, d) in pixels.iter_mut().zip(draws.chunks_exact(4)) {
        let sum = usize::from(d[0]) + usize::from(d[1]) + usize::from(d[2]) + usize::from(d[3]);
        *px = (i16::from(*px) + offset[sum]).clamp(0, 255) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kp1_like_texts_have_the_token_shape() {
        let text = kp1_like_text(7);
        assert_eq!(text.len(), KP1_TEXT_LEN);
        assert!(text.starts_with("KP1:"));
        assert!(text[4..].bytes().all(|b| BASE45_ALPHABET.contains(&b)));
        assert_ne!(kp1_like_text(7), kp1_like_text(8));
    }

    #[test]
    fn alphanumeric_is_version_6_and_byte_mode_is_larger() {
        let text = kp1_like_text(1);
        assert_eq!(
            alphanumeric_code(&text).expect("fits").version(),
            Version::Normal(6)
        );
        assert_eq!(
            byte_mode_code(&text).expect("fits").version(),
            Version::Normal(8)
        );
        assert!(matches!(
            alphanumeric_code("kp1:lower case"),
            Err(CorpusError::NotAlphanumeric)
        ));
    }

    #[test]
    fn frames_are_deterministic_and_seed_dependent() {
        let text = kp1_like_text(3);
        let damage = Damage::Noise { sigma: 20.0 };
        let a = frame(&text, damage, 11).expect("frame");
        assert_eq!(a, frame(&text, damage, 11).expect("frame"));
        assert_ne!(a, frame(&text, damage, 12).expect("frame"));
        assert_eq!(a.dimensions(), VGA);
    }

    #[test]
    fn sizes_follow_the_damage() {
        let text = kp1_like_text(4);
        let portrait = frame(&text, Damage::Rotate90, 1).expect("frame");
        assert_eq!(portrait.dimensions(), (480, 640));
        let hd = frame(&text, Damage::Hd, 1).expect("frame");
        assert_eq!(hd.dimensions(), HD);
    }

    #[test]
    fn dim_frames_stay_in_their_range() {
        let img = frame(&kp1_like_text(5), Damage::Dim { low: 20, high: 70 }, 2).expect("frame");
        // Mild noise may step a few levels outside.
        assert!(img.pixels().all(|p| (10..=80).contains(&p[0])));
    }

    #[test]
    fn files_use_the_right_container() {
        let text = kp1_like_text(6);
        let jpeg = frame_file(&text, Damage::Jpeg { quality: 40 }, 1).expect("file");
        assert!(jpeg.starts_with(&[0xFF, 0xD8, 0xFF]));
        let png = frame_file(&text, Damage::Clean, 1).expect("file");
        assert!(png.starts_with(b"\x89PNG"));
    }
}
