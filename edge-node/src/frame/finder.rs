//! Our own QR locator in front of `rqrr`'s decoder (issue 16).
//!
//! `rqrr` finds a code by flood-filling regions of its thresholded image and matching capstone
//! shapes; on real photos (small codes of 3-5 pixels a module, perspective, curved t-shirts) that
//! search often finds no grid at all. This module locates the code the way zxing's detector does,
//! on a binarised image the ladder already made:
//!
//! 1. finder patterns: every row is scanned for dark/light/dark/light/dark runs in the ratio
//!    1:1:3:1:1; each hit is confirmed by the same ratio down its column and along its row through
//!    the centre, and hits on neighbouring rows merge into one candidate;
//! 2. the candidates are grouped in threes that form a right isosceles triangle (the three corner
//!    patterns of one code), best-shaped first;
//! 3. for each group the grid size is estimated from the distances and the module size, the
//!    bottom-right alignment pattern is looked for by template matching near where the three
//!    finders put it, and a perspective transform maps module centres to pixels;
//! 4. the grid is sampled from the bitmap and handed to `rqrr`'s decoder (format, version,
//!    Reed-Solomon correction, payload), which stays the only thing that turns bits into text.
//!
//! A wrongly placed grid fails Reed-Solomon correction rather than giving a wrong text, and every
//! KP1 text is signed besides (see `shared/src/token.rs`). All loops are bounded by the image
//! size and small constants; nothing here panics on any bitmap (the caller still isolates the
//! decode in `catch_unwind`, as for every `rqrr` call).

/// A binarised image: `true` = dark, row-major; `packed`, when the caller has it, the same
/// pixels packed (the rows' run lengths then come from it a word at a time).
pub(super) struct Bitmap<'a> {
    pub bits: &'a [bool],
    pub w: usize,
    pub h: usize,
    pub packed: Option<&'a super::Packed>,
}

impl Bitmap<'_> {
    fn at(&self, x: usize, y: usize) -> bool {
        self.bits[y * self.w + x]
    }

    /// Row `y`'s run lengths, light run first (0 when the row starts dark) and a closing 0
    /// after a dark last run, as [`super::Packed::runs_white_first`] gives them. Rows are at
    /// most `u16::MAX` long (checked by the callers).
    fn row_runs(&self, y: usize, runs: &mut Vec<u16>) {
        if let Some(packed) = self
            .packed
            .filter(|p| p.w == self.w && p.height() == self.h)
        {
            packed.runs_white_first(y, runs);
            return;
        }
        runs.clear();
        let (mut dark, mut count) = (false, 0u16);
        for &pixel in &self.bits[y * self.w..(y + 1) * self.w] {
            if pixel != dark {
                runs.push(count);
                (dark, count) = (pixel, 0);
            }
            count += 1;
        }
        runs.push(count);
        if dark {
            runs.push(0);
        }
    }

    /// Whether the bitmap is one the locator works on: at least a version-1 code's size, rows
    /// that fit a run length, one entry a pixel.
    fn usable(&self) -> bool {
        self.w >= 21
            && self.h >= 21
            && self.w <= usize::from(u16::MAX)
            && self.bits.len() == self.w * self.h
    }

    /// The pixel nearest to `(x, y)`, or `None` if that lies more than a pixel outside.
    fn sample(&self, x: f64, y: f64) -> Option<bool> {
        if !(x > -1.0 && y > -1.0 && x < self.w as f64 + 1.0 && y < self.h as f64 + 1.0) {
            return None;
        }
        let xi = (x.max(0.0) as usize).min(self.w - 1);
        let yi = (y.max(0.0) as usize).min(self.h - 1);
        Some(self.at(xi, yi))
    }
}

/// A finder-pattern candidate: its centre, its module size in pixels, and on how many scan
/// rows it was confirmed.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    x: f64,
    y: f64,
    module: f64,
    count: u32,
}

