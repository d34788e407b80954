//! Wall-clock time as RFC 3339 UTC strings, without a calendar dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Now as Unix seconds and the nanoseconds past them (0 before 1970).
pub fn now_unix_nanos() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (-(e.duration().as_secs() as i64), 0),
    }
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month 1..=12, day 1..=31) to days since 1970-01-01, proleptic Gregorian calendar;
/// the inverse of [`civil_from_days`] (H. Hinnant's `days_from_civil`). Out-of-range months
/// and days are the caller's bug; they give some day, never a panic.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// True for leap years of the Gregorian calendar.
pub fn is_leap_year(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

/// Number of days of month `m` (1..=12) of year `y`.
pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap_year(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Day of the week of a day since 1970-01-01: 0 = Monday … 6 = Sunday (1970-01-01 was a
/// Thursday).
pub fn weekday(days: i64) -> u32 {
    (days + 3).rem_euclid(7) as u32
}

/// The ISO 8601 week of a day since 1970-01-01: (ISO year, week 1..=53). Weeks start on
/// Monday; week 1 is the week holding the year's first Thursday, so the first days of January
/// may belong to the last week of the previous ISO year and the last days of December to week
/// 1 of the next.
pub fn iso_week(days: i64) -> (i64, u32) {
    // The Thursday of this week decides the ISO year; its day of the year decides the week.
    let thursday = days - i64::from(weekday(days)) + 3;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week as u32)
}

/// The Monday starting the ISO week of a day, as days since 1970-01-01: a number that is the
/// same for every day of one ISO week and differs between weeks.
pub fn week_start(days: i64) -> i64 {
    days - i64::from(weekday(days))
}

/// Unix seconds `secs` moved back by `months` calendar months (UTC), keeping the time of day
/// and the day of the month, clamped to the last day of a shorter month (March 31 minus one
/// month is February 28, or 29 in a leap year).
pub fn sub_months(secs: i64, months: u32) -> i64 {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let index = y * 12 + i64::from(m) - 1 - i64::from(months);
    let (ny, nm) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32);
    let nd = d.min(days_in_month(ny, nm));
    days_from_civil(ny, nm, nd) * 86_400 + rem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for days in (-800_000..800_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn leap_years_and_month_lengths() {
        assert!(is_leap_year(2000) && is_leap_year(2024) && !is_leap_year(1900));
        assert!(!is_leap_year(2100) && !is_leap_year(2023));
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2023, 12), 31);
        assert_eq!(days_in_month(2023, 11), 30);
    }

    #[test]
    fn iso_weeks_at_year_ends() {
        let w = |y, m, d| iso_week(days_from_civil(y, m, d));
        // 2020 has 53 ISO weeks (it starts on a Wednesday and is a leap year).
        assert_eq!(w(2020, 12, 31), (2020, 53));
        assert_eq!(w(2021, 1, 3), (2020, 53));
        assert_eq!(w(2021, 1, 4), (2021, 1));
        // 2026 starts on a Thursday: 53 weeks; 2027-01-03 (Sunday) is still in its week 53.
        assert_eq!(w(2026, 1, 1), (2026, 1));
        assert_eq!(w(2026, 12, 31), (2026, 53));
        assert_eq!(w(2027, 1, 3), (2026, 53));
        // The last days of December may be week 1 of the next year.
        assert_eq!(w(2024, 12, 30), (2025, 1));
        assert_eq!(w(2024, 12, 29), (2024, 52));
        assert_eq!(w(1970, 1, 1), (1970, 1));
        assert_eq!(weekday(days_from_civil(2024, 12, 30)), 0);
        // One week_start per ISO week.
        for days in -1000..1000 {
            let same = week_start(days) == week_start(days + 1);
            assert_eq!(same, iso_week(days) == iso_week(days + 1), "day {days}");
        }
    }

    #[test]
    fn months_back_clamp_to_month_end() {
        let t = |y, m, d| days_from_civil(y, m, d) * 86_400 + 3661;
        assert_eq!(sub_months(t(2024, 3, 31), 1), t(2024, 2, 29));
        assert_eq!(sub_months(t(2023, 3, 31), 1), t(2023, 2, 28));
        assert_eq!(sub_months(t(2024, 1, 31), 1), t(2023, 12, 31));
        assert_eq!(sub_months(t(2024, 2, 29), 12), t(2023, 2, 28));
        assert_eq!(sub_months(t(2024, 5, 15), 0), t(2024, 5, 15));
        assert_eq!(sub_months(t(2024, 5, 15), 29), t(2021, 12, 15));
    }

    #[test]
    fn formats_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
