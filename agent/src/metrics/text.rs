//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` lines, samples, label-value escaping.
//!
//! Owns formatting only; what is exported is decided in [`super`].
//! Invariant: every family is written once, header first, with all its
//! samples together (the format requires it).

use std::fmt::Write as _;

use super::histogram::HistogramSnapshot;

/// Content type of the rendered text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric type named in `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// `_bucket`, `_sum`, `_count` series.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds one exposition body.
#[derive(Debug, Default)]
pub struct TextWriter {
    out: String,
}

impl TextWriter {
    /// Writes `# HELP` and `# TYPE` for the family `name`.
    pub fn header(&mut self, name: &str, help: &str, kind: Kind) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// Writes one sample; label names must be valid Prometheus label names
    /// (they are constants in this crate), values are escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, value: f64) {
        self.header(name, help, kind);
        self.sample(name, &[], value);
    }

    /// A histogram family: one `_bucket` series per bound plus `+Inf`,
    /// `_sum` and `_count`, for each labelled snapshot.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Vec<(&str, &str)>, HistogramSnapshot)],
    ) {
        self.header(name, help, Kind::Histogram);
        for (labels, h) in series {
            let bucket = format!("{name}_bucket");
            for (le, n) in &h.buckets {
                self.out.push_str(&bucket);
                write_labels(&mut self.out, labels, Some(&format_value(*le)));
                let _ = writeln!(self.out, " {n}");
            }
            self.out.push_str(&bucket);
            write_labels(&mut self.out, labels, Some("+Inf"));
            let _ = writeln!(self.out, " {}", h.count);
            self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
            #[allow(clippy::cast_precision_loss)]
            self.sample(&format!("{name}_count"), labels, h.count as f64);
        }
    }

    /// The body.
    #[must_use]
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
}

/// Escapes a label value: backslash, double quote and line feed.
#[must_use]
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escapes `# HELP` text: backslash and line feed.
#[must_use]
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
#[must_use]
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("two\nlines"), r"two\nlines");
        assert_eq!(escape_label_value("plain é"), "plain é");
        let mut w = TextWriter::default();
        w.header("x_total", "Help with a \\ and\na newline.", Kind::Counter);
        w.sample("x_total", &[("model", "m\"1\\\n"), ("b", "")], 3.0);
        assert_eq!(
            w.finish(),
            "# HELP x_total Help with a \\\\ and\\na newline.\n\
             # TYPE x_total counter\n\
             x_total{model=\"m\\\"1\\\\\\n\",b=\"\"} 3\n"
        );
    }

    #[test]
    fn values_use_prometheus_spellings() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.0025), "0.0025");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1.8e19), "18000000000000000000");
    }

    #[test]
    fn histogram_has_buckets_inf_sum_and_count() {
        let h = HistogramSnapshot {
            buckets: vec![(0.001, 1), (0.01, 3)],
            count: 4,
            sum_seconds: 2.5,
        };
        let mut w = TextWriter::default();
        w.histogram("lat_seconds", "Latency.", &[(vec![("model", "m")], h)]);
        assert_eq!(
            w.finish(),
            "# HELP lat_seconds Latency.\n\
             # TYPE lat_seconds histogram\n\
             lat_seconds_bucket{model=\"m\",le=\"0.001\"} 1\n\
             lat_seconds_bucket{model=\"m\",le=\"0.01\"} 3\n\
             lat_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n\
             lat_seconds_sum{model=\"m\"} 2.5\n\
             lat_seconds_count{model=\"m\"} 4\n"
        );
    }
}