/// At most this many candidates (most often confirmed first) are grouped into triples.
const MAX_CANDIDATES: usize = 12;
/// At most this many triples are sampled and decoded per bitmap.
const MAX_TRIPLES: usize = 6;

/// Locate QR codes in `bitmap` and decode them with `rqrr`; a KP1 text is preferred over any
/// other code in the same image.
pub(super) fn decode(bitmap: &Bitmap<'_>) -> Option<String> {
    if !bitmap.usable() {
        return None;
    }
    let candidates = find_candidates(bitmap);
    let mut used: Vec<usize> = Vec::new();
    let texts = best_triples(&candidates)
        .into_iter()
        .filter_map(|(a, b, c)| {
            if [a, b, c].iter().any(|i| used.contains(i)) {
                return None;
            }
            let [bl, tl, tr] = order(candidates[a], candidates[b], candidates[c]);
            let text = decode_triple(bitmap, bl, tl, tr)?;
            used.extend([a, b, c]);
            Some(text)
        });
    super::prefer_check_in(texts)
}

/// More finder-pattern candidates than this (confirmed down the column as well as along the
/// row, on at least two scan rows) make a frame *crowded*: printed full of finder-like
/// patterns. A camera frame of a code at a door shows three; the most any of the 179 real
/// photos of the corpus shows is 8 (a code with texture beside it). On a crowded frame rqrr's
/// capstone grouping runs for long: 6 s for a 320x240 frame tiled with patterns, 0.47 s for 90
/// of them in a VGA frame, 0.11 s for 24. Confirmed on two rows, not raw row hits or one-row
/// candidates: sensor noise makes many of those (a gate on them lost a noise-50 frame).
const CROWDED_CANDIDATES: usize = 16;

/// Whether `bitmap` is crowded with finder-like patterns ([`CROWDED_CANDIDATES`]); the search
/// itself stops once it has collected a few hundred, so this is bounded whatever the frame.
pub(super) fn crowded(bitmap: &Bitmap<'_>) -> bool {
    if !bitmap.usable() {
        return false;
    }
    all_candidates(bitmap)
        .iter()
        .filter(|c| c.count >= 2)
        .count()
        > CROWDED_CANDIDATES
}

fn found_pattern_cross(counts: &[usize; 5]) -> bool {
    let total: usize = counts.iter().sum();
    if total < 7 || counts.contains(&0) {
        return false;
    }
    let module = total as f64 / 7.0;
    let max_variance = module / 2.0;
    let c = counts.map(|n| n as f64);
    (module - c[0]).abs() < max_variance
        && (module - c[1]).abs() < max_variance
        && (3.0 * module - c[2]).abs() < 3.0 * max_variance
        && (module - c[3]).abs() < max_variance
        && (module - c[4]).abs() < max_variance
}

/// The centre of the middle run, given the position just past the last run.
fn center_from_end(counts: &[usize; 5], end: usize) -> f64 {
    end as f64 - counts[4] as f64 - counts[3] as f64 - counts[2] as f64 / 2.0
}

fn find_candidates(bm: &Bitmap<'_>) -> Vec<Candidate> {
    let mut found = all_candidates(bm);
    found.sort_by_key(|c| std::cmp::Reverse(c.count));
    let confirmed = found.iter().filter(|c| c.count >= 2).count();
    if confirmed >= 3 {
        found.retain(|c| c.count >= 2);
    }
    found.truncate(MAX_CANDIDATES);
    found
}

