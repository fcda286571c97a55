//! The health authority's trace as its users get it: checked input (case id, purpose, tokens,
//! a contact window of at most 12 hours, a period no longer than the retention period), the
//! ledger's answer with facility names and addresses, paper entries still sealed to the
//! authority, facilities whose answer may be incomplete, codes that look like a shared screenshot, JSON and spreadsheet-safe CSV exports,
//! and an audit entry for every trace. The authority opens the sealed paper entries of an
//! export on its own machine with [`open_paper`] (`sync-hub paper open`).

use crate::audit::{AuditError, AuditLog, Event};
use crate::auth::Principal;
use crate::ledger::{IndexedVisit, Ledger, LedgerError};
use crate::registry::Hub;
use serde::{Deserialize, Serialize};
use shared::paper::PaperEntry;
use shared::time::{DAY_SECONDS, Day, RETENTION_DAYS, UnixSeconds};
use shared::{FacilityId, PartitionId, RecordId};
use std::collections::{BTreeMap, BTreeSet};

/// Contacts within this many minutes of a visit, unless asked otherwise.
pub const DEFAULT_WINDOW_MINUTES: u64 = 30;
/// The longest contact window (`--window-minutes`, ± around each of the case's visits): 12
/// hours, a whole day's span around a visit.
///
/// Contact tracing asks who was at the same place at the same time. A KI-Pass check-in records
/// arrival only, so the window must cover how long a visit may last (a meal or a karaoke
/// session is a few hours, a worship service or a long shift up to a working day) plus how long
/// exhaled aerosol lingers in a closed room after someone leaves (an hour or two with poor
/// ventilation); 12 hours either side covers all of that with room to spare. A wider window
/// stops being a contact search: at 28 days (the retention period, the earlier cap) one trace
/// returned a facility's whole month of visitors.
pub const MAX_WINDOW_MINUTES: u64 = 12 * 60;
/// The longest trace period (`to - from`): the retention period.
pub const MAX_PERIOD_SECONDS: u64 = RETENTION_DAYS as u64 * DAY_SECONDS;
/// One code's validity: the same token at two facilities within this is a shared screenshot
/// (the hub core's constant).
pub use shared::hub::SHARED_CODE_SECONDS;
/// At most this many tokens per trace.
pub const MAX_TOKENS: usize = 1000;

/// A trace request as it arrives (HTTP body, or the CLI's flags).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Tokens as 32 hex characters.
    pub tokens: Vec<String>,
    /// ± minutes for contacts (default 30).
    pub window_minutes: Option<u64>,
    /// The case id.
    pub case: Option<String>,
    /// Why.
    pub purpose: Option<String>,
    /// Start of the period, Unix seconds (default: `to` minus the retention period).
    pub from: Option<UnixSeconds>,
    /// End of the period, Unix seconds (default: now).
    pub to: Option<UnixSeconds>,
}

/// A checked trace request.
#[derive(Clone)]
pub struct TraceQuery {
    /// The case's tokens.
    pub tokens: Vec<[u8; 16]>,
    /// ± minutes for contacts.
    pub window_minutes: u64,
    /// The case id.
    pub case: Option<String>,
    /// Why.
    pub purpose: Option<String>,
    /// Start of the period.
    pub from: UnixSeconds,
    /// End of the period.
    pub to: UnixSeconds,
}

// Tokens identify people through their issuer; logs must never show them.
impl std::fmt::Debug for TraceQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceQuery")
            .field("tokens", &self.tokens.len())
            .field("window_minutes", &self.window_minutes)
            .field("case", &self.case)
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// Parses and checks trace tokens.
pub fn parse_tokens(tokens: &[String]) -> Result<Vec<[u8; 16]>, String> {
    if tokens.is_empty() {
        return Err("give at least one token".into());
    }
    if tokens.len() > MAX_TOKENS {
        return Err(format!("at most {MAX_TOKENS} tokens per trace"));
    }
    tokens
        .iter()
        .map(|t| {
            shared::token::Token::from_hex(t.trim())
                .map(|t| *t.as_bytes())
                .map_err(|_| {
                    format!(
                        "{:?} is not a token (32 hex characters)",
                        t.chars().take(40).collect::<String>()
                    )
                })
        })
        .collect()
}

fn text(
    field: &str,
    v: Option<String>,
    max: usize,
    required: bool,
) -> Result<Option<String>, String> {
    match v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) {
        None if required => Err(format!("{field} is required for a trace")),
        None => Ok(None),
        Some(s) if s.chars().count() > max || s.chars().any(char::is_control) => Err(format!(
            "{field} must be at most {max} characters without control characters"
        )),
        Some(s) => Ok(Some(s)),
    }
}

