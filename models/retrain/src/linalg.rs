//! Dense linear algebra in plain f64 for the small matrices training needs
//! (window width or feature count squared): mean, sample covariance,
//! Cholesky factorisation, triangular inverse, SPD solve.
//!
//! Matrices are row-major `Vec<Vec<f64>>`, square where a function says so.
//! No BLAS: sizes are tens of rows, and exactness is checked by hand-computed
//! cases below.

// Design: index loops mirror the matrix formulas; iterator forms obscure them.
#![allow(clippy::needless_range_loop)]

/// Result alias for this module.
pub type Result<T, E = LinalgError> = std::result::Result<T, E>;

/// Why a factorisation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinalgError {
    /// The matrix is not (numerically) positive definite.
    #[error("matrix is not positive definite (pivot {pivot} is {value})")]
    NotPositiveDefinite {
        /// Row of the failing pivot.
        pivot: usize,
        /// The pivot value (before the square root).
        value: f64,
    },
}

/// Column means of `rows` (all of the same width; empty input gives an empty vector).
#[must_use]
pub fn mean(rows: &[Vec<f64>]) -> Vec<f64> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Vec::new();
    };
    let mut m = vec![0.0; width];
    for row in rows {
        for (acc, v) in m.iter_mut().zip(row) {
            *acc += v;
        }
    }
    let n = rows.len() as f64;
    m.iter_mut().for_each(|v| *v /= n);
    m
}

/// Sample covariance (divides by `n - 1`, as `numpy.cov`) of `rows` around
/// `mean`; all zeros for fewer than two rows.
#[must_use]
pub fn covariance(rows: &[Vec<f64>], mean: &[f64]) -> Vec<Vec<f64>> {
    let w = mean.len();
    let mut c = vec![vec![0.0; w]; w];
    if rows.len() < 2 {
        return c;
    }
    for row in rows {
        for i in 0..w {
            let di = row[i] - mean[i];
            for j in 0..=i {
                c[i][j] += di * (row[j] - mean[j]);
            }
        }
    }
    let n = (rows.len() - 1) as f64;
    for i in 0..w {
        for j in 0..=i {
            c[i][j] /= n;
            c[j][i] = c[i][j];
        }
    }
    c
}

/// Adds `ridge` to the diagonal.
pub fn add_ridge(a: &mut [Vec<f64>], ridge: f64) {
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += ridge;
    }
}

/// Lower-triangular `L` with `L Lᵀ = a` for a symmetric positive definite `a`.
///
/// # Errors
/// [`LinalgError::NotPositiveDefinite`] when a pivot is not positive and finite.
pub fn cholesky(a: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let n = a.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let value = a[i][i] - s;
                if !(value > 0.0 && value.is_finite()) {
                    return Err(LinalgError::NotPositiveDefinite { pivot: i, value });
                }
                l[i][i] = value.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    Ok(l)
}

/// Inverse of a lower-triangular matrix with a non-zero diagonal (forward
/// substitution, column by column); the result is lower-triangular.
#[must_use]
pub fn invert_lower(l: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = l.len();
    let mut inv = vec![vec![0.0; n]; n];
    for col in 0..n {
        for i in col..n {
            let rhs = if i == col { 1.0 } else { 0.0 };
            let s: f64 = (col..i).map(|k| l[i][k] * inv[k][col]).sum();
            inv[i][col] = (rhs - s) / l[i][i];
        }
    }
    inv
}

/// Transpose.
#[must_use]
pub fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let rows = a.len();
    let cols = a.first().map_or(0, Vec::len);
    (0..cols)
        .map(|j| (0..rows).map(|i| a[i][j]).collect())
        .collect()
}

/// Matrix product `a b`.
#[must_use]
pub fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let cols = b.first().map_or(0, Vec::len);
    a.iter()
        .map(|row| {
            (0..cols)
                .map(|j| row.iter().zip(b).map(|(x, brow)| x * brow[j]).sum())
                .collect()
        })
        .collect()
}

