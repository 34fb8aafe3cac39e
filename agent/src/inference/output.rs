//! Output post-processing: what one output row of a model means.
//!
//! Owns turning a raw output row into the stored score, the alert decision
//! and, for classifiers, the predicted label and probabilities. Pure.

/// The validated `[output]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    /// What the output is.
    pub kind: OutputKind,
    /// Alert threshold on the score.
    pub threshold: f64,
    /// Alert when the score is below the threshold instead of above.
    pub alert_below: bool,
}

/// What the model's output row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    /// One score per window; the score is the output.
    AnomalyScore,
    /// One probability (or logit, with `softmax`) per label.
    Classes {
        /// One per output column.
        labels: Vec<String>,
        /// Indices of the labels whose summed probability is the score;
        /// empty: the score is the top probability and never alerts.
        alert: Vec<usize>,
        /// Softmax the row first.
        softmax: bool,
    },
    /// One value per window: `output * scale + offset`.
    Regression {
        /// Multiplier.
        scale: f64,
        /// Added after scaling.
        offset: f64,
    },
}

/// A post-processed output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The stored score (anomaly score, alert-class probability, or value).
    pub score: f64,
    /// Whether the score is on the alerting side of the threshold.
    pub is_anomaly: bool,
    /// Classifiers: the most probable label.
    pub label: Option<String>,
    /// Classifiers: probabilities in label order; empty otherwise.
    pub probabilities: Vec<f64>,
}

/// Why an output row cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputError {
    /// The row has the wrong number of values.
    #[error("output row has {actual} values, the manifest expects {expected}")]
    Width {
        /// From the manifest.
        expected: usize,
        /// From the model.
        actual: usize,
    },
    /// NaN or infinity in the output.
    #[error("model produced a non-finite output")]
    NonFinite,
}

impl OutputPlan {
    /// Values per output row.
    #[must_use]
    pub fn width(&self) -> usize {
        match &self.kind {
            OutputKind::Classes { labels, .. } => labels.len(),
            _ => 1,
        }
    }

    /// Post-processes one raw output row.
    ///
    /// # Errors
    /// [`OutputError`] for a row of the wrong width or with non-finite values.
    pub fn apply(&self, row: &[f32]) -> Result<Scored, OutputError> {
        if row.len() != self.width() {
            return Err(OutputError::Width {
                expected: self.width(),
                actual: row.len(),
            });
        }
        if row.iter().any(|v| !v.is_finite()) {
            return Err(OutputError::NonFinite);
        }
        let raw: Vec<f64> = row.iter().map(|v| f64::from(*v)).collect();
        let (score, label, probabilities) = match &self.kind {
            OutputKind::AnomalyScore => (raw[0], None, Vec::new()),
            OutputKind::Regression { scale, offset } => (raw[0] * scale + offset, None, Vec::new()),
            OutputKind::Classes {
                labels,
                alert,
                softmax,
            } => {
                let p = if *softmax { softmax_of(&raw) } else { raw };
                let top = p
                    .iter()
                    .enumerate()
                    .fold(0, |best, (i, v)| if *v > p[best] { i } else { best });
                let score = if alert.is_empty() {
                    p[top]
                } else {
                    alert.iter().map(|i| p[*i]).sum()
                };
                (score, labels.get(top).cloned(), p)
            }
        };
        if !score.is_finite() {
            return Err(OutputError::NonFinite);
        }
        let alerting = match &self.kind {
            OutputKind::Classes { alert, .. } if alert.is_empty() => false,
            _ if self.alert_below => score < self.threshold,
            _ => score > self.threshold,
        };
        Ok(Scored {
            score,
            is_anomaly: alerting,
            label,
            probabilities,
        })
    }
}

fn softmax_of(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn anomaly_scores_alert_on_the_configured_side() {
        let mut p = OutputPlan {
            kind: OutputKind::AnomalyScore,
            threshold: 2.0,
            alert_below: false,
        };
        assert!(p.apply(&[2.5]).unwrap().is_anomaly);
        assert!(!p.apply(&[2.0]).unwrap().is_anomaly);
        p.alert_below = true;
        assert!(p.apply(&[1.5]).unwrap().is_anomaly);
        assert_eq!(
            p.apply(&[1.0, 2.0]),
            Err(OutputError::Width {
                expected: 1,
                actual: 2
            })
        );
        assert_eq!(p.apply(&[f32::NAN]), Err(OutputError::NonFinite));
    }

    #[test]
    fn classes_sum_alert_probabilities_and_pick_the_top_label() {
        let p = OutputPlan {
            kind: OutputKind::Classes {
                labels: vec!["ok".into(), "worn".into(), "broken".into()],
                alert: vec![1, 2],
                softmax: false,
            },
            threshold: 0.5,
            alert_below: false,
        };
        let s = p.apply(&[0.4, 0.35, 0.25]).unwrap();
        assert_eq!(s.label.as_deref(), Some("ok"));
        assert!((s.score - 0.6).abs() < 1e-6);
        assert!(s.is_anomaly);
        let logits = OutputPlan {
            kind: OutputKind::Classes {
                labels: vec!["a".into(), "b".into()],
                alert: vec![],
                softmax: true,
            },
            threshold: 0.5,
            alert_below: false,
        };
        // softmax([0, ln 3]) = [0.25, 0.75]
        let s = logits.apply(&[0.0, 3f32.ln()]).unwrap();
        assert_eq!(s.label.as_deref(), Some("b"));
        assert!((s.score - 0.75).abs() < 1e-6);
        assert!(!s.is_anomaly, "no alert labels: never alerts");
    }

    #[test]
    fn regression_scales_and_offsets() {
        let p = OutputPlan {
            kind: OutputKind::Regression {
                scale: 10.0,
                offset: -1.0,
            },
            threshold: 20.0,
            alert_below: true,
        };
        let s = p.apply(&[2.5]).unwrap();
        assert_eq!(s.score, 24.0);
        assert!(!s.is_anomaly);
        assert!(p.apply(&[1.5]).unwrap().is_anomaly);
    }
}
