//! The national trace: one case traced at every regional hub and the answers merged into one
//! report (`sync-hub nation trace`, run on the health authority's machine).
//!
//! This module is pure: the hubs file ([`parse_hubs`]), the merge of each hub's answer (or its
//! failure) into a [`NationalReport`] ([`merge`]) and its CSV ([`to_csv`]). The command line
//! (`cli`) sends the trace to every hub's `POST /api/trace` in parallel, each request bounded
//! in time and size, and hands the outcomes here. Each hub checks the authority's credential
//! and audits its part exactly as for a trace sent to it alone; paper entries stay sealed to
//! the authority (`sync-hub paper open` opens them from the national report too).

use crate::trace::{
    ReportContact, ReportVisit, SHARED_CODE_SECONDS, SharedCode, Sighting, TraceReport, csv_line,
    utc,
};
use serde::{Deserialize, Serialize};
use shared::time::UnixSeconds;
use std::collections::BTreeSet;

/// Most hubs in one hubs file (Korea has 17 provinces and metropolitan cities; a hub per
/// district would still fit).
pub const MAX_HUBS: usize = 300;
/// The largest answer read from one hub. A trace over a busy region's 28 days with a long
/// window is a few MB; anything over this is refused as that hub's error.
pub const MAX_HUB_ANSWER_BYTES: u64 = 16 * 1024 * 1024;
/// The most bytes read from all hubs of one trace together: with [`MAX_HUBS`] answering at
/// once, the per-answer bound alone would allow gigabytes. Answers read once it is spent are
/// refused as their hubs' errors.
pub const MAX_TOTAL_ANSWER_BYTES: u64 = 256 * 1024 * 1024;
/// The most visits of the case one hub's answer may hold (a person's 28 days are a few
/// hundred); more is refused as that hub's error.
pub const MAX_ANSWER_VISITS: usize = 100_000;
/// The most contacts, shared codes, unsynced facilities or notes one hub's answer may hold;
/// more is refused as that hub's error.
pub const MAX_ANSWER_CONTACTS: usize = 1_000_000;
/// The most shared codes across regions the report lists; more are counted in a note.
pub const MAX_CROSS_REGION_PAIRS: usize = 10_000;
/// The default time a hub has to answer, seconds.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
/// The longest `--timeout` accepted, seconds.
pub const MAX_TIMEOUT_SECONDS: u64 = 600;
/// Longest region name, characters.
const MAX_REGION_CHARS: usize = 100;
/// Longest hub URL, characters.
const MAX_URL_CHARS: usize = 500;
/// Longest credential, characters.
const MAX_CREDENTIAL_CHARS: usize = 500;

/// One regional hub: where its HTTP API is and the authority's credential there. No `Debug`:
/// it holds a secret.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubEntry {
    /// The region it serves (the report's name for it).
    pub region: String,
    /// Its HTTP API, `http://HOST:PORT` (no path), HOST on this machine: the loopback end
    /// of a TLS tunnel to the hub's HTTPS front.
    pub url: String,
    /// The health authority's credential at that hub (`sync-hub credential add --role
    /// authority` there).
    pub credential: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HubsFile {
    hubs: Vec<HubEntry>,
}

