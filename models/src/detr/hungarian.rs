//! The linear sum assignment problem (what DETR calls bipartite or Hungarian matching, SciPy's
//! `linear_sum_assignment`): given a cost matrix `[rows, cols]`, pick `min(rows, cols)` cells,
//! at most one per row and per column, with the least total cost.
//!
//! The algorithm is the shortest augmenting path form of the Hungarian method (Kuhn-Munkres
//! with row and column potentials, as in Jonker-Volgenant): one Dijkstra-like search per row
//! over reduced costs, `O(rows^2 * cols)` for `rows <= cols`. A wider-than-tall problem is
//! solved transposed.
//!
//! Our choices: costs are `f64` (f32 matrices are widened, so every f32 cost is exact); a
//! non-finite cost (NaN, +-inf) is an error naming the cell, never a panic or a silently
//! arbitrary matching. Among optimal assignments with equal cost the one returned is
//! unspecified (DETR does not depend on it).

/// Why an assignment could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssignmentError {
    #[error("cost matrix: {len} values do not fill {rows} x {cols}")]
    Shape {
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("cost matrix: cell ({row}, {col}) is {value}, costs must be finite")]
    NonFinite { row: usize, col: usize, value: f64 },
}

/// A minimum-cost assignment: `pairs[k] = (row, col)`, sorted by row; `min(rows, cols)` pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub pairs: Vec<(usize, usize)>,
    /// The sum of the chosen costs.
    pub cost: f64,
}

impl Assignment {
    /// The column assigned to each row (`None` for rows left out when `rows > cols`).
    pub fn col_of_rows(&self, rows: usize) -> Vec<Option<usize>> {
        let mut out = vec![None; rows];
        for &(r, c) in &self.pairs {
            out[r] = Some(c);
        }
        out
    }
}

