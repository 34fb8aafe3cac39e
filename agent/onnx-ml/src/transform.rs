//! Score post-transforms of the ONNX-ML classifiers and regressors
//! (`post_transform` attribute).
//!
//! The formulas are onnxruntime's (its logistic is written for stability,
//! its probit uses the Giles-style `erfinv` approximation), so scores match
//! onnxruntime's to float rounding rather than merely to the math.

use tract_onnx::tract_hir::internal::*;

/// The `post_transform` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostTransform {
    /// Scores as computed.
    None,
    /// `1 / (1 + exp(-x))` on every score.
    Logistic,
    /// Softmax over the scores of one row.
    Softmax,
    /// Softmax that leaves exact zeros out of the sum.
    SoftmaxZero,
    /// `sqrt(2) * erfinv(2x - 1)` on every score.
    Probit,
}

impl PostTransform {
    /// Parses the attribute value (default `NONE`).
    ///
    /// # Errors
    /// When the value is none of the five the specification names.
    pub fn parse(s: Option<&str>) -> TractResult<Self> {
        Ok(match s.unwrap_or("NONE") {
            "NONE" => Self::None,
            "LOGISTIC" => Self::Logistic,
            "SOFTMAX" => Self::Softmax,
            "SOFTMAX_ZERO" => Self::SoftmaxZero,
            "PROBIT" => Self::Probit,
            other => bail!(
                "post_transform {other:?} is not one of NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO, PROBIT"
            ),
        })
    }

    /// Applies the transform to one row of two or more scores.
    pub fn apply_row(self, scores: &mut [f32]) {
        match self {
            Self::None => {}
            Self::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
            Self::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
            Self::Softmax => softmax(scores),
            Self::SoftmaxZero => softmax_zero(scores),
        }
    }
}

/// The logistic function, computed on `|x|` so it never overflows.
#[must_use]
pub fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 { 1.0 - v } else { v }
}

/// `sqrt(2) * erfinv(2x - 1)`, with onnxruntime's `erfinv` approximation.
#[must_use]
pub fn probit(x: f32) -> f32 {
    std::f32::consts::SQRT_2 * erf_inv(2.0 * x - 1.0)
}

// Design: onnxruntime's constants verbatim (3.14159, not PI) so that
// probit scores agree with it to rounding.
#[allow(clippy::approx_constant)]
fn erf_inv(x: f32) -> f32 {
    let sgn = if x < 0.0 { -1.0f32 } else { 1.0 };
    let y = (1.0 - x) * (1.0 + x);
    let log = y.ln();
    let v = 2.0 / (3.14159f32 * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    let v3 = -v + (v * v - v2).sqrt();
    sgn * v3.sqrt()
}

/// In-place softmax, shifted by the maximum for stability.
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::MIN, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

/// Softmax where scores within 1e-7 of zero stay (scaled) near zero instead
/// of contributing `exp(0)` to the sum.
pub fn softmax_zero(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::MIN, f32::max);
    let exp_neg_max = (-max).exp();
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        if *s > 1e-7 || *s < -1e-7 {
            *s = (*s - max).exp();
            sum += *s;
        } else {
            *s *= exp_neg_max;
        }
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_is_symmetric_and_saturates_without_nan() {
        assert!((logistic(0.0) - 0.5).abs() < 1e-7);
        assert!((logistic(2.0) + logistic(-2.0) - 1.0).abs() < 1e-6);
        assert_eq!(logistic(1000.0), 1.0);
        assert_eq!(logistic(-1000.0), 0.0);
    }

    #[test]
    fn probit_inverts_the_normal_cdf_approximately() {
        assert!(probit(0.5).abs() < 1e-6);
        // Phi(1) = 0.841344746
        assert!((probit(0.841_344_7) - 1.0).abs() < 5e-3);
        assert!((probit(0.158_655_3) + 1.0).abs() < 5e-3);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut s = [1.0, 2.0, 3.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[0] < s[1] && s[1] < s[2]);
        let mut z = [0.0, 2.0, 3.0];
        softmax_zero(&mut z);
        assert!(z[0] < 1e-3, "{z:?}");
    }

    #[test]
    fn unknown_transform_is_an_error() {
        assert!(PostTransform::parse(Some("CUBE")).is_err());
        assert_eq!(PostTransform::parse(None).ok(), Some(PostTransform::None));
    }
}