/// A whitening matrix `P` for covariance `cov`: `P Pᵀ = cov⁻¹`, so that
/// `‖(x − μ) P‖²` is the squared Mahalanobis distance. With `cov = L Lᵀ`
/// (Cholesky), `P = L⁻ᵀ` (upper-triangular).
///
/// # Errors
/// [`LinalgError::NotPositiveDefinite`] (add a ridge first).
pub fn whitening(cov: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    Ok(transpose(&invert_lower(&cholesky(cov)?)))
}

/// Solves `a x = b` for symmetric positive definite `a` through Cholesky.
///
/// # Errors
/// [`LinalgError::NotPositiveDefinite`].
pub fn solve_spd(a: &[Vec<f64>], b: &[f64]) -> Result<Vec<f64>> {
    let l = cholesky(a)?;
    let n = b.len();
    let mut y = vec![0.0; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i][k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i][i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k][i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i][i];
    }
    Ok(x)
}

/// The `q` quantile (0..=1) of `values` with linear interpolation between
/// order statistics (`numpy.quantile`'s default); NaN for no values.
#[must_use]
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile_sorted(&sorted, q)
}

/// As [`quantile`] on already sorted values.
#[must_use]
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn covariance_by_hand() {
        // rows (1,2), (3,6), (5,7): mean (3,5);
        // deviations (-2,-3), (0,1), (2,2): sxx = 8/2 = 4, sxy = (6+0+4)/2 = 5, syy = (9+1+4)/2 = 7.
        let rows = vec![vec![1.0, 2.0], vec![3.0, 6.0], vec![5.0, 7.0]];
        let m = mean(&rows);
        assert_eq!(m, vec![3.0, 5.0]);
        let c = covariance(&rows, &m);
        assert_eq!(c, vec![vec![4.0, 5.0], vec![5.0, 7.0]]);
    }

    #[test]
    fn cholesky_by_hand() {
        // [[4, 2], [2, 10]] = L Lᵀ with L = [[2, 0], [1, 3]].
        let l = cholesky(&[vec![4.0, 2.0], vec![2.0, 10.0]]).unwrap();
        assert_eq!(l, vec![vec![2.0, 0.0], vec![1.0, 3.0]]);
        // L⁻¹ = [[1/2, 0], [-1/6, 1/3]].
        let inv = invert_lower(&l);
        assert!(
            close(inv[0][0], 0.5) && close(inv[1][0], -1.0 / 6.0) && close(inv[1][1], 1.0 / 3.0)
        );
        assert_eq!(inv[0][1], 0.0);
        // P Pᵀ = cov⁻¹ = 1/36 [[10, -2], [-2, 4]].
        let p = whitening(&[vec![4.0, 2.0], vec![2.0, 10.0]]).unwrap();
        let ppt = matmul(&p, &transpose(&p));
        let expect = [[10.0 / 36.0, -2.0 / 36.0], [-2.0 / 36.0, 4.0 / 36.0]];
        for i in 0..2 {
            for j in 0..2 {
                assert!(close(ppt[i][j], expect[i][j]), "{ppt:?}");
            }
        }
        // solve [[4,2],[2,10]] x = [8, 22]: 4x + 2y = 8, 2x + 10y = 22 -> x = 1, y = 2.
        let x = solve_spd(&[vec![4.0, 2.0], vec![2.0, 10.0]], &[8.0, 22.0]).unwrap();
        assert!(close(x[0], 1.0) && close(x[1], 2.0), "{x:?}");
    }

    #[test]
    fn singular_needs_ridge() {
        let mut zero = vec![vec![0.0; 3]; 3];
        assert!(matches!(
            cholesky(&zero),
            Err(LinalgError::NotPositiveDefinite { pivot: 0, .. })
        ));
        add_ridge(&mut zero, 1e-6);
        let p = whitening(&zero).unwrap();
        assert!(close(p[2][2], 1000.0));
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // numpy.quantile([1, 2, 3, 4], 0.5) == 2.5; 0.9 -> 3.7.
        assert!(close(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5));
        assert!(close(quantile(&[4.0, 1.0, 3.0, 2.0], 0.9), 3.7));
        assert!(quantile(&[], 0.5).is_nan());
    }
}
