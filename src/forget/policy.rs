//! Retention policies: which snapshots of one volume a `--keep-*` policy keeps, and why.
//!
//! Pure: no repository, no clock. [`apply`] takes the snapshots of ONE volume (the caller
//! groups by volume) and decides for each one, in the manner of restic's `forget`:
//!
//! - Snapshots are ordered newest first by time (Unix seconds). Within one second a snapshot
//!   comes before its ancestors taken in the same second (it was taken after them, as the
//!   repository's `latest` says), then by id, descending: the order never depends on the order
//!   of the input.
//! - `keep_last N` keeps the N newest snapshots.
//! - `keep_hourly/daily/weekly/monthly/yearly N` each keep the newest snapshot of each of the
//!   N newest hours, days, ISO weeks (Monday to Sunday), months or years that hold a snapshot.
//!   Buckets are calendar periods in UTC; periods without snapshots do not count (a gap of a
//!   month in daily backups does not use up `--keep-daily`).
//! - `keep_within D` keeps every snapshot at most D older than the newest snapshot of the
//!   volume (not "now": a volume whose backups stopped keeps its last history). D is
//!   calendar-relative, see [`KeepWithin`].
//! - `keep_tags` keeps every snapshot carrying one of the tags.
//! - The newest snapshot of the volume is always kept (reason `newest`): a policy never
//!   removes the last copy of a volume. Only naming a snapshot removes it.
//!
//! Every rule that keeps a snapshot is listed as a reason; a snapshot no rule keeps is removed.

use crate::error::{Error, Result};
use crate::time;
use serde::{Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;

/// A duration for `--keep-within`, calendar-relative: `1y2m3d4h` is one year, two months,
/// three days and four hours. Subtracted from the newest snapshot's time in UTC: years and
/// months as calendar months (day of month kept, clamped to the end of a shorter month: one
/// month before March 31 is February 28 or 29), then days (`w` = 7 days) and hours as exact
/// multiples of 86400 and 3600 seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepWithin {
    pub months: u32,
    pub days: u32,
    pub hours: u32,
}

/// Upper bound on every number of a duration (a typo must not overflow the arithmetic).
const MAX_DURATION_COUNT: u32 = 100_000;

impl KeepWithin {
    /// Parses `30d`, `12h`, `2w`, `1y2m3d4h`: numbers each followed by a unit `y` (years),
    /// `m` (months), `w` (weeks), `d` (days) or `h` (hours), case-insensitive.
    pub fn parse(s: &str) -> Result<KeepWithin> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "invalid duration {s:?}: {why} (write e.g. 30d, 12h, 2w, 1y6m)"
            ))
        };
        let mut out = KeepWithin::default();
        let mut number = String::new();
        let mut any = false;
        for c in s.trim().chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            if number.is_empty() {
                return Err(bad("a unit must follow a number"));
            }
            let n: u32 = match number.parse() {
                Ok(n) if n <= MAX_DURATION_COUNT => n,
                _ => return Err(bad("number too large")),
            };
            number.clear();
            match c.to_ascii_lowercase() {
                'y' => out.months += n * 12,
                'm' => out.months += n,
                'w' => out.days += n * 7,
                'd' => out.days += n,
                'h' => out.hours += n,
                _ => return Err(bad(&format!("unknown unit {c:?}"))),
            }
            if out.months > MAX_DURATION_COUNT * 12
                || out.days > MAX_DURATION_COUNT * 7
                || out.hours > MAX_DURATION_COUNT
            {
                return Err(bad("too long"));
            }
            any = true;
        }
        if !number.is_empty() {
            return Err(bad("the last number has no unit"));
        }
        if !any {
            return Err(bad("empty"));
        }
        Ok(out)
    }

    /// The oldest time (Unix seconds) still within the duration before `newest`.
    pub fn cutoff(&self, newest: i64) -> i64 {
        let t = time::sub_months(newest, self.months);
        t - i64::from(self.days) * 86_400 - i64::from(self.hours) * 3600
    }
}

impl fmt::Display for KeepWithin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m) = (self.months / 12, self.months % 12);
        let mut any = false;
        for (n, unit) in [(y, 'y'), (m, 'm'), (self.days, 'd'), (self.hours, 'h')] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
                any = true;
            }
        }
        if !any {
            f.write_str("0h")?;
        }
        Ok(())
    }
}

/// A retention policy. Counts of 0 and an empty tag list are "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub keep_within: Option<KeepWithin>,
    pub keep_tags: Vec<String>,
}