/// Every candidate on the scan rows, merged, in the order found; the scan stops once it holds
/// more than `4 * MAX_CANDIDATES * 8` (a pathological texture).
fn all_candidates(bm: &Bitmap<'_>) -> Vec<Candidate> {
    let mut found: Vec<Candidate> = Vec::new();
    // Every row of a camera-sized image; every other row of a larger one.
    let skip = if bm.h > 600 { 2 } else { 1 };
    let mut runs = Vec::new();
    for y in (0..bm.h).step_by(skip) {
        bm.row_runs(y, &mut runs);
        // Windows of five runs starting at each dark run (odd indices): after a hit the
        // search goes on past it, else two runs on.
        let mut i = 1;
        let mut start = runs.first().map_or(0, |&r| usize::from(r));
        while i + 4 < runs.len() {
            let counts: [usize; 5] = std::array::from_fn(|k| usize::from(runs[i + k]));
            let end = start + counts.iter().sum::<usize>();
            if found_pattern_cross(&counts) && possible_center(bm, &counts, y, end, &mut found) {
                start = end + runs.get(i + 5).map_or(0, |&r| usize::from(r));
                i += 6;
            } else {
                start += counts[0] + counts[1];
                i += 2;
            }
        }
        if found.len() > 4 * MAX_CANDIDATES * 8 {
            // A pathological texture: stop collecting, rank what there is.
            break;
        }
    }
    found
}

/// Cross-check a row hit along its column and again along its row; record or merge it.
fn possible_center(
    bm: &Bitmap<'_>,
    counts: &[usize; 5],
    y: usize,
    end: usize,
    found: &mut Vec<Candidate>,
) -> bool {
    let total: usize = counts.iter().sum();
    let cx = center_from_end(counts, end);
    let Some((cy, v_total)) = cross_check(bm, cx as usize, y, counts[2], total, true) else {
        return false;
    };
    let Some((cx, h_total)) = cross_check(bm, cx as usize, cy as usize, counts[2], total, false)
    else {
        return false;
    };
    let module = (h_total + v_total) as f64 / 14.0;
    for c in found.iter_mut() {
        let close = (cy - c.y).abs() <= module && (cx - c.x).abs() <= module;
        let diff = (module - c.module).abs();
        if close && (diff <= 1.0 || diff <= c.module) {
            let n = f64::from(c.count);
            c.x = (n * c.x + cx) / (n + 1.0);
            c.y = (n * c.y + cy) / (n + 1.0);
            c.module = (n * c.module + module) / (n + 1.0);
            c.count += 1;
            return true;
        }
    }
    found.push(Candidate {
        x: cx,
        y: cy,
        module,
        count: 1,
    });
    true
}

/// The 1:1:3:1:1 runs through `(x, y)` down the column (`vertical`) or along the row: the centre
/// along that line and the runs' total length, if they have the finder's ratio and about the
/// length the first hit had.
fn cross_check(
    bm: &Bitmap<'_>,
    x: usize,
    y: usize,
    max_count: usize,
    original_total: usize,
    vertical: bool,
) -> Option<(f64, usize)> {
    let (len, pos) = if vertical { (bm.h, y) } else { (bm.w, x) };
    if pos >= len || x >= bm.w || y >= bm.h {
        return None;
    }
    let px = |i: usize| {
        if vertical { bm.at(x, i) } else { bm.at(i, y) }
    };
    let mut sc = [0usize; 5];
    // Backwards from the centre: the middle run, then light, then dark.
    let mut i = pos as isize;
    while i >= 0 && px(i as usize) {
        sc[2] += 1;
        i -= 1;
    }
    if i < 0 {
        return None;
    }
    while i >= 0 && !px(i as usize) && sc[1] <= max_count {
        sc[1] += 1;
        i -= 1;
    }
    if i < 0 || sc[1] > max_count {
        return None;
    }
    while i >= 0 && px(i as usize) && sc[0] <= max_count {
        sc[0] += 1;
        i -= 1;
    }
    if sc[0] > max_count {
        return None;
    }
    // Forwards.
    let mut i = pos + 1;
    while i < len && px(i) {
        sc[2] += 1;
        i += 1;
    }
    if i == len {
        return None;
    }
    while i < len && !px(i) && sc[3] < max_count {
        sc[3] += 1;
        i += 1;
    }
    if i == len || sc[3] >= max_count {
        return None;
    }
    while i < len && px(i) && sc[4] < max_count {
        sc[4] += 1;
        i += 1;
    }
    if sc[4] >= max_count {
        return None;
    }
    let total: usize = sc.iter().sum();
    if 5 * total.abs_diff(original_total) >= 2 * original_total {
        return None;
    }
    found_pattern_cross(&sc).then(|| (center_from_end(&sc, i), total))
}