impl TraceRequest {
    /// Checks the request at `now`. `require_case`: the case id and purpose must be given (the
    /// health authority over HTTP); the hub's own operator may leave them out (`spec/cli.md`).
    pub fn check(self, now: UnixSeconds, require_case: bool) -> Result<TraceQuery, String> {
        let tokens = parse_tokens(&self.tokens)?;
        let window_minutes = self.window_minutes.unwrap_or(DEFAULT_WINDOW_MINUTES);
        if window_minutes > MAX_WINDOW_MINUTES {
            return Err(format!(
                "the contact window may not exceed {MAX_WINDOW_MINUTES} minutes (12 hours) \
                 either side of a visit: a wider one returns a facility's whole register, \
                 not the people present at the same time; trace again with a smaller \
                 window_minutes"
            ));
        }
        let to = self.to.unwrap_or(now);
        let from = self.from.unwrap_or(to.saturating_sub(MAX_PERIOD_SECONDS));
        if from > to {
            return Err("the period's start (from) is after its end (to)".into());
        }
        if to - from > MAX_PERIOD_SECONDS {
            return Err(format!(
                "the period may not exceed the retention period ({RETENTION_DAYS} days): \
                 nothing older is kept"
            ));
        }
        Ok(TraceQuery {
            tokens,
            window_minutes,
            case: text("the case id", self.case, 100, require_case)?,
            purpose: text("the purpose", self.purpose, 500, require_case)?,
            from,
            to,
        })
    }
}

/// One visit of the case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportVisit {
    /// The token, 32 hex characters.
    pub token: String,
    /// Where.
    pub facility_id: String,
    /// The facility's registered name.
    pub facility_name: String,
    /// Its registered address.
    pub facility_address: String,
    /// When, by the recording device's clock.
    pub scanned_at: UnixSeconds,
    /// Which device recorded it.
    pub device_id: String,
    /// The record's id in its partition.
    pub record_id: String,
    /// The same token was seen at another facility within one code's validity.
    pub shared_code: bool,
}

/// A visit at the same facility within the window of one of the case's visits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportContact {
    /// The contact's token; absent for a paper entry.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token: Option<String>,
    /// A paper-log entry.
    pub paper: bool,
    /// Where.
    pub facility_id: String,
    /// The facility's registered name.
    pub facility_name: String,
    /// Its registered address.
    pub facility_address: String,
    /// When, by the recording device's clock.
    pub scanned_at: UnixSeconds,
    /// Which device recorded it.
    pub device_id: String,
    /// The record's id in its partition.
    pub record_id: String,
    /// A paper entry's identity, hex of an age file sealed to the health authority: open it
    /// with `sync-hub paper open --identity FILE`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sealed_paper: Option<String>,
}

/// Where a shared code was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    /// The facility.
    pub facility_id: String,
    /// Its name.
    pub facility_name: String,
    /// When.
    pub scanned_at: UnixSeconds,
    /// Which device.
    pub device_id: String,
}

/// One token seen at two different facilities within one code's validity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCode {
    /// The token.
    pub token: String,
    /// The earlier sighting.
    pub first: Sighting,
    /// The later one.
    pub second: Sighting,
    /// Seconds between them.
    pub seconds_apart: u64,
}

/// A trace's answer (`spec/cli.md` fields, and more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    /// The case id.
    pub case_id: Option<String>,
    /// Why.
    pub purpose: Option<String>,
    /// The hub's region.
    pub region: String,
    /// When the hub answered.
    pub generated_at: UnixSeconds,
    /// The period searched.
    pub from: UnixSeconds,
    /// The period searched.
    pub to: UnixSeconds,
    /// ± minutes for contacts.
    pub window_minutes: u64,
    /// The case's visits, by time.
    pub visits: Vec<ReportVisit>,
    /// The contacts, by time.
    pub contacts: Vec<ReportContact>,
    /// Facilities whose devices have not synced since the window: the answer may be
    /// incomplete there.
    pub unsynced_facilities: Vec<String>,
    /// Whether any facility of the answer may hold visits the hub has not received.
    pub incomplete: bool,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// The case's tokens seen at two facilities within one code's validity.
    pub shared_codes: Vec<SharedCode>,
    /// Which hub of the region answered for which UTC days of the period: this hub for the
    /// days since it was created; a hub rebuilt from nothing cannot read the days before (it
    /// must not hold their old keys), and its paired hub answers for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answered_by: Vec<AnsweredBy>,
}

/// One hub's part of a trace's days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnsweredBy {
    /// The hub's endpoint id.
    pub hub: String,
    /// The first UTC day it answered for.
    pub from_day: Day,
    /// The last.
    pub to_day: Day,
    /// Whether it answered (`false`: those days are missing from the report).
    pub answered: bool,
}

