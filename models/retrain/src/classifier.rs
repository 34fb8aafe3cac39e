//! The supervised family: binary logistic regression on window statistics
//! (`[mean, std, min, max, slope]` of each window), fitted by Newton's
//! method (IRLS) with an L2 penalty on the standardized weights.
//!
//! Owns the fitted weights and their f64 scoring. Standardization is folded
//! into the exported weights, so the graph takes the raw statistics the
//! agent computes (`transform = "stats"`). Output: `[P(normal), P(anomaly)]`
//! as `Softmax([0, z])`.

// Design: index loops mirror the matrix formulas; iterator forms obscure them.
#![allow(clippy::needless_range_loop)]

use crate::linalg::{self, LinalgError};

/// Newton iterations at most.
const MAX_ITERATIONS: usize = 50;
/// Stop when the largest step is below this.
const TOLERANCE: f64 = 1e-10;

/// A fitted classifier in raw feature units: `P(anomaly) = σ(b + w·f)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    /// Weight per feature.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
}

/// Numerically stable logistic function.
#[must_use]
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Classifier {
    /// Fits on `rows` (features) with `labels`; `l2` penalizes the
    /// standardized weights (not the intercept).
    ///
    /// # Errors
    /// [`LinalgError`] when the Newton system is singular (only with
    /// `l2 = 0` on degenerate features).
    pub fn fit(rows: &[Vec<f64>], labels: &[bool], l2: f64) -> Result<Classifier, LinalgError> {
        let width = rows.first().map_or(0, Vec::len);
        let mean = linalg::mean(rows);
        let n = rows.len() as f64;
        let scale: Vec<f64> = (0..width)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if var > 0.0 { var.sqrt() } else { 1.0 }
            })
            .collect();
        // Design rows: [1, z_1, …, z_width].
        let design: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                std::iter::once(1.0)
                    .chain((0..width).map(|j| (r[j] - mean[j]) / scale[j]))
                    .collect()
            })
            .collect();
        let dim = width + 1;
        let mut beta = vec![0.0; dim];
        for _ in 0..MAX_ITERATIONS {
            let mut grad = vec![0.0; dim];
            let mut hess = vec![vec![0.0; dim]; dim];
            for (x, &y) in design.iter().zip(labels) {
                let p = sigmoid(x.iter().zip(&beta).map(|(a, b)| a * b).sum());
                let r = p - if y { 1.0 } else { 0.0 };
                let w = (p * (1.0 - p)).max(1e-12);
                for i in 0..dim {
                    grad[i] += r * x[i];
                    for j in 0..=i {
                        hess[i][j] += w * x[i] * x[j];
                    }
                }
            }
            for i in 0..dim {
                for j in 0..i {
                    hess[j][i] = hess[i][j];
                }
                if i > 0 {
                    grad[i] += l2 * beta[i];
                    hess[i][i] += l2;
                }
            }
            let step = linalg::solve_spd(&hess, &grad)?;
            let mut largest: f64 = 0.0;
            for (b, s) in beta.iter_mut().zip(&step) {
                *b -= s;
                largest = largest.max(s.abs());
            }
            if largest < TOLERANCE {
                break;
            }
        }
        let weights: Vec<f64> = (0..width).map(|j| beta[j + 1] / scale[j]).collect();
        let bias = beta[0]
            - (0..width)
                .map(|j| beta[j + 1] * mean[j] / scale[j])
                .sum::<f64>();
        Ok(Classifier { weights, bias })
    }

    /// `P(anomaly)` for the features `f`.
    #[must_use]
    pub fn probability(&self, f: &[f64]) -> f64 {
        sigmoid(self.bias + f.iter().zip(&self.weights).map(|(a, w)| a * w).sum::<f64>())
    }

    /// The ONNX graph: logits `[0, b + w·f]`, softmax.
    #[must_use]
    pub fn onnx(&self) -> Vec<u8> {
        let weights: Vec<[f64; 2]> = self.weights.iter().map(|&w| [0.0, w]).collect();
        crate::onnx::classifier_graph(&weights, [0.0, self.bias])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn separates_a_threshold() {
        let rows: Vec<Vec<f64>> = (0..200).map(|i| vec![f64::from(i) / 10.0, 3.0]).collect();
        let labels: Vec<bool> = (0..200).map(|i| i >= 120).collect();
        let c = Classifier::fit(&rows, &labels, 1e-3).unwrap();
        assert!(c.probability(&[5.0, 3.0]) < 0.05);
        assert!(c.probability(&[18.0, 3.0]) > 0.95);
        assert!((c.probability(&[11.95, 3.0]) - 0.5).abs() < 0.1);
    }

    #[test]
    fn stationary_point_of_the_penalized_likelihood() {
        // With overlapping classes the optimum has zero gradient; check it.
        let rows: Vec<Vec<f64>> = (0..100).map(|i| vec![f64::from(i % 10)]).collect();
        let labels: Vec<bool> = (0..100).map(|i| (i * 7) % 10 < i % 10).collect();
        let c = Classifier::fit(&rows, &labels, 0.0).unwrap();
        let g0: f64 = rows
            .iter()
            .zip(&labels)
            .map(|(r, &y)| c.probability(r) - f64::from(u8::from(y)))
            .sum();
        assert!(g0.abs() < 1e-8, "{g0}");
    }
}