/// Reads and checks a hubs file: `{"hubs": [{"region", "url", "credential"}, ...]}`, at least
/// one hub, regions distinct (ignoring case), URLs `http://HOST:PORT` with HOST a loopback
/// address or `localhost` (plain HTTP never crosses a network), credentials without
/// spaces or control characters. Errors name the hub by its position and region, never its
/// credential.
pub fn parse_hubs(text: &str) -> Result<Vec<HubEntry>, String> {
    let file: HubsFile = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a hubs file ({{\"hubs\": [{{\"region\", \"url\", \"credential\"}}, ...]}}): {e}"
        )
    })?;
    if file.hubs.is_empty() {
        return Err("the hubs file lists no hub".into());
    }
    if file.hubs.len() > MAX_HUBS {
        return Err(format!("the hubs file lists more than {MAX_HUBS} hubs"));
    }
    let mut seen = BTreeSet::new();
    let mut hubs = Vec::with_capacity(file.hubs.len());
    for (i, mut h) in file.hubs.into_iter().enumerate() {
        let n = i + 1;
        h.region = h.region.trim().to_owned();
        if h.region.is_empty()
            || h.region.chars().count() > MAX_REGION_CHARS
            || h.region.chars().any(char::is_control)
        {
            return Err(format!(
                "hub {n}: region must be 1 to {MAX_REGION_CHARS} characters without control \
                 characters"
            ));
        }
        if !seen.insert(h.region.to_lowercase()) {
            return Err(format!(
                "hub {n}: region {:?} is listed twice: one hub per region",
                h.region
            ));
        }
        h.url = h.url.trim().trim_end_matches('/').to_owned();
        let rest = h.url.strip_prefix("http://");
        let url_ok = h.url.chars().count() <= MAX_URL_CHARS
            && rest.is_some_and(|r| {
                !r.is_empty()
                    && !r.contains('/')
                    && !r.contains('@')
                    && r.chars().all(|c| c.is_ascii_graphic())
            });
        if !url_ok {
            let hint = if h.url.starts_with("https://") {
                " (this build speaks plain HTTP: reach a remote hub through a TLS tunnel on this \
                 machine, e.g. `stunnel` or `ssh -L`, and list its loopback end)"
            } else {
                ""
            };
            return Err(format!(
                "hub {n} ({}): url must be http://HOST:PORT with no path{hint}",
                h.region
            ));
        }
        if !rest.is_some_and(is_loopback_authority) {
            return Err(format!(
                "hub {n} ({}): {} is not on this machine: the authority's credential and the \
                 case are never sent over plain HTTP across a network. Reach the hub over TLS \
                 (its operator's HTTPS front) through a tunnel on this machine (e.g. `stunnel` \
                 or `ssh -L`) and list its loopback end, http://127.0.0.1:PORT",
                h.region, h.url
            ));
        }
        let c = h.credential.trim().to_owned();
        if c.is_empty()
            || c.chars().count() > MAX_CREDENTIAL_CHARS
            || !c.chars().all(|ch| ch.is_ascii_graphic())
        {
            return Err(format!(
                "hub {n} ({}): credential must be 1 to {MAX_CREDENTIAL_CHARS} printable \
                 characters without spaces (the secret `credential add` printed)",
                h.region
            ));
        }
        h.credential = c;
        hubs.push(h);
    }
    Ok(hubs)
}

/// Whether `host_port` (`HOST:PORT` or `HOST`) names this machine: `localhost`, an IPv4
/// address in 127.0.0.0/8 or `[::1]`. Only there may the trace go over plain HTTP (to a local
/// TLS tunnel or proxy).
fn is_loopback_authority(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        }
    } else {
        match host_port.split_once(':') {
            Some((h, _)) => h,
            None => host_port,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// What one hub did with the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It answered with its report.
    Answered(Box<TraceReport>),
    /// It refused, failed, could not be reached or answered something that is not a report.
    Failed(String),
    /// It did not answer in time.
    TimedOut,
}

/// One hub's outcome, as the fan-out hands it to [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOutcome {
    /// The region (from the hubs file).
    pub region: String,
    /// The hub's URL.
    pub url: String,
    /// What happened.
    pub outcome: Outcome,
    /// Milliseconds until the outcome.
    pub millis: u64,
}

/// How one region's hub answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionStatus {
    /// Its report is merged.
    Ok,
    /// It refused or failed: nothing of this region is in the report.
    Error,
    /// It did not answer in time: nothing of this region is in the report.
    Timeout,
}

/// One region's line in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionReport {
    /// The region (from the hubs file).
    pub region: String,
    /// The hub asked.
    pub url: String,
    /// Whether it answered.
    pub status: RegionStatus,
    /// Why not, for `error`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Milliseconds until its answer (or failure).
    pub millis: u64,
    /// The case's visits it holds.
    pub visits: usize,
    /// Contacts it holds.
    pub contacts: usize,
    /// Facilities of this region that may hold visits its hub has not received (a device has
    /// not synced since the case's window there).
    pub unsynced_facilities: Vec<String>,
    /// This region's part may be incomplete: the hub did not answer, or a facility may hold
    /// unsynced visits.
    pub incomplete: bool,
    /// The hub's own notes.
    pub notes: Vec<String>,
}

/// A visit of the case, with its region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionVisit {
    /// The region whose hub holds it.
    pub region: String,
    /// The visit as that hub reported it (`shared_code` also set for a code seen in two
    /// regions).
    #[serde(flatten)]
    pub visit: ReportVisit,
}

/// A contact, with its region. A paper contact's identity stays sealed to the authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionContact {
    /// The region whose hub holds it.
    pub region: String,
    /// The contact as that hub reported it.
    #[serde(flatten)]
    pub contact: ReportContact,
}

/// A shared code, with the regions of its two sightings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSharedCode {
    /// The first sighting's region.
    pub first_region: String,
    /// The second sighting's region (another region: only the merge can see it).
    pub second_region: String,
    /// The shared code.
    #[serde(flatten)]
    pub code: SharedCode,
}

/// A facility that may hold unsynced visits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsyncedFacility {
    /// Its region.
    pub region: String,
    /// The facility.
    pub facility_id: String,
}