/// The days of a trace's period this hub can read (from the day it was created), and the
/// earlier ones it cannot (`None` when there are none): a hub rebuilt from an empty folder
/// starts a new day-key ratchet and reads nothing of the days before.
pub fn readable_split(
    q: &TraceQuery,
    created_at: UnixSeconds,
) -> ((Day, Day), Option<(UnixSeconds, UnixSeconds)>) {
    let first = Day::of(q.from).max(Day::of(created_at));
    let own = (first, Day::of(q.to).max(first));
    let created_day_start = u64::from(Day::of(created_at).0) * 86_400;
    let before = (q.from < created_day_start).then(|| (q.from, (created_day_start - 1).min(q.to)));
    (own, before)
}

/// Merges the paired hub's answer for the same period (`peer`: its report, or why it did not
/// answer) into this hub's `local` report. `unreadable` is the part of the period this hub
/// cannot read itself (it was created or rebuilt after it, [`readable_split`]): missing, the
/// report is incomplete; otherwise a silent peer only costs what it alone holds so far.
pub fn merge_peer_answer(
    mut local: TraceReport,
    peer_id: &str,
    q: &TraceQuery,
    unreadable: Option<(UnixSeconds, UnixSeconds)>,
    peer: Result<TraceReport, String>,
) -> TraceReport {
    let days = (Day::of(q.from), Day::of(q.to));
    match peer {
        Ok(r) => {
            let visits: BTreeSet<String> =
                local.visits.iter().map(|v| v.record_id.clone()).collect();
            local.visits.extend(
                r.visits
                    .into_iter()
                    .filter(|v| !visits.contains(&v.record_id)),
            );
            local.visits.sort_by(|a, b| {
                (a.scanned_at, &a.facility_id, &a.record_id).cmp(&(
                    b.scanned_at,
                    &b.facility_id,
                    &b.record_id,
                ))
            });
            let contacts: BTreeSet<String> =
                local.contacts.iter().map(|c| c.record_id.clone()).collect();
            local.contacts.extend(
                r.contacts
                    .into_iter()
                    .filter(|c| !contacts.contains(&c.record_id)),
            );
            local.contacts.sort_by(|a, b| {
                (a.scanned_at, &a.facility_id, &a.record_id).cmp(&(
                    b.scanned_at,
                    &b.facility_id,
                    &b.record_id,
                ))
            });
            // Either hub's flag stands (the hubs share device contacts every few seconds, so
            // they rarely differ; when they do, the cautious answer is the union).
            for f in r.unsynced_facilities {
                if !local.unsynced_facilities.contains(&f) {
                    local.unsynced_facilities.push(f);
                }
            }
            local.unsynced_facilities.sort();
            local.incomplete |= r.incomplete;
            let seen: BTreeSet<(String, String)> = local
                .shared_codes
                .iter()
                .map(|c| (c.token.clone(), c.second.facility_id.clone()))
                .collect();
            local.shared_codes.extend(
                r.shared_codes
                    .into_iter()
                    .filter(|c| !seen.contains(&(c.token.clone(), c.second.facility_id.clone()))),
            );
            if let Some((from, to)) = unreadable {
                local.notes.push(format!(
                    "days {} to {} were read by the region's other hub ({}) alone: this hub was \
                     created or rebuilt after them and cannot read them",
                    Day::of(from),
                    Day::of(to),
                    short(peer_id)
                ));
            }
            local.answered_by.push(AnsweredBy {
                hub: peer_id.to_owned(),
                from_day: days.0,
                to_day: days.1,
                answered: true,
            });
        }
        Err(why) => {
            match unreadable {
                Some((from, to)) => {
                    local.incomplete = true;
                    local.notes.push(format!(
                        "days {} to {} are missing: this hub was created or rebuilt after them \
                         and cannot read them, and the region's other hub ({}) did not answer: {why}",
                        Day::of(from),
                        Day::of(to),
                        short(peer_id)
                    ));
                }
                None => {
                    // Its devices' contacts reached this hub, but their visits may not have
                    // yet: a facility this hub calls synced may hold visits only it has.
                    local.incomplete = true;
                    local.notes.push(format!(
                        "the region's other hub ({}) did not answer ({why}): visits that reached \
                         only it may be missing",
                        short(peer_id)
                    ));
                }
            }
            local.answered_by.push(AnsweredBy {
                hub: peer_id.to_owned(),
                from_day: days.0,
                to_day: days.1,
                answered: false,
            });
        }
    }
    local
}

fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

/// The first day a report may still show as its answer leaves: the later of the retention
/// horizon now and the oldest day whose key the hub still holds (read from `keys/`, which a
/// purge advances). A report read from a snapshot taken before a purge that finished while it
/// ran must not hand out the days that purge destroyed.
pub fn live_floor(hub: &Hub, now: UnixSeconds) -> Day {
    let oldest = hub.keys().ratchet().map(|r| r.oldest()).unwrap_or(Day(0));
    shared::time::horizon(now).max(oldest)
}