impl Policy {
    /// True when no rule is given: such a policy would keep only the newest snapshot of each
    /// volume, which is refused rather than guessed.
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_within.is_none()
            && self.keep_tags.is_empty()
    }
}

/// Why a snapshot is kept (or, for [`Rule::Named`], removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Named on the command line: removed.
    Named,
    /// The newest snapshot of its volume.
    Newest,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    Within,
    /// Carries this tag.
    Tag(String),
    /// The parent of an interrupted backup that will resume from it (kept so that the
    /// resume does not have to start over).
    Resume,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Rule::Named => "named",
            Rule::Newest => "newest",
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
            Rule::Within => "within",
            Rule::Resume => "resume",
            Rule::Tag(t) => return write!(f, "tag:{t}"),
        };
        f.write_str(s)
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One snapshot as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub id: String,
    /// Unix seconds (UTC).
    pub time: i64,
    /// Nanoseconds past `time` (0 when unknown).
    pub nanos: u32,
    pub tags: Vec<String>,
    /// The parent's id: orders snapshots taken in the same second.
    pub parent: Option<String>,
}

/// The policy's decision for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    /// Kept by these rules; removed when empty.
    pub reasons: Vec<Rule>,
}

impl Decision {
    /// True when some rule keeps the snapshot.
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Orders `snaps` newest first (module doc): by time (seconds, then nanoseconds), then a
/// snapshot before its ancestors of the same instant, then by id. Returns indexes into `snaps`.
pub fn newest_first(snaps: &[Snap]) -> Vec<usize> {
    let by_id: HashMap<&str, &Snap> = snaps.iter().map(|s| (s.id.as_str(), s)).collect();
    // Number of ancestors taken in the same second, bounded (a hostile repository may hold a
    // parent cycle).
    let depth = |s: &Snap| {
        let mut d = 0usize;
        let mut parent = s.parent.as_deref();
        while let Some(p) = parent.and_then(|p| by_id.get(p)) {
            if p.time != s.time || d >= snaps.len() {
                break;
            }
            d += 1;
            parent = p.parent.as_deref();
        }
        d
    };
    let depths: Vec<usize> = snaps.iter().map(depth).collect();
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (snaps[i].time, snaps[i].nanos, depths[i], &snaps[i].id);
        key(b).cmp(&key(a))
    });
    order
}

/// The calendar bucket of a time for a calendar rule: equal for two times of one UTC hour,
/// day, ISO week, month or year.
fn bucket(rule: &Rule, t: i64) -> i64 {
    let days = t.div_euclid(86_400);
    match rule {
        Rule::Hourly => t.div_euclid(3600),
        Rule::Daily => days,
        Rule::Weekly => time::week_start(days),
        Rule::Monthly => {
            let (y, m, _) = time::civil_from_days(days);
            y * 12 + i64::from(m)
        }
        Rule::Yearly => time::civil_from_days(days).0,
        _ => 0,
    }
}