/// The national trace: every region's part merged, and how each region answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NationalReport {
    /// The case id.
    pub case_id: String,
    /// Why.
    pub purpose: String,
    /// When the authority's machine merged the answers.
    pub generated_at: UnixSeconds,
    /// The period searched (the same at every hub).
    pub from: UnixSeconds,
    /// The period searched.
    pub to: UnixSeconds,
    /// ± minutes for contacts.
    pub window_minutes: u64,
    /// Every hub answered and none flagged a facility that may hold unsynced visits.
    pub complete: bool,
    /// One line per hub of the hubs file, in its order.
    pub regions: Vec<RegionReport>,
    /// The case's visits in every region that answered, by time.
    pub visits: Vec<RegionVisit>,
    /// The contacts, by time.
    pub contacts: Vec<RegionContact>,
    /// Facilities that may hold visits their hub has not received, by region.
    pub unsynced_facilities: Vec<UnsyncedFacility>,
    /// The case's codes seen at two facilities within one code's validity: each hub's own,
    /// and pairs across two regions, which no single hub can see.
    pub shared_codes: Vec<RegionSharedCode>,
    /// Notes for the reader.
    pub notes: Vec<String>,
}

/// What was asked, as sent to every hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// The case id.
    pub case_id: String,
    /// Why.
    pub purpose: String,
    /// The period's start.
    pub from: UnixSeconds,
    /// The period's end.
    pub to: UnixSeconds,
    /// ± minutes for contacts.
    pub window_minutes: u64,
    /// The case's tokens, 32 lowercase hex characters each.
    pub tokens: Vec<String>,
}