/// Drops from `report` every visit, contact and shared code of a day before `floor`
/// ([`live_floor`] as the answer leaves); says so in its notes. Returns how many were dropped.
pub fn retain_live(report: &mut TraceReport, floor: Day) -> usize {
    let before = report.visits.len() + report.contacts.len() + report.shared_codes.len();
    report.visits.retain(|v| Day::of(v.scanned_at) >= floor);
    report.contacts.retain(|c| Day::of(c.scanned_at) >= floor);
    report
        .shared_codes
        .retain(|c| Day::of(c.first.scanned_at) >= floor);
    let dropped =
        before - (report.visits.len() + report.contacts.len() + report.shared_codes.len());
    if dropped > 0 {
        report.notes.push(format!(
            "{dropped} visits of days before {floor} were left out: retention destroyed those \
             days while this trace was read"
        ));
    }
    dropped
}

/// [`retain_live`] for the shared-code report.
pub fn retain_live_codes(report: &mut SharedCodeReport, floor: Day) -> usize {
    let before = report.shared_codes.len();
    report
        .shared_codes
        .retain(|c| Day::of(c.first.scanned_at) >= floor);
    before - report.shared_codes.len()
}

/// A trace failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The audit log failed: no answer is given without its audit entry.
    #[error("the trace was not answered because it could not be audited: {0}")]
    Audit(#[from] AuditError),
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

struct Names(BTreeMap<String, (String, String)>);

impl Names {
    fn of(hub: &Hub) -> Result<Self, crate::store::StoreError> {
        Ok(Names(
            hub.store()
                .facilities()?
                .into_iter()
                .map(|f| {
                    (
                        f.id.to_string(),
                        (f.registration.name, f.registration.address),
                    )
                })
                .collect(),
        ))
    }

    fn get(&self, id: &FacilityId) -> (String, String) {
        self.0
            .get(id.as_str())
            .cloned()
            .unwrap_or_else(|| ("(removed facility)".into(), String::new()))
    }
}

/// Pairs of `visits` (indices) with the same token at different facilities within
/// [`SHARED_CODE_SECONDS`]: the hub core's rule.
pub use shared::hub::find_shared;

fn shared_code(names: &Names, a: &IndexedVisit, b: &IndexedVisit) -> SharedCode {
    let sighting = |v: &IndexedVisit| Sighting {
        facility_id: v.facility.to_string(),
        facility_name: names.get(&v.facility).0,
        scanned_at: v.scanned_at,
        device_id: v.device.to_string(),
    };
    SharedCode {
        token: a.token.map(hex::encode).unwrap_or_default(),
        first: sighting(a),
        second: sighting(b),
        seconds_apart: b.scanned_at - a.scanned_at,
    }
}

/// Runs a trace for `who` and appends it to the audit log before answering.
pub fn run(
    hub: &Hub,
    ledger: &Ledger<'_>,
    audit: &AuditLog<'_>,
    who: &Principal,
    q: &TraceQuery,
    now: UnixSeconds,
) -> Result<TraceReport, TraceError> {
    let (report, event) = read(hub, ledger, q, now)?;
    audit.append(who, event, now)?;
    Ok(report)
}

/// The read part of a trace: the report and the audit event that must be appended (durably)
/// before the report is handed to anyone ([`run`] does both; the running hub reads off its
/// actor and appends on it, `crate::reads`). Writes nothing.
pub fn read(
    hub: &Hub,
    ledger: &Ledger<'_>,
    q: &TraceQuery,
    now: UnixSeconds,
) -> Result<(TraceReport, Event), TraceError> {
    let facts = ledger.trace_facts(&q.tokens, q.window_minutes, q.from, q.to, now)?;
    let names = Names::of(hub)?;

    // Paper contacts: fetch their sealed identities, one partition load per facility-day.
    let mut paper: BTreeMap<PartitionId, BTreeSet<RecordId>> = BTreeMap::new();
    for c in facts.contacts.iter().filter(|c| c.token.is_none()) {
        paper
            .entry(PartitionId {
                facility: c.facility.clone(),
                day: Day::of(c.scanned_at),
            })
            .or_default()
            .insert(c.record);
    }
    let mut sealed: BTreeMap<RecordId, Vec<u8>> = BTreeMap::new();
    for (id, records) in &paper {
        sealed.extend(ledger.sealed_paper(id, records)?);
    }

    let pairs = find_shared(&facts.visits);
    let flagged: BTreeSet<usize> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let shared_codes: Vec<SharedCode> = pairs
        .iter()
        .map(|(a, b)| shared_code(&names, &facts.visits[*a], &facts.visits[*b]))
        .collect();

    let visits: Vec<ReportVisit> = facts
        .visits
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (name, address) = names.get(&v.facility);
            ReportVisit {
                token: v.token.map(hex::encode).unwrap_or_default(),
                facility_id: v.facility.to_string(),
                facility_name: name,
                facility_address: address,
                scanned_at: v.scanned_at,
                device_id: v.device.to_string(),
                record_id: v.record.to_string(),
                shared_code: flagged.contains(&i),
            }
        })
        .collect();
    let mut unopened_paper = 0;
    let contacts: Vec<ReportContact> = facts
        .contacts
        .iter()
        .map(|v| {
            let (name, address) = names.get(&v.facility);
            let sealed_paper = match v.token {
                Some(_) => None,
                None => {
                    let s = sealed.get(&v.record).map(hex::encode);
                    if s.is_none() {
                        unopened_paper += 1;
                    }
                    s
                }
            };
            ReportContact {
                token: v.token.map(hex::encode),
                paper: v.token.is_none(),
                facility_id: v.facility.to_string(),
                facility_name: name,
                facility_address: address,
                scanned_at: v.scanned_at,
                device_id: v.device.to_string(),
                record_id: v.record.to_string(),
                sealed_paper,
            }
        })
        .collect();
    let unsynced: Vec<String> = facts.unsynced.iter().map(|f| f.to_string()).collect();
    let mut notes = Vec::new();
    if !unsynced.is_empty() {
        notes.push(format!(
            "{} facilities have devices that have not synced since the window of the case's \
             visits there: visits recorded there may be missing ({})",
            unsynced.len(),
            unsynced.join(", ")
        ));
    }
    if unopened_paper > 0 {
        notes.push(format!(
            "{unopened_paper} paper entries could not be unsealed by the hub and carry no sealed identity"
        ));
    }
    if !shared_codes.is_empty() {
        notes.push(
            "some of the case's codes were scanned at two facilities within one code's \
             validity (15 s): a shared screenshot; the person at one of them may not be the case"
                .into(),
        );
    }

    let touched: BTreeSet<&str> = visits
        .iter()
        .map(|v| v.facility_id.as_str())
        .chain(contacts.iter().map(|c| c.facility_id.as_str()))
        .collect();
    let mut event = Event::new(
        "trace",
        serde_json::json!({
            "tokens": q.tokens.len(),
            "from": q.from,
            "to": q.to,
            "window_minutes": q.window_minutes,
            "visits": visits.len(),
            "contacts": contacts.len(),
            "paper_contacts": contacts.iter().filter(|c| c.paper).count(),
            "unsynced_facilities": unsynced.len(),
            "shared_codes": shared_codes.len(),
        }),
    )
    .facilities(touched);
    event.case_id = q.case.clone();
    event.purpose = q.purpose.clone();

    let report = TraceReport {
        case_id: q.case.clone(),
        purpose: q.purpose.clone(),
        region: hub.config().region.clone(),
        generated_at: now,
        from: q.from,
        to: q.to,
        window_minutes: q.window_minutes,
        incomplete: !unsynced.is_empty(),
        visits,
        contacts,
        unsynced_facilities: unsynced,
        notes,
        shared_codes,
        answered_by: vec![AnsweredBy {
            hub: hub.config().endpoint_id.clone(),
            from_day: readable_split(q, hub.config().created_at).0.0,
            to_day: readable_split(q, hub.config().created_at).0.1,
            answered: true,
        }],
    };
    Ok((report, event))
}