/// Solves the assignment problem for the row-major `costs` `[rows, cols]` (see the module
/// docs). Empty problems (`rows == 0` or `cols == 0`) give no pairs.
pub fn linear_sum_assignment(
    costs: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Assignment, AssignmentError> {
    if costs.len() != rows * cols {
        return Err(AssignmentError::Shape {
            rows,
            cols,
            len: costs.len(),
        });
    }
    if let Some(k) = costs.iter().position(|c| !c.is_finite()) {
        return Err(AssignmentError::NonFinite {
            row: k / cols,
            col: k % cols,
            value: costs[k],
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(Assignment {
            pairs: Vec::new(),
            cost: 0.0,
        });
    }
    let mut pairs = if rows <= cols {
        solve_tall(|r, c| costs[r * cols + c], rows, cols)
    } else {
        solve_tall(|r, c| costs[c * cols + r], cols, rows)
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect()
    };
    pairs.sort_unstable();
    let cost = pairs.iter().map(|&(r, c)| costs[r * cols + c]).sum();
    Ok(Assignment { pairs, cost })
}

/// [`linear_sum_assignment`] on `f32` costs.
pub fn linear_sum_assignment_f32(
    costs: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Assignment, AssignmentError> {
    let wide: Vec<f64> = costs.iter().map(|&c| c as f64).collect();
    linear_sum_assignment(&wide, rows, cols)
}

/// The shortest augmenting path method for `n <= m` (every row gets a column). Indices inside
/// are 1-based with 0 the virtual start column; `owner[j]` is the row holding column `j`.
fn solve_tall(cost: impl Fn(usize, usize) -> f64, n: usize, m: usize) -> Vec<(usize, usize)> {
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0usize;
        let mut min_to = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let reduced = cost(i0 - 1, j - 1) - u[i0] - v[j];
                if reduced < min_to[j] {
                    min_to[j] = reduced;
                    way[j] = j0;
                }
                if min_to[j] < delta || j1 == 0 {
                    delta = min_to[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_to[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        // Augment along the path back to the start.
        loop {
            let j1 = way[j0];
            owner[j0] = owner[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    (1..=m)
        .filter(|&j| owner[j] != 0)
        .map(|j| (owner[j] - 1, j - 1))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so the cases are reproducible.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next_f64() * n as f64) as usize % n
        }
    }

    /// The least total cost over every injective map from the shorter side to the longer.
    fn brute_force(costs: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(
            k: usize,
            n: usize,
            m: usize,
            at: &dyn Fn(usize, usize) -> f64,
            used: &mut Vec<bool>,
            acc: f64,
            best: &mut f64,
        ) {
            if k == n {
                *best = best.min(acc);
                return;
            }
            for j in 0..m {
                if !used[j] {
                    used[j] = true;
                    go(k + 1, n, m, at, used, acc + at(k, j), best);
                    used[j] = false;
                }
            }
        }
        let mut best = f64::INFINITY;
        if rows <= cols {
            let at = |r: usize, c: usize| costs[r * cols + c];
            go(0, rows, cols, &at, &mut vec![false; cols], 0.0, &mut best);
        } else {
            let at = |c: usize, r: usize| costs[r * cols + c];
            go(0, cols, rows, &at, &mut vec![false; rows], 0.0, &mut best);
        }
        best
    }

    fn check_valid(a: &Assignment, costs: &[f64], rows: usize, cols: usize) {
        assert_eq!(a.pairs.len(), rows.min(cols));
        let mut rs = vec![false; rows];
        let mut cs = vec![false; cols];
        for &(r, c) in &a.pairs {
            assert!(
                !rs[r] && !cs[c],
                "row {r} or col {c} used twice: {:?}",
                a.pairs
            );
            rs[r] = true;
            cs[c] = true;
        }
        let sum: f64 = a.pairs.iter().map(|&(r, c)| costs[r * cols + c]).sum();
        assert!((sum - a.cost).abs() < 1e-9);
    }

    #[test]
    fn equals_brute_force_on_random_matrices_up_to_8x8() {
        let mut rng = Rng::new(7);
        let mut cases = 0;
        for rows in 1..=8 {
            for cols in 1..=8 {
                for trial in 0..4 {
                    // Trials 2 and 3 draw from few distinct values: many ties.
                    let levels = if trial >= 2 { 3 } else { 0 };
                    let costs: Vec<f64> = (0..rows * cols)
                        .map(|_| {
                            if levels > 0 {
                                rng.below(levels) as f64
                            } else {
                                rng.next_f64() * 20.0 - 5.0
                            }
                        })
                        .collect();
                    let a = linear_sum_assignment(&costs, rows, cols).unwrap();
                    check_valid(&a, &costs, rows, cols);
                    let best = brute_force(&costs, rows, cols);
                    assert!(
                        (a.cost - best).abs() < 1e-9,
                        "{rows}x{cols} trial {trial}: got {} ({:?}), brute force {best}",
                        a.cost,
                        a.pairs
                    );
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 256);
    }

    #[test]
    fn f32_costs_match_and_all_equal_costs_give_a_full_assignment() {
        let costs = [3.0f32, 1.0, 2.0, 2.0, 0.5, 4.0];
        let a = linear_sum_assignment_f32(&costs, 3, 2).unwrap();
        // Rows (3, 1), (2, 2), (0.5, 4): row 2 -> col 0 and row 0 -> col 1, 1.5 in all.
        assert_eq!(a.pairs, vec![(0, 1), (2, 0)]);
        assert!((a.cost - 1.5).abs() < 1e-12);
        assert_eq!(a.col_of_rows(3), vec![Some(1), None, Some(0)]);
        let flat = vec![1.0; 12];
        let a = linear_sum_assignment(&flat, 3, 4).unwrap();
        check_valid(&a, &flat, 3, 4);
        assert_eq!(a.cost, 3.0);
    }

    #[test]
    fn non_finite_costs_and_bad_shapes_are_errors() {
        let mut costs = vec![1.0; 6];
        costs[4] = f64::NAN;
        let e = linear_sum_assignment(&costs, 2, 3).unwrap_err();
        assert!(
            matches!(e, AssignmentError::NonFinite { row: 1, col: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("(1, 1)"), "{e}");
        costs[4] = f64::INFINITY;
        assert!(linear_sum_assignment(&costs, 2, 3).is_err());
        let e = linear_sum_assignment_f32(&[0.0, f32::NEG_INFINITY], 1, 2).unwrap_err();
        assert!(e.to_string().contains("-inf"), "{e}");
        let e = linear_sum_assignment(&[1.0; 5], 2, 3).unwrap_err();
        assert_eq!(
            e,
            AssignmentError::Shape {
                rows: 2,
                cols: 3,
                len: 5
            }
        );
        assert!(linear_sum_assignment(&[], 0, 4).unwrap().pairs.is_empty());
    }
}
