//! Einsum, by permuting the index strings: the gradient of operand `i` is the einsum of the
//! output gradient with the other operands, producing operand `i`'s subscripts
//! (`ij,jk->ik` gives `ik,jk->ij` for the first operand and `ik,ij->jk` for the second).
//!
//! Letters only operand `i` carries (summed inside it) do not appear in the gradient einsum:
//! the gradient is constant along them and is expanded back. Ellipsis dimensions that an
//! operand broadcast are summed back. Repeated letters within one operand (diagonals, traces)
//! are refused.

use std::collections::HashSet;

use super::broadcast::reduce_to;
use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// One term of an equation: letters before an ellipsis, whether there is one, letters after.
#[derive(Clone, Debug, PartialEq)]
struct Term {
    pre: Vec<char>,
    ell: bool,
    post: Vec<char>,
}

impl Term {
    fn parse(t: &str) -> Option<Term> {
        let valid = |s: &str| s.chars().all(|c| c.is_ascii_alphabetic());
        match t.split_once("...") {
            Some((p, q)) if valid(p) && valid(q) => Some(Term {
                pre: p.chars().collect(),
                ell: true,
                post: q.chars().collect(),
            }),
            None if valid(t) => Some(Term {
                pre: t.chars().collect(),
                ell: false,
                post: vec![],
            }),
            _ => None,
        }
    }

    fn letters(&self) -> impl Iterator<Item = char> + '_ {
        self.pre.iter().chain(self.post.iter()).copied()
    }

    fn render(&self) -> String {
        let mut s: String = self.pre.iter().collect();
        if self.ell {
            s.push_str("...");
        }
        s.extend(self.post.iter());
        s
    }

    fn filtered(&self, keep: &dyn Fn(char) -> bool) -> Term {
        Term {
            pre: self.pre.iter().copied().filter(|&c| keep(c)).collect(),
            ell: self.ell,
            post: self.post.iter().copied().filter(|&c| keep(c)).collect(),
        }
    }
}

fn parse(eq: &str, n: usize) -> Option<(Vec<Term>, Term)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<Term> = lhs.split(',').map(Term::parse).collect::<Option<_>>()?;
    if terms.len() != n {
        return None;
    }
    let out = match rhs {
        Some(r) => Term::parse(&r)?,
        None => {
            let mut once: Vec<char> = Vec::new();
            let all: Vec<char> = terms.iter().flat_map(|t| t.letters()).collect();
            for &c in &all {
                if all.iter().filter(|&&d| d == c).count() == 1 {
                    once.push(c);
                }
            }
            once.sort();
            Term {
                pre: vec![],
                ell: terms.iter().any(|t| t.ell),
                post: once,
            }
        }
    };
    Some((terms, out))
}

/// Einsum.
pub(crate) fn einsum(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let eq = attr::get_string(&s.node.attribute, "equation")
        .ok_or_else(|| s.unsupported("no equation"))?;
    let n = s.node.input.len();
    let (terms, out_term) =
        parse(&eq, n).ok_or_else(|| s.unsupported(format!("cannot parse equation `{eq}`")))?;
    if terms.iter().any(|t| t.ell) && !out_term.ell {
        return Err(s.unsupported("an ellipsis summed away (absent from the output)"));
    }
    let y = s.y(0);
    let mut out = s.none();
    for i in 0..n {
        if !s.need(i) {
            continue;
        }
        let term = &terms[i];
        let letters: Vec<char> = term.letters().collect();
        let unique: HashSet<char> = letters.iter().copied().collect();
        if unique.len() != letters.len() {
            return Err(s.unsupported(format!(
                "operand {i} repeats a subscript in `{eq}` (diagonal)"
            )));
        }
        let elsewhere: HashSet<char> = out_term
            .letters()
            .chain(
                terms
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .flat_map(|(_, t)| t.letters()),
            )
            .collect();
        let private: Vec<char> = letters
            .iter()
            .copied()
            .filter(|c| !elsewhere.contains(c))
            .collect();
        let result = term.filtered(&|c| elsewhere.contains(&c));
        let mut inputs: Vec<&str> = vec![&dy];
        let mut lhs = vec![out_term.render()];
        for (j, t) in terms.iter().enumerate() {
            if j != i {
                inputs.push(s.x(j)?);
                lhs.push(t.render());
            }
        }
        let equation = format!("{}->{}", lhs.join(","), result.render());
        let mut g =
            cx.e.op("Einsum", &inputs, vec![attr::string("equation", &equation)]);
        let xi = s.x(i)?;
        if !private.is_empty() {
            if term.ell {
                return Err(
                    s.unsupported("an operand with both an ellipsis and subscripts of its own")
                );
            }
            let axes: Vec<i64> = letters
                .iter()
                .enumerate()
                .filter(|(_, c)| private.contains(c))
                .map(|(k, _)| k as i64)
                .collect();
            g = cx.e.unsqueeze(&g, &axes);
            g = cx.e.expand_like(&g, xi);
        } else if term.ell {
            // The ellipsis of the result has the output's ellipsis rank: sum what operand i
            // broadcast.
            let (ys, xs) = (cx.shape(s, y)?, cx.shape(s, xi)?);
            let ell_y = ys.len() - out_term.pre.len() - out_term.post.len();
            let ell_x = xs.len() - term.pre.len() - term.post.len();
            let y_ell = &ys[out_term.pre.len()..out_term.pre.len() + ell_y];
            if ell_x != ell_y && !term.pre.is_empty() {
                return Err(s.unsupported(
                    "an operand whose ellipsis has fewer dimensions and letters before it",
                ));
            }
            let size = |c: char| -> Dim {
                let pos = out_term.letters().position(|d| d == c);
                match pos {
                    Some(p) if p < out_term.pre.len() => ys[p].clone(),
                    Some(p) => ys[ell_y + p].clone(),
                    None => xs[letters.iter().position(|&d| d == c).map_or(0, |k| {
                        if k < term.pre.len() {
                            k
                        } else {
                            k + ell_x
                        }
                    })]
                    .clone(),
                }
            };
            let mut gs: Vec<Dim> = term.pre.iter().map(|&c| size(c)).collect();
            gs.extend(y_ell.iter().cloned());
            gs.extend(term.post.iter().map(|&c| size(c)));
            g = reduce_to(cx, s, &g, Some(&gs), xi, Some(&xs))?;
        }
        out[i] = Some(g);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_round_trip() {
        let (t, o) = parse("b...ij,...jk", 2).unwrap();
        assert_eq!(t[0].render(), "b...ij");
        assert_eq!(t[1].render(), "...jk");
        assert_eq!(o.render(), "...bik");
    }
}