/// Checks one hub's answer against what was asked: the same case, period and window, only
/// the asked tokens' visits and shared codes, and no more than the bounds allow. An answer
/// that fails is not merged: its region is `error` and the report not complete.
fn check_answer(asked: &Asked, r: &TraceReport) -> Result<(), String> {
    if r.case_id.as_deref() != Some(asked.case_id.as_str()) {
        return Err(format!(
            "the hub answered for case {:?}, not the case asked ({:?}): answer discarded",
            r.case_id, asked.case_id
        ));
    }
    if (r.from, r.to, r.window_minutes) != (asked.from, asked.to, asked.window_minutes) {
        return Err(format!(
            "the hub answered for {}..{} ±{} min, not the period asked ({}..{} ±{} min): \
             answer discarded",
            r.from, r.to, r.window_minutes, asked.from, asked.to, asked.window_minutes
        ));
    }
    if r.visits.len() > MAX_ANSWER_VISITS {
        return Err(format!(
            "the hub answered {} visits of the case, more than {MAX_ANSWER_VISITS}: answer \
             discarded",
            r.visits.len()
        ));
    }
    let longest = [
        r.contacts.len(),
        r.shared_codes.len(),
        r.unsynced_facilities.len(),
        r.notes.len(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if longest > MAX_ANSWER_CONTACTS {
        return Err(format!(
            "the hub's answer lists {longest} entries, more than {MAX_ANSWER_CONTACTS}: answer \
             discarded"
        ));
    }
    let asked_token = |t: &str| asked.tokens.iter().any(|a| a.eq_ignore_ascii_case(t));
    let unasked = r
        .visits
        .iter()
        .map(|v| v.token.as_str())
        .chain(r.shared_codes.iter().map(|c| c.token.as_str()))
        .filter(|t| !asked_token(t))
        .count();
    if unasked > 0 {
        return Err(format!(
            "the hub's answer holds {unasked} visits or shared codes of tokens not asked for: \
             answer discarded"
        ));
    }
    Ok(())
}

/// Merges the hubs' outcomes (in the hubs file's order) into one report.
pub fn merge(
    asked: &Asked,
    outcomes: Vec<HubOutcome>,
    generated_at: UnixSeconds,
) -> NationalReport {
    let mut regions = Vec::new();
    let mut visits = Vec::new();
    let mut contacts = Vec::new();
    let mut unsynced = Vec::new();
    let mut shared_codes = Vec::new();
    let mut notes = Vec::new();
    for o in outcomes {
        let mut line = RegionReport {
            region: o.region.clone(),
            url: o.url,
            status: RegionStatus::Ok,
            error: None,
            millis: o.millis,
            visits: 0,
            contacts: 0,
            unsynced_facilities: Vec::new(),
            incomplete: true,
            notes: Vec::new(),
        };
        // An answer that is not for what was asked is not merged.
        let outcome = match o.outcome {
            Outcome::Answered(r) => match check_answer(asked, &r) {
                Ok(()) => Outcome::Answered(r),
                Err(e) => Outcome::Failed(e),
            },
            other => other,
        };
        match outcome {
            Outcome::Failed(e) => {
                line.status = RegionStatus::Error;
                line.error = Some(e);
                notes.push(format!(
                    "region {}: the hub did not answer (error); visits there are missing from \
                     this report: trace again when it is back",
                    o.region
                ));
            }
            Outcome::TimedOut => {
                line.status = RegionStatus::Timeout;
                notes.push(format!(
                    "region {}: the hub did not answer in time; visits there are missing from \
                     this report: trace again, or with a longer --timeout",
                    o.region
                ));
            }
            Outcome::Answered(r) => {
                let r = *r;
                if !r.region.eq_ignore_ascii_case(&o.region) {
                    line.notes.push(format!(
                        "the hub says it serves region {:?}, the hubs file says {:?}",
                        r.region, o.region
                    ));
                }
                line.visits = r.visits.len();
                line.contacts = r.contacts.len();
                line.unsynced_facilities = r.unsynced_facilities.clone();
                line.incomplete = r.incomplete || !r.unsynced_facilities.is_empty();
                line.notes.extend(r.notes);
                unsynced.extend(r.unsynced_facilities.into_iter().map(|f| UnsyncedFacility {
                    region: o.region.clone(),
                    facility_id: f,
                }));
                shared_codes.extend(r.shared_codes.into_iter().map(|code| RegionSharedCode {
                    first_region: o.region.clone(),
                    second_region: o.region.clone(),
                    code,
                }));
                visits.extend(r.visits.into_iter().map(|visit| RegionVisit {
                    region: o.region.clone(),
                    visit,
                }));
                contacts.extend(r.contacts.into_iter().map(|contact| RegionContact {
                    region: o.region.clone(),
                    contact,
                }));
            }
        }
        regions.push(line);
    }
    let (cross, more) = cross_region_shared(&mut visits);
    shared_codes.extend(cross);
    if more > 0 {
        notes.push(format!(
            "{more} more sightings of the case's codes across regions are flagged \
             (shared_code) but not listed in shared_codes (at most {MAX_CROSS_REGION_PAIRS})"
        ));
    }
    visits.sort_by(|a, b| {
        (a.visit.scanned_at, &a.region, &a.visit.record_id).cmp(&(
            b.visit.scanned_at,
            &b.region,
            &b.visit.record_id,
        ))
    });
    contacts.sort_by(|a, b| {
        (a.contact.scanned_at, &a.region, &a.contact.record_id).cmp(&(
            b.contact.scanned_at,
            &b.region,
            &b.contact.record_id,
        ))
    });
    shared_codes.sort_by(|a, b| {
        (a.code.first.scanned_at, &a.code.token).cmp(&(b.code.first.scanned_at, &b.code.token))
    });
    if !unsynced.is_empty() {
        notes.push(format!(
            "{} facilities may hold visits their hub has not received yet (a device has not \
             synced since the case's window there): see unsynced_facilities",
            unsynced.len()
        ));
    }
    if contacts.iter().any(|c| c.contact.paper) {
        notes.push(
            "paper contacts are sealed to the health authority: open them with `sync-hub \
             paper open --identity FILE` on this report"
                .into(),
        );
    }
    let complete = regions.iter().all(|r| !r.incomplete);
    NationalReport {
        case_id: asked.case_id.clone(),
        purpose: asked.purpose.clone(),
        generated_at,
        from: asked.from,
        to: asked.to,
        window_minutes: asked.window_minutes,
        complete,
        regions,
        visits,
        contacts,
        unsynced_facilities: unsynced,
        shared_codes,
        notes,
    }
}

/// The same token at facilities of two different regions within [`SHARED_CODE_SECONDS`]: the
/// hub core's shared-code rule across hubs. Marks every visit with such a sighting in another
/// region `shared_code`, and lists each visit with its nearest earlier sighting in another
/// region within the validity as a pair (at most [`MAX_CROSS_REGION_PAIRS`]; the second value
/// counts the pairs left out). Linear after one sort by token and time, however many visits
/// share a token (a hostile hub may answer many).
fn cross_region_shared(visits: &mut [RegionVisit]) -> (Vec<RegionSharedCode>, usize) {
    let mut order: Vec<usize> = (0..visits.len())
        .filter(|i| !visits[*i].visit.token.is_empty())
        .collect();
    order.sort_by(|a, b| {
        let (a, b) = (&visits[*a].visit, &visits[*b].visit);
        (&a.token, a.scanned_at).cmp(&(&b.token, b.scanned_at))
    });
    let mut pairs = Vec::new();
    let mut left_out = 0usize;
    let mut marked = vec![false; visits.len()];
    // Forward: each visit's latest earlier visit of the same token in another region. The
    // latest visits of the two most recently seen regions are enough to find it.
    // Backward, the same for the earliest later visit: together every visit with a sighting in
    // another region within the validity is marked.
    for forward in [true, false] {
        let walk: Box<dyn Iterator<Item = &usize>> = if forward {
            Box::new(order.iter())
        } else {
            Box::new(order.iter().rev())
        };
        // (index of the latest visit of the most recent region, of the region before it).
        let mut recent: (Option<usize>, Option<usize>) = (None, None);
        let mut token: Option<&str> = None;
        for &i in walk {
            let v = &visits[i];
            if token != Some(v.visit.token.as_str()) {
                token = Some(v.visit.token.as_str());
                recent = (None, None);
            }
            let other = match recent.0 {
                Some(j) if visits[j].region != v.region => Some(j),
                _ => recent.1,
            };
            if let Some(j) = other
                && v.visit.scanned_at.abs_diff(visits[j].visit.scanned_at) <= SHARED_CODE_SECONDS
            {
                marked[i] = true;
                marked[j] = true;
                if forward {
                    if pairs.len() < MAX_CROSS_REGION_PAIRS {
                        pairs.push((j, i));
                    } else {
                        left_out += 1;
                    }
                }
            }
            recent = match recent.0 {
                Some(j) if visits[j].region == v.region => (Some(i), recent.1),
                _ => (Some(i), recent.0),
            };
        }
    }
    let sighting = |v: &ReportVisit| Sighting {
        facility_id: v.facility_id.clone(),
        facility_name: v.facility_name.clone(),
        scanned_at: v.scanned_at,
        device_id: v.device_id.clone(),
    };
    let codes = pairs
        .iter()
        .map(|&(i, j)| {
            let (a, b) = (&visits[i], &visits[j]);
            RegionSharedCode {
                first_region: a.region.clone(),
                second_region: b.region.clone(),
                code: SharedCode {
                    token: a.visit.token.clone(),
                    first: sighting(&a.visit),
                    second: sighting(&b.visit),
                    seconds_apart: b.visit.scanned_at - a.visit.scanned_at,
                },
            }
        })
        .collect();
    for (v, m) in visits.iter_mut().zip(marked) {
        if m {
            v.visit.shared_code = true;
        }
    }
    (codes, left_out)
}

/// The report as CSV (spreadsheet-safe): one row per region, visit, contact and facility that
/// may hold unsynced visits.
pub fn to_csv(r: &NationalReport) -> String {
    let mut out = csv_line(&[
        "kind",
        "case_id",
        "region",
        "status",
        "token",
        "paper",
        "facility_id",
        "facility_name",
        "facility_address",
        "scanned_at",
        "scanned_at_utc",
        "device_id",
        "record_id",
        "shared_code",
        "sealed_paper",
        "detail",
    ]);
    let case = r.case_id.as_str();
    for g in &r.regions {
        let status = match g.status {
            RegionStatus::Ok => "ok",
            RegionStatus::Error => "error",
            RegionStatus::Timeout => "timeout",
        };
        let detail = match &g.error {
            Some(e) => e.clone(),
            None => format!(
                "{} visits, {} contacts, incomplete: {}",
                g.visits, g.contacts, g.incomplete
            ),
        };
        out.push_str(&csv_line(&[
            "region", case, &g.region, status, "", "", "", "", "", "", "", "", "", "", "", &detail,
        ]));
    }
    for v in &r.visits {
        let s = v.visit.scanned_at;
        out.push_str(&csv_line(&[
            "visit",
            case,
            &v.region,
            "",
            &v.visit.token,
            "false",
            &v.visit.facility_id,
            &v.visit.facility_name,
            &v.visit.facility_address,
            &s.to_string(),
            &utc(s),
            &v.visit.device_id,
            &v.visit.record_id,
            &v.visit.shared_code.to_string(),
            "",
            "",
        ]));
    }
    for c in &r.contacts {
        let s = c.contact.scanned_at;
        out.push_str(&csv_line(&[
            "contact",
            case,
            &c.region,
            "",
            c.contact.token.as_deref().unwrap_or(""),
            &c.contact.paper.to_string(),
            &c.contact.facility_id,
            &c.contact.facility_name,
            &c.contact.facility_address,
            &s.to_string(),
            &utc(s),
            &c.contact.device_id,
            &c.contact.record_id,
            "false",
            c.contact.sealed_paper.as_deref().unwrap_or(""),
            "",
        ]));
    }
    for f in &r.unsynced_facilities {
        out.push_str(&csv_line(&[
            "unsynced_facility",
            case,
            &f.region,
            "",
            "",
            "",
            &f.facility_id,
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked() -> Asked {
        Asked {
            case_id: "case-7".into(),
            purpose: "cluster".into(),
            from: 1_000,
            to: 9_000,
            window_minutes: 30,
            tokens: vec![CASE.into()],
        }
    }

    fn visit(token: &str, facility: &str, at: UnixSeconds, record: &str) -> ReportVisit {
        ReportVisit {
            token: token.into(),
            facility_id: facility.into(),
            facility_name: format!("{facility} name"),
            facility_address: "addr".into(),
            scanned_at: at,
            device_id: "d-1".into(),
            record_id: record.into(),
            shared_code: false,
        }
    }

    fn contact(facility: &str, at: UnixSeconds, record: &str, paper: bool) -> ReportContact {
        ReportContact {
            token: (!paper).then(|| "ab".repeat(16)),
            paper,
            facility_id: facility.into(),
            facility_name: format!("{facility} name"),
            facility_address: "addr".into(),
            scanned_at: at,
            device_id: "d-1".into(),
            record_id: record.into(),
            sealed_paper: paper.then(|| "00ff".into()),
        }
    }

    fn report(region: &str, visits: Vec<ReportVisit>, contacts: Vec<ReportContact>) -> TraceReport {
        TraceReport {
            case_id: Some("case-7".into()),
            purpose: Some("cluster".into()),
            region: region.into(),
            generated_at: 9_000,
            from: 1_000,
            to: 9_000,
            window_minutes: 30,
            visits,
            contacts,
            unsynced_facilities: Vec::new(),
            incomplete: false,
            notes: Vec::new(),
            shared_codes: Vec::new(),
            answered_by: Vec::new(),
        }
    }

    fn outcome(region: &str, outcome: Outcome) -> HubOutcome {
        HubOutcome {
            region: region.into(),
            url: format!("http://{region}.example:7448"),
            outcome,
            millis: 5,
        }
    }

    const CASE: &str = "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1";

    #[test]
    fn answers_merge_by_time_and_failures_are_reported_per_region() {
        let mut gangnam = report(
            "gangnam",
            vec![visit(CASE, "f-g", 5_000, "r-g")],
            vec![contact("f-g", 5_100, "r-gc", true)],
        );
        gangnam.unsynced_facilities = vec!["f-g".into()];
        gangnam.incomplete = true;
        let mapo = report(
            "mapo",
            vec![visit(CASE, "f-m", 2_000, "r-m")],
            vec![contact("f-m", 2_050, "r-mc", false)],
        );
        let r = merge(
            &asked(),
            vec![
                outcome("gangnam", Outcome::Answered(Box::new(gangnam))),
                outcome("jeju", Outcome::Failed("connection refused".into())),
                outcome("mapo", Outcome::Answered(Box::new(mapo))),
                outcome("busan", Outcome::TimedOut),
            ],
            9_500,
        );
        let statuses: Vec<(&str, RegionStatus)> = r
            .regions
            .iter()
            .map(|g| (g.region.as_str(), g.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("gangnam", RegionStatus::Ok),
                ("jeju", RegionStatus::Error),
                ("mapo", RegionStatus::Ok),
                ("busan", RegionStatus::Timeout),
            ]
        );
        assert_eq!(r.regions[1].error.as_deref(), Some("connection refused"));
        assert!(r.regions[0].incomplete && !r.regions[2].incomplete);
        assert!(r.regions[1].incomplete && r.regions[3].incomplete);
        assert!(!r.complete);
        // Visits and contacts of both answering regions, by time, with their regions.
        let v: Vec<(&str, &str)> = r
            .visits
            .iter()
            .map(|v| (v.region.as_str(), v.visit.facility_id.as_str()))
            .collect();
        assert_eq!(v, [("mapo", "f-m"), ("gangnam", "f-g")]);
        let c: Vec<(&str, bool)> = r
            .contacts
            .iter()
            .map(|c| (c.region.as_str(), c.contact.paper))
            .collect();
        assert_eq!(c, [("mapo", false), ("gangnam", true)]);
        assert_eq!(
            r.contacts[1].contact.sealed_paper.as_deref(),
            Some("00ff"),
            "paper stays sealed"
        );
        assert_eq!(
            r.unsynced_facilities,
            [UnsyncedFacility {
                region: "gangnam".into(),
                facility_id: "f-g".into()
            }]
        );
        assert!(r.notes.iter().any(|n| n.contains("jeju")));
        assert!(r.notes.iter().any(|n| n.contains("busan")));
        // The JSON names each status in lower case; the CSV has one row per region.
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["regions"][3]["status"], "timeout");
        assert_eq!(json["visits"][0]["region"], "mapo");
        assert_eq!(json["visits"][0]["facility_id"], "f-m");
        let csv = to_csv(&r);
        assert_eq!(csv.lines().filter(|l| l.starts_with("region,")).count(), 4);
        assert!(csv.contains("region,case-7,jeju,error,"));
        assert_eq!(csv.lines().count(), 1 + 4 + 2 + 2 + 1);
    }

    #[test]
    fn all_answered_and_synced_is_complete() {
        let r = merge(
            &asked(),
            vec![
                outcome(
                    "a",
                    Outcome::Answered(Box::new(report("a", vec![], vec![]))),
                ),
                outcome(
                    "b",
                    Outcome::Answered(Box::new(report("b", vec![], vec![]))),
                ),
            ],
            9_500,
        );
        assert!(r.complete, "{r:?}");
        assert!(r.notes.is_empty());
    }

    #[test]
    fn a_code_seen_in_two_regions_within_its_validity_is_flagged() {
        let a = report("a", vec![visit(CASE, "f-a", 5_000, "r1")], vec![]);
        let b = report(
            "b",
            vec![
                visit(CASE, "f-b", 5_010, "r2"),
                // Later than one code's validity: a visit of its own.
                visit(CASE, "f-b", 5_000 + SHARED_CODE_SECONDS + 30, "r3"),
            ],
            vec![],
        );
        let r = merge(
            &asked(),
            vec![
                outcome("a", Outcome::Answered(Box::new(a))),
                outcome("b", Outcome::Answered(Box::new(b))),
            ],
            9_500,
        );
        assert_eq!(r.shared_codes.len(), 1);
        let s = &r.shared_codes[0];
        assert_eq!(
            (s.first_region.as_str(), s.second_region.as_str()),
            ("a", "b")
        );
        assert_eq!(s.code.seconds_apart, 10);
        let flagged: Vec<bool> = r.visits.iter().map(|v| v.visit.shared_code).collect();
        assert_eq!(flagged, [true, true, false]);
    }

    #[test]
    fn a_report_opens_as_a_trace_export_for_paper_open() {
        // `paper open` reads the contacts of either export.
        let r = merge(
            &asked(),
            vec![outcome(
                "a",
                Outcome::Answered(Box::new(report(
                    "a",
                    vec![],
                    vec![contact("f-a", 5_000, "r9", true)],
                ))),
            )],
            9_500,
        );
        let json = serde_json::to_string(&r).expect("json");
        let id = age::x25519::Identity::generate();
        let (opened, failed) = crate::trace::open_paper(&json, &id).expect("parses");
        assert!(opened.is_empty());
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].starts_with("r9:"), "{failed:?}");
    }

    #[test]
    fn an_answer_for_another_case_period_or_token_is_not_merged() {
        let good = || report("a", vec![visit(CASE, "f-a", 5_000, "r1")], vec![]);
        let mut other_case = good();
        other_case.case_id = Some("case-8".into());
        let mut other_from = good();
        other_from.from = 0;
        let mut other_to = good();
        other_to.to = 99_999;
        let mut other_window = good();
        other_window.window_minutes = 600;
        let mut no_case = good();
        no_case.case_id = None;
        let mut other_token = good();
        other_token
            .visits
            .push(visit(&"d".repeat(32), "f-a", 5_100, "r2"));
        for (what, bad) in [
            ("case", other_case),
            ("from", other_from),
            ("to", other_to),
            ("window", other_window),
            ("no case", no_case),
            ("token", other_token),
        ] {
            let r = merge(
                &asked(),
                vec![
                    outcome("a", Outcome::Answered(Box::new(bad))),
                    outcome("b", Outcome::Answered(Box::new(good()))),
                ],
                9_500,
            );
            assert_eq!(r.regions[0].status, RegionStatus::Error, "{what}: {r:?}");
            assert!(r.regions[0].error.is_some(), "{what}");
            assert!(!r.complete, "{what}");
            assert_eq!(r.regions[1].status, RegionStatus::Ok, "{what}");
            // Nothing of the mismatching answer is in the report.
            assert_eq!(r.visits.len(), 1, "{what}: {r:?}");
            assert_eq!(r.visits[0].region, "b", "{what}");
        }
        // Upper-case hex of an asked token is the asked token.
        let mut upper = good();
        upper.visits[0].token = CASE.to_uppercase();
        let r = merge(
            &asked(),
            vec![outcome("a", Outcome::Answered(Box::new(upper)))],
            9_500,
        );
        assert!(r.complete, "{r:?}");
    }

    #[test]
    fn many_visits_of_one_token_merge_in_bounded_output() {
        // Two hostile hubs answer 50,000 sightings each of the case's token at the same
        // second: every pair is within one code's validity (2.5 billion pairs).
        let n = 50_000;
        let many = |region: &str| {
            let visits = (0..n)
                .map(|i| visit(CASE, region, 5_000, &format!("{region}-{i}")))
                .collect();
            report(region, visits, vec![])
        };
        let r = merge(
            &asked(),
            vec![
                outcome("a", Outcome::Answered(Box::new(many("a")))),
                outcome("b", Outcome::Answered(Box::new(many("b")))),
            ],
            9_500,
        );
        assert!(r.regions.iter().all(|g| g.status == RegionStatus::Ok));
        assert_eq!(r.visits.len(), 2 * n);
        assert_eq!(r.shared_codes.len(), MAX_CROSS_REGION_PAIRS);
        assert!(r.visits.iter().all(|v| v.visit.shared_code));
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("not listed in shared_codes")),
            "{:?}",
            r.notes
        );
        // More visits than one answer may hold: that hub's error.
        let r = merge(
            &asked(),
            vec![outcome(
                "a",
                Outcome::Answered(Box::new(report(
                    "a",
                    (0..=MAX_ANSWER_VISITS)
                        .map(|i| visit(CASE, "f", 5_000, &i.to_string()))
                        .collect(),
                    vec![],
                ))),
            )],
            9_500,
        );
        assert_eq!(r.regions[0].status, RegionStatus::Error);
        assert!(r.visits.is_empty());
    }

    #[test]
    fn cross_region_flags_match_every_pair_within_the_validity() {
        // The linear pass marks exactly the visits the quadratic rule marks.
        let at = [
            ("a", 1_000),
            ("a", 1_010),
            ("b", 1_000 + SHARED_CODE_SECONDS + 5),
            ("c", 9_000),
            ("c", 9_001),
            ("a", 20_000),
            ("b", 20_000 + SHARED_CODE_SECONDS),
            ("b", 20_001 + SHARED_CODE_SECONDS),
        ];
        let mut visits: Vec<RegionVisit> = at
            .iter()
            .enumerate()
            .map(|(i, (g, t))| RegionVisit {
                region: (*g).into(),
                visit: visit(CASE, g, *t, &i.to_string()),
            })
            .collect();
        let expect: Vec<bool> = at
            .iter()
            .map(|(g, t)| {
                at.iter()
                    .any(|(h, u)| h != g && t.abs_diff(*u) <= SHARED_CODE_SECONDS)
            })
            .collect();
        let (pairs, left_out) = cross_region_shared(&mut visits);
        let got: Vec<bool> = visits.iter().map(|v| v.visit.shared_code).collect();
        assert_eq!(got, expect);
        assert_eq!(left_out, 0);
        // 1,010 (a) -> b; 20,000 (a) -> 20,000+S (b).
        assert_eq!(pairs.len(), 2, "{pairs:?}");
    }

    #[test]
    fn hubs_files_are_checked() {
        let ok = parse_hubs(
            r#"{"hubs": [
                {"region": "mapo", "url": "http://127.0.0.1:7448/", "credential": " s3cret "},
                {"region": "gangnam", "url": "http://localhost:7449", "credential": "x"},
                {"region": "jeju", "url": "http://[::1]:7450", "credential": "x"},
                {"region": "busan", "url": "http://127.8.0.1:7451", "credential": "x"}
            ]}"#,
        )
        .expect("valid");
        assert_eq!(ok.len(), 4);
        assert_eq!(ok[0].url, "http://127.0.0.1:7448");
        assert_eq!(ok[0].credential, "s3cret");
        let bad = |text: &str, needle: &str| {
            let e = parse_hubs(text).err().unwrap_or_default();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(!e.contains("TOPSECRET"), "{e}");
        };
        bad(r#"{"hubs": []}"#, "no hub");
        bad("[]", "not a hubs file");
        bad(
            r#"{"hubs": [{"region": "a", "url": "http://127.0.0.1:1", "credential": "TOPSECRET", "x": 1}]}"#,
            "not a hubs file",
        );
        bad(
            r#"{"hubs": [{"region": "a", "url": "http://127.0.0.1:1", "credential": "TOPSECRET"},
                         {"region": "A", "url": "http://127.0.0.1:2", "credential": "TOPSECRET"}]}"#,
            "listed twice",
        );
        bad(
            r#"{"hubs": [{"region": "a", "url": "https://127.0.0.1:1", "credential": "TOPSECRET"}]}"#,
            "plain HTTP",
        );
        // Plain HTTP only to this machine (a local TLS tunnel): never across a network.
        for remote in [
            "http://hub.gangnam.example:7448",
            "http://10.0.0.5:7448",
            "http://[2001:db8::1]:7448",
            "http://localhost.evil.example:7448",
            "http://127.0.0.1.evil.example:7448",
        ] {
            bad(
                &format!(
                    r#"{{"hubs": [{{"region": "a", "url": "{remote}", "credential": "TOPSECRET"}}]}}"#
                ),
                "is not on this machine",
            );
        }
        bad(
            r#"{"hubs": [{"region": "a", "url": "http://127.0.0.1:1/api", "credential": "TOPSECRET"}]}"#,
            "no path",
        );
        bad(
            r#"{"hubs": [{"region": "a", "url": "http://127.0.0.1:1", "credential": "TOP SECRET"}]}"#,
            "without spaces",
        );
        bad(
            r#"{"hubs": [{"region": "", "url": "http://127.0.0.1:1", "credential": "TOPSECRET"}]}"#,
            "region must be",
        );
    }
}
