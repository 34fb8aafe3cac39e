//! The NAB `machine_temperature_system_failure` series and its labeled
//! anomaly windows (Numenta Anomaly Benchmark, MIT licence; see
//! `data/nab/LICENSE.txt`), embedded so the demo runs from any directory.

/// The CSV series: `timestamp,value`, 5-minute cadence.
pub const SERIES_CSV: &str =
    include_str!("../../../data/nab/machine_temperature_system_failure.csv");
/// NAB's labeled anomaly windows for every series.
pub const WINDOWS_JSON: &str = include_str!("../../../data/nab/anomaly_windows.json");
/// Key of this series in [`WINDOWS_JSON`].
pub const SERIES_KEY: &str = "realKnownCause/machine_temperature_system_failure.csv";

/// Why the embedded data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A CSV line is malformed.
    #[error("line {line}: {problem}")]
    Csv {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The windows JSON is malformed.
    #[error("anomaly windows: {0}")]
    Windows(String),
}

/// One point of the series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Unix seconds (the series is in UTC).
    pub ts: i64,
    /// Temperature.
    pub value: f64,
}

/// Parses `YYYY-MM-DD HH:MM:SS` (optionally with fractional seconds) as UTC.
#[must_use]
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Parses the embedded series.
///
/// # Errors
/// [`NabError::Csv`] on a malformed line.
pub fn series() -> Result<Vec<Point>, NabError> {
    let mut out = Vec::new();
    for (i, line) in SERIES_CSV.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: &str| NabError::Csv {
            line: i + 1,
            problem: problem.into(),
        };
        let (ts, value) = line
            .split_once(',')
            .ok_or_else(|| bad("expected timestamp,value"))?;
        out.push(Point {
            ts: parse_timestamp(ts).ok_or_else(|| bad("bad timestamp"))?,
            value: value.trim().parse().map_err(|_| bad("bad value"))?,
        });
    }
    Ok(out)
}

/// NAB's labeled anomaly windows for the series, as inclusive Unix-second ranges.
///
/// # Errors
/// [`NabError::Windows`] when the JSON is not as NAB publishes it.
pub fn labeled_windows() -> Result<Vec<(i64, i64)>, NabError> {
    let all: std::collections::BTreeMap<String, Vec<[String; 2]>> =
        serde_json::from_str(WINDOWS_JSON).map_err(|e| NabError::Windows(e.to_string()))?;
    let spans = all
        .get(SERIES_KEY)
        .ok_or_else(|| NabError::Windows(format!("no entry for {SERIES_KEY}")))?;
    spans
        .iter()
        .map(|[a, b]| match (parse_timestamp(a), parse_timestamp(b)) {
            (Some(a), Some(b)) if a <= b => Ok((a, b)),
            _ => Err(NabError::Windows(format!("bad window {a:?}..{b:?}"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_are_utc_unix_seconds() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("2013-12-02 21:15:00"), Some(1_386_018_900));
        assert_eq!(
            parse_timestamp("2013-12-10 06:25:00.000000"),
            Some(1_386_656_700)
        );
        assert_eq!(parse_timestamp("2013-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn embedded_series_and_windows_parse() {
        let s = series().unwrap();
        assert_eq!(s.len(), 22_695);
        // NAB's file has one out-of-order row (2014-01-07 02:55 then 02:00);
        // it is replayed as is, like a real sensor with a clock step.
        assert_eq!(s.windows(2).filter(|w| w[0].ts >= w[1].ts).count(), 1);
        let w = labeled_windows().unwrap();
        assert_eq!(w.len(), 4);
        assert!(
            w.iter()
                .all(|(a, b)| s[0].ts <= *a && *b <= s[s.len() - 1].ts)
        );
    }
}