/// Triples of candidates that could be the three finders of one code, best-shaped first.
fn best_triples(c: &[Candidate]) -> Vec<(usize, usize, usize)> {
    let mut scored = Vec::new();
    let d2 = |a: &Candidate, b: &Candidate| (a.x - b.x).powi(2) + (a.y - b.y).powi(2);
    for i in 0..c.len() {
        for j in i + 1..c.len() {
            for k in j + 1..c.len() {
                let (a, b, cc) = (&c[i], &c[j], &c[k]);
                let min_m = a.module.min(b.module).min(cc.module);
                let max_m = a.module.max(b.module).max(cc.module);
                if max_m > 2.0 * min_m {
                    continue;
                }
                let mut sides = [d2(a, b), d2(b, cc), d2(a, cc)];
                sides.sort_by(f64::total_cmp);
                let [s1, s2, s3] = sides;
                // Modules between the centres of the two nearer pairs: 14 (version 1) to 170.
                let mean_m = (a.module + b.module + cc.module) / 3.0;
                let between = s1.sqrt() / mean_m;
                if !(8.0..=200.0).contains(&between) {
                    continue;
                }
                // 0 for a right isosceles triangle (s3 = 2 s1 = 2 s2).
                let score = ((s3 - 2.0 * s2).abs() + (s3 - 2.0 * s1).abs()) / s3;
                if score < 0.7 {
                    scored.push((score, (i, j, k)));
                }
            }
        }
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    scored.into_iter().take(MAX_TRIPLES).map(|s| s.1).collect()
}

/// Name the three finders: bottom-left, top-left (the corner opposite the longest side), top-right.
fn order(a: Candidate, b: Candidate, c: Candidate) -> [Candidate; 3] {
    let d2 = |p: &Candidate, q: &Candidate| (p.x - q.x).powi(2) + (p.y - q.y).powi(2);
    let (ab, bc, ac) = (d2(&a, &b), d2(&b, &c), d2(&a, &c));
    let (mut p, tl, mut q) = if bc >= ab && bc >= ac {
        (b, a, c)
    } else if ac >= ab && ac >= bc {
        (a, b, c)
    } else {
        (a, c, b)
    };
    // Image y grows downwards: top-right is clockwise from bottom-left around top-left.
    let cross = (q.x - tl.x) * (p.y - tl.y) - (q.y - tl.y) * (p.x - tl.x);
    if cross < 0.0 {
        std::mem::swap(&mut p, &mut q);
    }
    [p, tl, q]
}

/// A projective map from module coordinates to pixels.
#[derive(Debug, Clone, Copy)]
struct Homography([f64; 8]);

impl Homography {
    /// The map taking each `from[i]` to `to[i]`, if the four points are in general position.
    fn from_points(from: [(f64, f64); 4], to: [(f64, f64); 4]) -> Option<Homography> {
        // x' = (h0 x + h1 y + h2) / (h6 x + h7 y + 1), y' = (h3 x + h4 y + h5) / (same).
        let mut m = [[0f64; 9]; 8];
        for i in 0..4 {
            let ((x, y), (u, v)) = (from[i], to[i]);
            m[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
            m[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
        }
        for col in 0..8 {
            let pivot = (col..8).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
            if m[pivot][col].abs() < 1e-9 {
                return None;
            }
            m.swap(col, pivot);
            let pivot_row = m[col];
            for (r, row) in m.iter_mut().enumerate() {
                if r != col {
                    let f = row[col] / pivot_row[col];
                    for (x, p) in row.iter_mut().zip(pivot_row).skip(col) {
                        *x -= f * p;
                    }
                }
            }
        }
        let h: [f64; 8] = std::array::from_fn(|i| m[i][8] / m[i][i]);
        h.iter().all(|v| v.is_finite()).then_some(Homography(h))
    }

    fn map(&self, x: f64, y: f64) -> (f64, f64) {
        let h = &self.0;
        let d = h[6] * x + h[7] * y + 1.0;
        (
            (h[0] * x + h[1] * y + h[2]) / d,
            (h[3] * x + h[4] * y + h[5]) / d,
        )
    }
}

/// Try the grid sizes the three finders suggest, with and without an alignment pattern.
fn decode_triple(bm: &Bitmap<'_>, bl: Candidate, tl: Candidate, tr: Candidate) -> Option<String> {
    let module = (bl.module + tl.module + tr.module) / 3.0;
    // Modules between two centres, with the module size of those two (perspective makes the
    // finders' sizes differ).
    let between = |p: &Candidate, q: &Candidate| {
        ((p.x - q.x).powi(2) + (p.y - q.y).powi(2)).sqrt() * 2.0 / (p.module + q.module)
    };
    let modules_between = (between(&tl, &tr) + between(&tl, &bl)) / 2.0;
    let raw_dim = modules_between + 7.0;
    // The two nearest versions (sizes 4v + 17), nearest first: on both corpora every grid the
    // locator read was at the nearest or the next nearest (the third tried, the farther
    // neighbour, read none while costing a third of the locator's work on a frame it misses).
    let est = ((raw_dim - 17.0) / 4.0).round() as i64;
    let mut versions: Vec<i64> = [est, est - 1, est + 1]
        .into_iter()
        .filter(|v| (1..=40).contains(v))
        .collect();
    versions.sort_by(|a, b| {
        let da = ((4 * a + 17) as f64 - raw_dim).abs();
        let db = ((4 * b + 17) as f64 - raw_dim).abs();
        da.total_cmp(&db)
    });
    versions.truncate(2);
    // The alignment pattern is where it is whatever the version: searched for once (at the
    // nearest version's geometry), its centre serves both.
    let mut align: Option<Option<(f64, f64)>> = None;
    for version in versions {
        let dim = (4 * version + 17) as f64;
        let d = dim - 3.5;
        let corners = [(3.5, 3.5), (d, 3.5), (3.5, d)];
        let pixels = [(tl.x, tl.y), (tr.x, tr.y), (bl.x, bl.y)];
        // Where a parallelogram puts the bottom-right finder's centre (there is none).
        let br = (tr.x - tl.x + bl.x, tr.y - tl.y + bl.y);
        let decode_with = |from4: (f64, f64), to4: (f64, f64)| {
            let from = [corners[0], corners[1], corners[2], from4];
            let to = [pixels[0], pixels[1], pixels[2], to4];
            let h = Homography::from_points(from, to)?;
            sample_and_decode(bm, &h, dim as usize)
        };
        // The parallelogram first: a code seen square-on decodes without the alignment
        // pattern's template search, the costliest part of the locator; a code in perspective
        // then gets the alignment pattern's centre as its fourth corner.
        if let Some(text) = decode_with((d, d), br) {
            return Some(text);
        }
        if version >= 2
            && let Some(align) =
                *align.get_or_insert_with(|| find_alignment(bm, tl, tr, bl, dim, module))
            && let Some(text) = decode_with((dim - 6.5, dim - 6.5), align)
        {
            return Some(text);
        }
    }
    None
}

/// The bottom-right alignment pattern's centre in pixels: the best match of its 5x5-module
/// template (dark centre, light ring, dark ring) within a few modules of where the finders
/// predict it.
fn find_alignment(
    bm: &Bitmap<'_>,
    tl: Candidate,
    tr: Candidate,
    bl: Candidate,
    dim: f64,
    module: f64,
) -> Option<(f64, f64)> {
    let between = dim - 7.0;
    // One module along the code's rows and columns, in pixels.
    let u = ((tr.x - tl.x) / between, (tr.y - tl.y) / between);
    let v = ((bl.x - tl.x) / between, (bl.y - tl.y) / between);
    // Its centre is 3 modules in from the bottom-right finder's would-be centre.
    let k = (dim - 10.0) / between;
    let est = (
        tl.x + k * (tr.x - tl.x + bl.x - tl.x),
        tl.y + k * (tr.y - tl.y + bl.y - tl.y),
    );
    let radius = (5.0 * module).max(4.0);
    let step = (module / 3.0).max(1.0);
    let steps = (radius / step) as i64;
    // Perspective shrinks or grows the modules towards the bottom-right corner: try the
    // template at the finders' average module size and at the size extrapolated from them.
    let len = |p: (f64, f64)| (p.0 * p.0 + p.1 * p.1).sqrt();
    let extrapolated = (tr.module + bl.module - tl.module).max(0.5 * module);
    // 22 of the 25 modules right: clearly the pattern, not a patch of data.
    const MAX_MISSES: u32 = 3;
    // The template's modules, the centre and the light ring first: at a place that is not the
    // pattern those fail soonest, so most places cost a few samples instead of 25.
    const TEMPLATE: [(i8, i8, bool); 25] = {
        let mut t = [(0i8, 0i8, false); 25];
        let mut n = 0;
        let mut ring = 0i8;
        while ring <= 2 {
            let mut j = -2i8;
            while j <= 2 {
                let mut i = -2i8;
                while i <= 2 {
                    let r = if i.abs() > j.abs() { i.abs() } else { j.abs() };
                    if r == ring {
                        t[n] = (i, j, ring != 1);
                        n += 1;
                    }
                    i += 1;
                }
                j += 1;
            }
            ring += 1;
        }
        t
    };
    let mut best: Option<(u32, f64, (f64, f64))> = None;
    for scale in [1.0, extrapolated / len(u), extrapolated / len(v)] {
        let (u, v) = ((u.0 * scale, u.1 * scale), (v.0 * scale, v.1 * scale));
        for sy in -steps..=steps {
            for sx in -steps..=steps {
                let (cx, cy) = (est.0 + sx as f64 * step, est.1 + sy as f64 * step);
                // Only a place with at most MAX_MISSES of the 25 modules wrong can be the
                // answer, so a place is left at its fourth wrong module.
                let mut misses = 0u32;
                for &(i, j, dark) in &TEMPLATE {
                    let (fi, fj) = (f64::from(i), f64::from(j));
                    let px = cx + fi * u.0 + fj * v.0;
                    let py = cy + fi * u.1 + fj * v.1;
                    if bm.sample(px, py) != Some(dark) {
                        misses += 1;
                        if misses > MAX_MISSES {
                            break;
                        }
                    }
                }
                if misses > MAX_MISSES {
                    continue;
                }
                let score = 25 - misses;
                let off = (sx * sx + sy * sy) as f64;
                let better = match best {
                    None => true,
                    Some((s, o, _)) => score > s || (score == s && off < o),
                };
                if better {
                    best = Some((score, off, (cx, cy)));
                }
            }
        }
        // A clean match at the finders' own module size needs no other size.
        if best.is_some_and(|(score, _, _)| score == 25) {
            break;
        }
    }
    best.map(|b| b.2)
}

/// Read each module's centre pixel through `h` and decode the grid.
fn sample_and_decode(bm: &Bitmap<'_>, h: &Homography, dim: usize) -> Option<String> {
    if dim < 21 {
        return None;
    }
    let mut bits = vec![false; dim * dim];
    let read = |bits: &mut [bool], mx: usize, my: usize| -> Option<()> {
        let (x, y) = h.map(mx as f64 + 0.5, my as f64 + 0.5);
        bits[my * dim + mx] = bm.sample(x, y)?;
        Some(())
    };
    // The timing patterns first: a wrongly placed grid is refused after 2 * (dim - 16) reads
    // instead of dim * dim.
    for k in 8..dim - 8 {
        read(&mut bits, k, 6)?;
        read(&mut bits, 6, k)?;
    }
    if !timing_plausible(&bits, dim) {
        return None;
    }
    for my in 0..dim {
        for mx in 0..dim {
            read(&mut bits, mx, my)?;
        }
    }
    super::grid_bits_text(dim, &bits)
}

/// Whether the two timing patterns of a sampled grid (row 6 and column 6 between the finders,
/// alternating dark and light) are mostly there. A grid of the wrong size or placed off the
/// code reads them at about chance (half wrong); a real code, even blurred or in perspective,
/// gets far more right. Checking costs a few dozen reads, against the Reed-Solomon decode a
/// wrongly placed grid would otherwise cost.
fn timing_plausible(bits: &[bool], dim: usize) -> bool {
    if dim < 21 || bits.len() != dim * dim {
        return false;
    }
    let (mut wrong, mut total) = (0usize, 0usize);
    for k in 8..dim - 8 {
        let dark = k % 2 == 0;
        wrong += usize::from(bits[6 * dim + k] != dark) + usize::from(bits[k * dim + 6] != dark);
        total += 2;
    }
    // Three in ten wrong is far from chance for any code of 25 modules or more (8+ timing
    // cells); version 1 has 5 on each side.
    10 * wrong <= 3 * total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{LadderStep, decode_step};
    use image::GrayImage;

    const TEXT: &str = "KP1:FINDER-TEST-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

    /// `text` as a QR code (with its 4-module quiet zone) whose outer corners land on `corners`
    /// (top-left, top-right, bottom-right, bottom-left) of a `w x h` canvas: a photo of a code
    /// held at an angle. Each pixel is the mean of 4x4 subsamples, so edges are soft.
    fn warped_code(text: &str, w: u32, h: u32, corners: [(f64, f64); 4]) -> GrayImage {
        let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)
            .expect("test text fits");
        let n = code.width();
        let colors = code.to_colors();
        let q = (n + 8) as f64;
        let to_modules = Homography::from_points(corners, [(0.0, 0.0), (q, 0.0), (q, q), (0.0, q)])
            .expect("a convex quadrilateral");
        GrayImage::from_fn(w, h, |x, y| {
            let mut sum = 0u32;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = f64::from(x) + (f64::from(sx) + 0.5) / 4.0;
                    let py = f64::from(y) + (f64::from(sy) + 0.5) / 4.0;
                    let (mx, my) = to_modules.map(px, py);
                    sum += if mx < 0.0 || my < 0.0 || mx >= q || my >= q {
                        90
                    } else {
                        let (cx, cy) = (mx as usize, my as usize);
                        let inside = (4..n + 4).contains(&cx) && (4..n + 4).contains(&cy);
                        if inside && colors[(cy - 4) * n + cx - 4] == qrcode::Color::Dark {
                            40
                        } else {
                            200
                        }
                    };
                }
            }
            image::Luma([(sum / 16) as u8])
        })
    }

    #[test]
    fn the_locator_reads_a_small_code_in_strong_perspective_at_every_rotation() {
        // About 3 pixels a module at the near edge, under 2.5 at the far one.
        let corners = [(40.0, 30.0), (190.0, 55.0), (180.0, 170.0), (35.0, 215.0)];
        let img = warped_code(TEXT, 240, 240, corners);
        for turn in 0..4 {
            let img = match turn {
                1 => image::imageops::rotate90(&img),
                2 => image::imageops::rotate180(&img),
                3 => image::imageops::rotate270(&img),
                _ => img.clone(),
            };
            assert_eq!(
                decode_step(&img, LadderStep::Finder).as_deref(),
                Some(TEXT),
                "turned {turn} x 90 degrees"
            );
        }
    }

    #[test]
    fn the_ratio_test_takes_1_1_3_1_1_and_refuses_others() {
        assert!(found_pattern_cross(&[4, 4, 12, 4, 4]));
        assert!(found_pattern_cross(&[3, 5, 11, 4, 4]));
        assert!(!found_pattern_cross(&[4, 4, 4, 4, 4]));
        assert!(!found_pattern_cross(&[4, 0, 12, 4, 4]));
        assert!(!found_pattern_cross(&[1, 1, 3, 1, 0]));
    }

    #[test]
    fn the_homography_maps_its_four_points() {
        let from = [(3.5, 3.5), (21.5, 3.5), (3.5, 21.5), (18.5, 18.5)];
        let to = [(10.0, 12.0), (100.0, 20.0), (5.0, 110.0), (90.0, 95.0)];
        let h = Homography::from_points(from, to).expect("general position");
        for (f, t) in from.iter().zip(to) {
            let (x, y) = h.map(f.0, f.1);
            assert!((x - t.0).abs() < 1e-6 && (y - t.1).abs() < 1e-6, "{f:?}");
        }
        // Three points on a line: no map.
        let line = [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)];
        assert!(Homography::from_points(line, to).is_none());
    }

    #[test]
    fn the_corners_are_named_whatever_the_order_and_rotation() {
        let p = |x: f64, y: f64| Candidate {
            x,
            y,
            module: 4.0,
            count: 3,
        };
        let (tl, tr, bl) = (p(10.0, 10.0), p(110.0, 10.0), p(10.0, 110.0));
        for [a, b, c] in [[tl, tr, bl], [bl, tl, tr], [tr, bl, tl], [tr, tl, bl]] {
            let [obl, otl, otr] = order(a, b, c);
            assert_eq!((obl.x, obl.y), (10.0, 110.0));
            assert_eq!((otl.x, otl.y), (10.0, 10.0));
            assert_eq!((otr.x, otr.y), (110.0, 10.0));
        }
    }

    /// The row scan reads the same run lengths, and so finds the same candidates, whether
    /// they come from the packed rows or from the bits one pixel at a time.
    #[test]
    fn candidates_from_packed_rows_equal_those_from_the_bits() {
        let corners = [(60.0, 40.0), (250.0, 70.0), (230.0, 260.0), (50.0, 230.0)];
        let mut img = warped_code(TEXT, 321, 300, corners);
        // Texture and stray dark pixels around the code, rows that start and end dark.
        for (i, px) in img.as_mut().iter_mut().enumerate() {
            if i % 97 == 0 || i % 321 == 0 || i % 321 == 320 {
                *px = 0;
            }
        }
        let cut = crate::frame::hybrid_cut(&img);
        let bits = cut.to_bools();
        let (w, h) = (321, 300);
        let by_pixel = all_candidates(&Bitmap {
            bits: &bits,
            w,
            h,
            packed: None,
        });
        let by_word = all_candidates(&Bitmap {
            bits: &bits,
            w,
            h,
            packed: Some(&cut),
        });
        assert!(by_pixel.len() >= 3, "{by_pixel:?}");
        assert_eq!(format!("{by_pixel:?}"), format!("{by_word:?}"));
    }

    #[test]
    fn tiny_or_mismatched_bitmaps_give_nothing() {
        for (w, h) in [(0, 0), (1, 1), (20, 200), (200, 20)] {
            let bits = vec![true; w * h];
            assert_eq!(
                decode(&Bitmap {
                    bits: &bits,
                    w,
                    h,
                    packed: None
                }),
                None
            );
        }
        let bits = vec![false; 10];
        assert_eq!(
            decode(&Bitmap {
                bits: &bits,
                w: 30,
                h: 30,
                packed: None
            }),
            None
        );
    }
}