/// The shared-code report: every token seen at two different facilities within one code's
/// validity in the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCodeReport {
    /// The period searched.
    pub from: UnixSeconds,
    /// The period searched.
    pub to: UnixSeconds,
    /// QR visits read.
    pub visits_scanned: u64,
    /// What was found, by time.
    pub shared_codes: Vec<SharedCode>,
}

/// Scans the live index of the period for shared codes; audited like a trace.
pub fn shared_code_report(
    hub: &Hub,
    ledger: &Ledger<'_>,
    audit: &AuditLog<'_>,
    who: &Principal,
    from: UnixSeconds,
    to: UnixSeconds,
    now: UnixSeconds,
) -> Result<SharedCodeReport, TraceError> {
    let (report, event) = read_shared_codes(hub, ledger, from, to, now)?;
    audit.append(who, event, now)?;
    Ok(report)
}

/// A pause added to every shared-code scan, milliseconds: 0 but in tests, which set it (a
/// region-sized scan takes about a minute; a test stands for it with this) through
/// [`pause_scans_for_tests`]. Never set by the binaries.
static SCAN_PAUSE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes every shared-code scan of this process take at least `pause` more (tests only: it
/// stands for the full scan of a region-sized hub).
#[doc(hidden)]
pub fn pause_scans_for_tests(pause: std::time::Duration) {
    SCAN_PAUSE_MS.store(
        u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The read part of the shared-code report: the report and the audit event that must be
/// appended before it is handed out ([`shared_code_report`] does both). Writes nothing.
pub fn read_shared_codes(
    hub: &Hub,
    ledger: &Ledger<'_>,
    from: UnixSeconds,
    to: UnixSeconds,
    now: UnixSeconds,
) -> Result<(SharedCodeReport, Event), TraceError> {
    let pause = SCAN_PAUSE_MS.load(std::sync::atomic::Ordering::Relaxed);
    if pause > 0 {
        std::thread::sleep(std::time::Duration::from_millis(pause));
    }
    let mut visits: Vec<IndexedVisit> = Vec::new();
    ledger.scan_visits(Day::of(from), Day::of(to), now, |v| {
        if v.token.is_some() && (from..=to).contains(&v.scanned_at) {
            visits.push(v.clone());
        }
    })?;
    let names = Names::of(hub)?;
    let mut codes: Vec<SharedCode> = find_shared(&visits)
        .into_iter()
        .map(|(a, b)| shared_code(&names, &visits[a], &visits[b]))
        .collect();
    codes.sort_by(|a, b| (a.first.scanned_at, &a.token).cmp(&(b.first.scanned_at, &b.token)));
    let touched: BTreeSet<&str> = codes
        .iter()
        .flat_map(|c| [c.first.facility_id.as_str(), c.second.facility_id.as_str()])
        .collect();
    let event = Event::new(
        "report.shared_codes",
        serde_json::json!({ "from": from, "to": to, "found": codes.len() }),
    )
    .facilities(touched);
    let report = SharedCodeReport {
        from,
        to,
        visits_scanned: visits.len() as u64,
        shared_codes: codes,
    };
    Ok((report, event))
}

/// A spreadsheet-safe CSV cell: a cell that a spreadsheet could take for a formula (starting
/// with `=`, `+`, `-`, `@`, a tab or a carriage return, or their full-width forms) gets a
/// leading `'`; any cell with a comma, quote or line break, or that was neutralised, is quoted
/// with its quotes doubled. Line breaks stay inside the quoted cell.
pub fn csv_cell(s: &str) -> String {
    let risky = s.starts_with(['=', '+', '-', '@', '\t', '\r', '＝', '＋', '－', '＠']);
    let v = if risky { format!("'{s}") } else { s.to_owned() };
    if risky || v.contains([',', '"', '\n', '\r', ';']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

/// One CSV line (CRLF-terminated, RFC 4180) of `cells`.
pub fn csv_line<S: AsRef<str>>(cells: &[S]) -> String {
    let mut line = cells
        .iter()
        .map(|c| csv_cell(c.as_ref()))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(t: UnixSeconds) -> String {
    let days = (t / DAY_SECONDS) as i64;
    let secs = t % DAY_SECONDS;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The trace as CSV: one row per visit, contact and facility whose answer may be incomplete.
pub fn to_csv(r: &TraceReport) -> String {
    let mut out = csv_line(&[
        "kind",
        "case_id",
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
    ]);
    let case = r.case_id.clone().unwrap_or_default();
    for v in &r.visits {
        out.push_str(&csv_line(&[
            "visit",
            &case,
            &v.token,
            "false",
            &v.facility_id,
            &v.facility_name,
            &v.facility_address,
            &v.scanned_at.to_string(),
            &utc(v.scanned_at),
            &v.device_id,
            &v.record_id,
            &v.shared_code.to_string(),
            "",
        ]));
    }
    for c in &r.contacts {
        out.push_str(&csv_line(&[
            "contact",
            &case,
            c.token.as_deref().unwrap_or(""),
            &c.paper.to_string(),
            &c.facility_id,
            &c.facility_name,
            &c.facility_address,
            &c.scanned_at.to_string(),
            &utc(c.scanned_at),
            &c.device_id,
            &c.record_id,
            "false",
            c.sealed_paper.as_deref().unwrap_or(""),
        ]));
    }
    for f in &r.unsynced_facilities {
        let v = r.visits.iter().find(|v| &v.facility_id == f);
        out.push_str(&csv_line(&[
            "unsynced_facility",
            &case,
            "",
            "",
            f,
            v.map(|v| v.facility_name.as_str()).unwrap_or(""),
            v.map(|v| v.facility_address.as_str()).unwrap_or(""),
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

/// A paper contact opened by the health authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenedPaper {
    /// Where.
    pub facility_id: String,
    /// The facility's name.
    pub facility_name: String,
    /// Its address.
    pub facility_address: String,
    /// When the device recorded the entry.
    pub scanned_at: UnixSeconds,
    /// The record's id.
    pub record_id: String,
    /// The visitor's name.
    pub name: String,
    /// The visitor's phone number (empty when they gave a personal safe number instead).
    pub phone: String,
    /// The visitor's personal safe number (개인안심번호), if they wrote one; `null` for an
    /// entry without one (every entry sealed before safe numbers existed).
    pub safe_number: Option<String>,
    /// When the visit happened, as written.
    pub visited_at: UnixSeconds,
    /// A guardian consented.
    pub guardian_consent: bool,
    /// Staff's remarks.
    pub remarks: String,
}

/// Reads an age identity file (`AGE-SECRET-KEY-1...`, `#` comments allowed).
pub fn read_identity(text: &str) -> Result<age::x25519::Identity, String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| "the identity file holds no AGE-SECRET-KEY-1... line".to_owned())?
        .parse::<age::x25519::Identity>()
        .map_err(|_| "the identity file's key is not an age X25519 identity".to_owned())
}

/// What [`open_paper`] reads of an export: its contacts. A hub's trace (`trace --json`) and a
/// national trace (`nation trace`, whose contacts also name their region) both have them.
#[derive(Deserialize)]
struct ContactsOf {
    contacts: Vec<ReportContact>,
}

/// Opens every sealed paper entry of a trace export (its JSON: a hub's trace or a national
/// trace) with the authority's identity. Entries that do not open are reported by record id,
/// never skipped silently.
pub fn open_paper(
    export_json: &str,
    identity: &age::x25519::Identity,
) -> Result<(Vec<OpenedPaper>, Vec<String>), String> {
    let report: ContactsOf = serde_json::from_str(export_json).map_err(|e| {
        format!("not a trace export (sync-hub trace --json, or sync-hub nation trace): {e}")
    })?;
    let mut opened = Vec::new();
    let mut failed = Vec::new();
    for c in report.contacts.iter().filter(|c| c.paper) {
        let Some(hex_sealed) = &c.sealed_paper else {
            failed.push(format!("{}: no sealed entry in the export", c.record_id));
            continue;
        };
        let entry = hex::decode(hex_sealed)
            .map_err(|e| e.to_string())
            .and_then(|b| PaperEntry::open_as_authority(&b, identity).map_err(|e| e.to_string()));
        match entry {
            Ok(e) => opened.push(OpenedPaper {
                facility_id: c.facility_id.clone(),
                facility_name: c.facility_name.clone(),
                facility_address: c.facility_address.clone(),
                scanned_at: c.scanned_at,
                record_id: c.record_id.clone(),
                name: e.name.clone(),
                phone: e.phone.clone(),
                safe_number: e.safe_number.clone(),
                visited_at: e.visited_at,
                guardian_consent: e.guardian_consent,
                remarks: e.remarks.clone(),
            }),
            Err(e) => failed.push(format!("{}: {e}", c.record_id)),
        }
    }
    Ok((opened, failed))
}

/// Opened paper entries as CSV.
pub fn paper_csv(entries: &[OpenedPaper]) -> String {
    let mut out = csv_line(&[
        "facility_id",
        "facility_name",
        "facility_address",
        "scanned_at_utc",
        "visited_at_utc",
        "name",
        "phone",
        "safe_number",
        "guardian_consent",
        "remarks",
        "record_id",
    ]);
    for e in entries {
        out.push_str(&csv_line(&[
            e.facility_id.as_str(),
            &e.facility_name,
            &e.facility_address,
            &utc(e.scanned_at),
            &utc(e.visited_at),
            &e.name,
            &e.phone,
            e.safe_number.as_deref().unwrap_or(""),
            &e.guardian_consent.to_string(),
            &e.remarks,
            &e.record_id,
        ]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_starts_are_neutralised_and_quoted() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("=1+1"), "\"'=1+1\"");
        assert_eq!(csv_cell("+82"), "\"'+82\"");
        assert_eq!(csv_cell("-2"), "\"'-2\"");
        assert_eq!(csv_cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(csv_cell("\tx"), "\"'\tx\"");
        assert_eq!(csv_cell("\rx"), "\"'\rx\"");
        assert_eq!(csv_cell("a \"b\", c"), "\"a \"\"b\"\", c\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell("a=b"), "a=b");
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn periods_longer_than_retention_are_refused() {
        let req = |from, to| TraceRequest {
            tokens: vec!["00".repeat(16)],
            from,
            to,
            ..TraceRequest::default()
        };
        let now = 100 * DAY_SECONDS;
        assert!(
            req(Some(now - MAX_PERIOD_SECONDS), Some(now))
                .check(now, false)
                .is_ok()
        );
        assert!(
            req(Some(now - MAX_PERIOD_SECONDS - 1), Some(now))
                .check(now, false)
                .is_err()
        );
        assert!(req(Some(now), Some(now - 1)).check(now, false).is_err());
        assert!(
            req(None, None).check(now, true).is_err(),
            "case id required"
        );
        let mut r = req(None, None);
        r.case = Some("case-1".into());
        r.purpose = Some("contact tracing".into());
        assert!(r.check(now, true).is_ok());
    }

    #[test]
    fn contact_windows_beyond_twelve_hours_are_refused() {
        let now = 100 * DAY_SECONDS;
        let req = |window_minutes| TraceRequest {
            tokens: vec!["00".repeat(16)],
            window_minutes,
            ..TraceRequest::default()
        };
        assert!(req(None).check(now, false).is_ok());
        assert!(req(Some(MAX_WINDOW_MINUTES)).check(now, false).is_ok());
        for refused in [MAX_WINDOW_MINUTES + 1, 7 * 24 * 60, 28 * 24 * 60, u64::MAX] {
            let err = req(Some(refused))
                .check(now, false)
                .err()
                .unwrap_or_default();
            assert!(err.contains("720 minutes"), "{refused}: {err}");
        }
    }

    #[test]
    fn shared_codes_need_two_facilities_within_fifteen_seconds() {
        let v = |f: &str, t: u64, token: u8| IndexedVisit {
            facility: FacilityId::parse(f).unwrap_or_else(|e| panic!("{e}")),
            scanned_at: t,
            device: shared::DeviceId::parse("dev_a").unwrap_or_else(|e| panic!("{e}")),
            token: Some([token; 16]),
            record: RecordId([t as u8; 16]),
        };
        let visits = vec![
            v("fac_a", 100, 1),
            v("fac_b", 110, 1),
            v("fac_a", 200, 2),
            v("fac_b", 216, 2),
            v("fac_a", 300, 3),
            v("fac_a", 301, 3),
        ];
        assert_eq!(find_shared(&visits), vec![(0, 1)]);
    }

    fn visit(record: &str, at: u64) -> ReportVisit {
        ReportVisit {
            token: "00".repeat(16),
            facility_id: "fac_0011223344556677".into(),
            facility_name: "Star".into(),
            facility_address: "x".into(),
            scanned_at: at,
            device_id: "dev".into(),
            record_id: record.into(),
            shared_code: false,
        }
    }

    fn report(visits: Vec<ReportVisit>, unsynced: Vec<&str>) -> TraceReport {
        TraceReport {
            case_id: None,
            purpose: None,
            region: "mapo".into(),
            generated_at: 0,
            from: 0,
            to: 10 * 86_400,
            window_minutes: 30,
            visits,
            contacts: Vec::new(),
            incomplete: !unsynced.is_empty(),
            unsynced_facilities: unsynced.into_iter().map(str::to_owned).collect(),
            notes: Vec::new(),
            shared_codes: Vec::new(),
            answered_by: Vec::new(),
        }
    }

    fn query() -> TraceQuery {
        TraceQuery {
            tokens: vec![[0; 16]],
            window_minutes: 30,
            case: None,
            purpose: None,
            from: 0,
            to: 10 * 86_400,
        }
    }

    #[test]
    fn the_peer_hubs_answer_is_merged_once_and_says_who_answered() {
        let local = report(vec![visit("r1", 100)], vec![]);
        let peer = report(vec![visit("r2", 50), visit("r1", 100)], vec!["fac_x"]);
        let merged = merge_peer_answer(local.clone(), "peerhub", &query(), None, Ok(peer));
        let ids: Vec<&str> = merged.visits.iter().map(|v| v.record_id.as_str()).collect();
        assert_eq!(ids, vec!["r2", "r1"], "each visit once, by time");
        assert_eq!(merged.unsynced_facilities, vec!["fac_x".to_owned()]);
        assert!(merged.incomplete);
        assert_eq!(merged.answered_by.len(), 1);
        assert!(merged.answered_by[0].answered);
        // A silent peer: complete when this hub can read every day, incomplete otherwise.
        let quiet = merge_peer_answer(local.clone(), "peerhub", &query(), None, Err("down".into()));
        assert!(
            quiet.incomplete,
            "visits that reached only the silent peer may be missing"
        );
        assert!(!quiet.answered_by[0].answered);
        let (own, before) = readable_split(&query(), 5 * 86_400 + 7);
        assert_eq!(own, (Day(5), Day(10)));
        assert_eq!(before, Some((0, 5 * 86_400 - 1)));
        let missing = merge_peer_answer(local, "peerhub", &query(), before, Err("down".into()));
        assert!(missing.incomplete);
        assert!(missing.notes.iter().any(|n| n.contains("are missing")));
    }

    #[test]
    fn a_report_leaves_out_the_days_retention_destroyed_while_it_was_read() {
        let mut r = report(vec![visit("r1", 86_400), visit("r2", 5 * 86_400)], vec![]);
        assert_eq!(retain_live(&mut r, Day(3)), 1);
        assert_eq!(r.visits.len(), 1);
        assert_eq!(r.visits[0].record_id, "r2");
        assert!(r.notes.iter().any(|n| n.contains("left out")));
        assert_eq!(retain_live(&mut r, Day(3)), 0);
    }
}