/// Decides for every snapshot of ONE volume what `policy` keeps, newest first (module doc).
/// An empty policy keeps only the newest snapshot; callers refuse it before.
pub fn apply(policy: &Policy, snaps: &[Snap]) -> Vec<Decision> {
    let order = newest_first(snaps);
    let newest_time = order.first().map(|&i| snaps[i].time);
    let cutoff = match (policy.keep_within, newest_time) {
        (Some(w), Some(t)) => Some(w.cutoff(t)),
        _ => None,
    };
    // (rule, snapshots still to keep, bucket of the last one kept)
    let mut calendar: Vec<(Rule, u32, Option<i64>)> = [
        (Rule::Hourly, policy.keep_hourly),
        (Rule::Daily, policy.keep_daily),
        (Rule::Weekly, policy.keep_weekly),
        (Rule::Monthly, policy.keep_monthly),
        (Rule::Yearly, policy.keep_yearly),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(r, n)| (r, n, None))
    .collect();
    let mut out = Vec::with_capacity(order.len());
    for (pos, &i) in order.iter().enumerate() {
        let s = &snaps[i];
        let mut reasons = Vec::new();
        if pos == 0 {
            reasons.push(Rule::Newest);
        }
        if (pos as u64) < u64::from(policy.keep_last) {
            reasons.push(Rule::Last);
        }
        for (rule, left, last) in calendar.iter_mut() {
            let b = bucket(rule, s.time);
            // Newest first: the first snapshot seen in a bucket is its newest.
            if *left > 0 && *last != Some(b) {
                *left -= 1;
                *last = Some(b);
                reasons.push(rule.clone());
            }
        }
        if cutoff.is_some_and(|c| s.time >= c) {
            reasons.push(Rule::Within);
        }
        for tag in &policy.keep_tags {
            if s.tags.contains(tag) {
                reasons.push(Rule::Tag(tag.clone()));
            }
        }
        out.push(Decision {
            id: s.id.clone(),
            reasons,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::days_from_civil;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64) -> i64 {
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s
    }

    fn snap(id: &str, time: i64) -> Snap {
        Snap {
            id: id.into(),
            time,
            nanos: 0,
            tags: vec![],
            parent: None,
        }
    }

    /// Applies `policy` and returns "id:reason,reason" (or "id:-" when removed), newest first.
    fn run(policy: &Policy, snaps: &[Snap]) -> Vec<String> {
        apply(policy, snaps)
            .iter()
            .map(|d| {
                let r: Vec<String> = d.reasons.iter().map(|r| r.to_string()).collect();
                format!(
                    "{}:{}",
                    d.id,
                    if r.is_empty() {
                        "-".into()
                    } else {
                        r.join(",")
                    }
                )
            })
            .collect()
    }

    /// A table case: (name, policy, snapshots (id, time), expected newest first).
    type Case<'a> = (&'a str, Policy, Vec<(&'a str, i64)>, Vec<&'a str>);

    fn check(cases: Vec<Case<'_>>) {
        for (name, policy, snaps, want) in cases {
            let snaps: Vec<Snap> = snaps.iter().map(|&(id, t)| snap(id, t)).collect();
            assert_eq!(run(&policy, &snaps), want, "case {name}");
            // The input order never matters.
            let mut reversed = snaps.clone();
            reversed.reverse();
            assert_eq!(
                run(&policy, &reversed),
                want,
                "case {name} (reversed input)"
            );
        }
    }

    fn p(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy::default();
        f(&mut p);
        p
    }

    #[test]
    fn keep_last_and_newest() {
        check(vec![
            ("empty", p(|p| p.keep_last = 2), vec![], vec![]),
            (
                "last 2 of 4",
                p(|p| p.keep_last = 2),
                vec![("a", 100), ("b", 200), ("c", 300), ("d", 400)],
                vec!["d:newest,last", "c:last", "b:-", "a:-"],
            ),
            (
                "last more than there are",
                p(|p| p.keep_last = 9),
                vec![("a", 100), ("b", 200)],
                vec!["b:newest,last", "a:last"],
            ),
            (
                "a tag rule that keeps nothing still keeps the newest",
                p(|p| p.keep_tags = vec!["x".into()]),
                vec![("a", 100), ("b", 200)],
                vec!["b:newest", "a:-"],
            ),
            (
                "same second: ties broken by id, descending",
                p(|p| p.keep_last = 2),
                vec![("a", 100), ("c", 100), ("b", 100), ("d", 50)],
                vec!["c:newest,last", "b:last", "a:-", "d:-"],
            ),
        ]);
    }

    #[test]
    fn same_second_child_is_newer_than_its_parent() {
        // "b" was taken after its parent "z" in the same second: b is the newest, although
        // its id sorts first.
        let snaps = vec![
            Snap {
                parent: Some("z".into()),
                ..snap("b", 100)
            },
            snap("z", 100),
            snap("a", 90),
        ];
        let policy = p(|p| p.keep_last = 1);
        assert_eq!(run(&policy, &snaps), vec!["b:newest,last", "z:-", "a:-"]);
        // A parent cycle does not hang.
        let cycle = vec![
            Snap {
                parent: Some("y".into()),
                ..snap("x", 5)
            },
            Snap {
                parent: Some("x".into()),
                ..snap("y", 5)
            },
        ];
        assert_eq!(run(&policy, &cycle).len(), 2);
    }

    #[test]
    fn same_second_snapshots_are_ordered_by_nanoseconds_without_a_parent_link() {
        // "b" started 2 ms after "z" in the same second, and the snapshot between them (the
        // parent that linked them) was forgotten: the nanoseconds still say b is newer.
        let snaps = vec![
            Snap {
                nanos: 700_000_000,
                ..snap("b", 100)
            },
            Snap {
                nanos: 698_000_000,
                ..snap("z", 100)
            },
        ];
        let policy = p(|p| p.keep_last = 1);
        assert_eq!(run(&policy, &snaps), vec!["b:newest,last", "z:-"]);
    }

    #[test]
    fn daily_and_hourly_with_same_second_and_gaps() {
        let d = |day, h, m, s| at(2024, 3, day, h, m, s);
        check(vec![
            (
                "daily: newest of each day, same second twice",
                p(|p| p.keep_daily = 3),
                vec![
                    ("a1", d(1, 1, 0, 0)),
                    ("a2", d(1, 23, 59, 59)),
                    ("b1", d(2, 0, 0, 0)),
                    ("b2", d(2, 12, 0, 0)),
                    ("b3", d(2, 12, 0, 0)),
                    ("c1", d(3, 0, 0, 1)),
                ],
                vec![
                    "c1:newest,daily",
                    "b3:daily",
                    "b2:-",
                    "b1:-",
                    "a2:daily",
                    "a1:-",
                ],
            ),
            (
                "daily: a gap of days does not use up the count",
                p(|p| p.keep_daily = 2),
                vec![
                    ("x", d(1, 10, 0, 0)),
                    ("y", d(20, 10, 0, 0)),
                    ("z", d(2, 10, 0, 0)),
                ],
                vec!["y:newest,daily", "z:daily", "x:-"],
            ),
            (
                "hourly at the boundary of an hour",
                p(|p| p.keep_hourly = 2),
                vec![
                    ("a", d(5, 9, 59, 59)),
                    ("b", d(5, 10, 0, 0)),
                    ("c", d(5, 10, 59, 59)),
                    ("e", d(5, 8, 0, 0)),
                ],
                vec!["c:newest,hourly", "b:-", "a:hourly", "e:-"],
            ),
        ]);
    }

    #[test]
    fn calendar_rules_at_month_ends() {
        check(vec![
            (
                "daily across Feb 28/29 of a leap year",
                p(|p| p.keep_daily = 3),
                vec![
                    ("f28", at(2024, 2, 28, 23, 0, 0)),
                    ("f29a", at(2024, 2, 29, 0, 0, 0)),
                    ("f29b", at(2024, 2, 29, 23, 59, 59)),
                    ("m1", at(2024, 3, 1, 0, 0, 0)),
                ],
                vec!["m1:newest,daily", "f29b:daily", "f29a:-", "f28:daily"],
            ),
            (
                "monthly: Jan 31, Feb 28 (no leap), Mar 1",
                p(|p| p.keep_monthly = 3),
                vec![
                    ("j31", at(2023, 1, 31, 23, 59, 59)),
                    ("f01", at(2023, 2, 1, 0, 0, 0)),
                    ("f28", at(2023, 2, 28, 23, 59, 59)),
                    ("m01", at(2023, 3, 1, 0, 0, 0)),
                    ("d31", at(2022, 12, 31, 12, 0, 0)),
                ],
                vec![
                    "m01:newest,monthly",
                    "f28:monthly",
                    "f01:-",
                    "j31:monthly",
                    "d31:-",
                ],
            ),
            (
                "monthly in a leap year: Feb 29 is February's newest",
                p(|p| p.keep_monthly = 2),
                vec![
                    ("f28", at(2024, 2, 28, 0, 0, 0)),
                    ("f29", at(2024, 2, 29, 0, 0, 0)),
                    ("m31", at(2024, 3, 31, 23, 59, 59)),
                    ("j31", at(2024, 1, 31, 0, 0, 0)),
                ],
                vec!["m31:newest,monthly", "f29:monthly", "f28:-", "j31:-"],
            ),
            (
                "monthly skips empty months",
                p(|p| p.keep_monthly = 2),
                vec![
                    ("jan", at(2024, 1, 15, 0, 0, 0)),
                    ("jun", at(2024, 6, 30, 0, 0, 0)),
                    ("jul", at(2024, 7, 1, 0, 0, 0)),
                ],
                vec!["jul:newest,monthly", "jun:monthly", "jan:-"],
            ),
        ]);
    }

    #[test]
    fn every_calendar_rule_at_month_and_year_ends() {
        // The last second of a month and the first of the next (twice, in the same second),
        // every calendar rule keeping 2: the older side is kept by every rule whose period
        // changes at the boundary.
        let every = p(|p| {
            p.keep_hourly = 2;
            p.keep_daily = 2;
            p.keep_weekly = 2;
            p.keep_monthly = 2;
            p.keep_yearly = 2
        });
        let cases = [
            // (last day of a month, first day of the next, rules keeping the older side)
            ((2024, 1, 31), (2024, 2, 1), "hourly,daily,monthly"),
            ((2023, 2, 28), (2023, 3, 1), "hourly,daily,monthly"),
            ((2024, 2, 29), (2024, 3, 1), "hourly,daily,monthly"),
            ((2024, 4, 30), (2024, 5, 1), "hourly,daily,monthly"),
            // Sunday to Monday: a new ISO week too.
            (
                (2023, 12, 31),
                (2024, 1, 1),
                "hourly,daily,weekly,monthly,yearly",
            ),
            // Both days in ISO week 53 of 2020.
            ((2020, 12, 31), (2021, 1, 1), "hourly,daily,monthly,yearly"),
        ];
        for ((y0, m0, d0), (y1, m1, d1), older) in cases {
            let name = format!("{y0}-{m0}-{d0} to {y1}-{m1}-{d1}");
            let snaps = vec![
                snap("x0", at(y0, m0, d0, 22, 0, 0)),
                snap("x1", at(y0, m0, d0, 23, 59, 59)),
                snap("x2a", at(y1, m1, d1, 0, 0, 0)),
                snap("x2b", at(y1, m1, d1, 0, 0, 0)),
            ];
            let want = vec![
                "x2b:newest,hourly,daily,weekly,monthly,yearly".to_string(),
                "x2a:-".to_string(),
                format!("x1:{older}"),
                "x0:-".to_string(),
            ];
            assert_eq!(run(&every, &snaps), want, "{name}");
        }
    }

    #[test]
    fn calendar_rules_at_year_ends() {
        check(vec![
            (
                "yearly: Dec 31 23:59:59 and Jan 1 00:00:00",
                p(|p| p.keep_yearly = 2),
                vec![
                    ("y23a", at(2023, 6, 1, 0, 0, 0)),
                    ("y23b", at(2023, 12, 31, 23, 59, 59)),
                    ("y24a", at(2024, 1, 1, 0, 0, 0)),
                    ("y24b", at(2024, 12, 31, 23, 59, 59)),
                    ("y22", at(2022, 12, 31, 23, 59, 59)),
                ],
                vec![
                    "y24b:newest,yearly",
                    "y24a:-",
                    "y23b:yearly",
                    "y23a:-",
                    "y22:-",
                ],
            ),
            (
                "monthly and yearly together across a year end",
                p(|p| {
                    p.keep_monthly = 2;
                    p.keep_yearly = 3
                }),
                vec![
                    ("nov", at(2023, 11, 30, 0, 0, 0)),
                    ("dec", at(2023, 12, 31, 23, 59, 59)),
                    ("jan", at(2024, 1, 1, 0, 0, 0)),
                    ("old", at(2021, 3, 3, 0, 0, 0)),
                ],
                vec![
                    "jan:newest,monthly,yearly",
                    "dec:monthly,yearly",
                    "nov:-",
                    "old:yearly",
                ],
            ),
            (
                "hourly across the year end",
                p(|p| p.keep_hourly = 2),
                vec![
                    ("a", at(2023, 12, 31, 23, 0, 0)),
                    ("b", at(2023, 12, 31, 23, 59, 59)),
                    ("c", at(2024, 1, 1, 0, 0, 0)),
                ],
                vec!["c:newest,hourly", "b:hourly", "a:-"],
            ),
        ]);
    }

    #[test]
    fn weekly_uses_iso_weeks() {
        check(vec![
            (
                "ISO week 53 of 2020 spans the year end",
                p(|p| p.keep_weekly = 3),
                vec![
                    // 2020-12-27 is a Sunday (week 52), 2020-12-28 Monday (week 53).
                    ("w52", at(2020, 12, 27, 23, 59, 59)),
                    ("w53a", at(2020, 12, 28, 0, 0, 0)),
                    ("w53b", at(2020, 12, 31, 12, 0, 0)),
                    ("w53c", at(2021, 1, 3, 23, 59, 59)),
                    // 2021-01-04 Monday: week 1 of 2021.
                    ("w01", at(2021, 1, 4, 0, 0, 0)),
                ],
                vec![
                    "w01:newest,weekly",
                    "w53c:weekly",
                    "w53b:-",
                    "w53a:-",
                    "w52:weekly",
                ],
            ),
            (
                "week 1 of 2025 starts on Monday 2024-12-30",
                p(|p| p.keep_weekly = 2),
                vec![
                    ("sun", at(2024, 12, 29, 12, 0, 0)),
                    ("mon", at(2024, 12, 30, 0, 0, 0)),
                    ("jan1", at(2025, 1, 1, 0, 0, 0)),
                    ("earlier", at(2024, 12, 23, 0, 0, 0)),
                ],
                vec!["jan1:newest,weekly", "mon:-", "sun:weekly", "earlier:-"],
            ),
        ]);
    }

    #[test]
    fn keep_within_boundaries() {
        let newest = at(2024, 3, 31, 12, 0, 0);
        check(vec![
            (
                "30d: exactly 30 days is kept, one second more is not",
                p(|p| p.keep_within = Some(KeepWithin::parse("30d").unwrap())),
                vec![
                    ("n", newest),
                    ("edge", newest - 30 * 86_400),
                    ("out", newest - 30 * 86_400 - 1),
                ],
                vec!["n:newest,within", "edge:within", "out:-"],
            ),
            (
                "1m from March 31 of a leap year is February 29",
                p(|p| p.keep_within = Some(KeepWithin::parse("1m").unwrap())),
                vec![
                    ("n", newest),
                    ("f29", at(2024, 2, 29, 12, 0, 0)),
                    ("f29early", at(2024, 2, 29, 11, 59, 59)),
                ],
                vec!["n:newest,within", "f29:within", "f29early:-"],
            ),
            (
                "relative to the newest snapshot, not now",
                p(|p| p.keep_within = Some(KeepWithin::parse("1y").unwrap())),
                vec![
                    ("n", at(2000, 2, 29, 0, 0, 0)),
                    ("in", at(1999, 2, 28, 0, 0, 0)),
                    ("out", at(1999, 2, 27, 23, 59, 59)),
                ],
                vec!["n:newest,within", "in:within", "out:-"],
            ),
            (
                "12h",
                p(|p| p.keep_within = Some(KeepWithin::parse("12h").unwrap())),
                vec![
                    ("n", newest),
                    ("in", newest - 43_200),
                    ("out", newest - 43_201),
                ],
                vec!["n:newest,within", "in:within", "out:-"],
            ),
        ]);
    }

    #[test]
    fn tags_and_combined_reasons() {
        let mut snaps: Vec<Snap> = (0..5).map(|i| snap(&format!("s{i}"), i * 86_400)).collect();
        snaps[0].tags = vec!["keep".into(), "x".into()];
        snaps[2].tags = vec!["x".into()];
        let policy = p(|p| {
            p.keep_last = 1;
            p.keep_daily = 2;
            p.keep_tags = vec!["keep".into(), "x".into()]
        });
        assert_eq!(
            run(&policy, &snaps),
            vec![
                "s4:newest,last,daily",
                "s3:daily",
                "s2:tag:x",
                "s1:-",
                "s0:tag:keep,tag:x"
            ]
        );
        assert!(apply(&policy, &snaps)[3].reasons.is_empty());
        assert!(!apply(&policy, &snaps)[3].keep());
    }

    #[test]
    fn durations_parse() {
        let k = |m, d, h| KeepWithin {
            months: m,
            days: d,
            hours: h,
        };
        assert_eq!(KeepWithin::parse("30d").unwrap(), k(0, 30, 0));
        assert_eq!(KeepWithin::parse("12h").unwrap(), k(0, 0, 12));
        assert_eq!(KeepWithin::parse("2w").unwrap(), k(0, 14, 0));
        assert_eq!(KeepWithin::parse("1y2m3d4h").unwrap(), k(14, 3, 4));
        assert_eq!(KeepWithin::parse("1Y1W").unwrap(), k(12, 7, 0));
        assert_eq!(
            KeepWithin::parse("1y2m3d4h").unwrap().to_string(),
            "1y2m3d4h"
        );
        assert_eq!(KeepWithin::parse("2w").unwrap().to_string(), "14d");
        for bad in [
            "",
            "d",
            "30",
            "3x",
            "1d2",
            "-1d",
            "99999999999d",
            "100001h",
            "1.5d",
        ] {
            assert!(
                matches!(KeepWithin::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn empty_policy() {
        assert!(Policy::default().is_empty());
        assert!(!p(|p| p.keep_yearly = 1).is_empty());
        assert!(!p(|p| p.keep_within = Some(KeepWithin::default())).is_empty());
    }
}
