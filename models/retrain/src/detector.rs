//! The Gaussian window detector: mean window and whitening matrix fitted on
//! training windows, scored as the squared Mahalanobis distance
//! `‖(x − μ) P‖²` with `P Pᵀ = (Σ + ridge·I)⁻¹` — the shipped NAB model
//! family (`models/training/train_nab_window_detector.py`).
//!
//! Owns the fitted parameters and their f64 scoring (the reference the
//! written ONNX graph is checked against). The ridge keeps a singular
//! covariance (a constant series, fewer windows than the window width)
//! invertible.

use crate::linalg::{self, LinalgError};

/// A fitted detector.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// Mean training window.
    pub mu: Vec<f64>,
    /// Whitening matrix `P` (`width × width`, upper-triangular).
    pub whiten: Vec<Vec<f64>>,
}

impl Detector {
    /// Fits on `rows` (windows of equal width; at least one).
    ///
    /// # Errors
    /// [`LinalgError`] when `Σ + ridge·I` is not positive definite (ridge 0
    /// on a singular covariance, or non-finite values).
    pub fn fit(rows: &[Vec<f64>], ridge: f64) -> Result<Detector, LinalgError> {
        let mu = linalg::mean(rows);
        let mut cov = linalg::covariance(rows, &mu);
        linalg::add_ridge(&mut cov, ridge);
        let whiten = linalg::whitening(&cov)?;
        Ok(Detector { mu, whiten })
    }

    /// The squared Mahalanobis distance of `x` from the mean window.
    #[must_use]
    pub fn score(&self, x: &[f64]) -> f64 {
        let centered: Vec<f64> = x.iter().zip(&self.mu).map(|(a, m)| a - m).collect();
        let width = self.mu.len();
        (0..width)
            .map(|j| {
                let w: f64 = centered
                    .iter()
                    .zip(&self.whiten)
                    .map(|(c, row)| c * row[j])
                    .sum();
                w * w
            })
            .sum()
    }

    /// The ONNX graph of this detector.
    #[must_use]
    pub fn onnx(&self) -> Vec<u8> {
        crate::onnx::detector_graph(&self.mu, &self.whiten)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn score_is_mahalanobis() {
        // Windows (1,2), (3,6), (5,7): Σ = [[4,5],[5,7]], Σ⁻¹ = 1/3 [[7,-5],[-5,4]].
        let rows = vec![vec![1.0, 2.0], vec![3.0, 6.0], vec![5.0, 7.0]];
        let d = Detector::fit(&rows, 0.0).unwrap();
        // x - μ = (1, 0): 7/3.  (0, 1): 4/3.  (1, 1): (7 - 10 + 4)/3 = 1/3.
        for (x, expect) in [
            ([4.0, 5.0], 7.0 / 3.0),
            ([3.0, 6.0], 4.0 / 3.0),
            ([4.0, 6.0], 1.0 / 3.0),
        ] {
            assert!((d.score(&x) - expect).abs() < 1e-12, "{x:?}");
        }
        assert!(d.score(&d.mu.clone()).abs() < 1e-12);
    }

    #[test]
    fn constant_series_needs_and_takes_the_ridge() {
        let rows = vec![vec![5.0; 4]; 10];
        assert!(Detector::fit(&rows, 0.0).is_err());
        let d = Detector::fit(&rows, 1e-6).unwrap();
        assert_eq!(d.score(&[5.0; 4]), 0.0);
        // One value 0.001 off: 1e-6 / 1e-6 = 1.
        assert!((d.score(&[5.001, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-6);
    }
}
