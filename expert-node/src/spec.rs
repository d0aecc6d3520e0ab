//! The `--experts` spec: which (layer, expert) pairs a node starts with.
//!
//! `all`, `none`, expert ids and ranges that apply to every layer (`0,5`, `0-3,7`), or
//! explicit `LAYER:EXPERT` pairs where either side may be a range (`0:1,3:2`, `2:0-3`).
//! Forms can be mixed; the result is their union.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use switchyard_engine::ExpertSelection;

use crate::NodeError;

pub fn parse_expert_spec(
    spec: &str,
    layers: usize,
    experts: usize,
) -> Result<ExpertSelection, NodeError> {
    match spec.trim() {
        "all" => return Ok(ExpertSelection::All),
        "none" => return Ok(ExpertSelection::Only(BTreeSet::new())),
        "" => {
            return Err(bad(
                spec,
                "empty spec (say `none` to start with no experts)",
            ));
        }
        _ => {}
    }
    let mut set = BTreeSet::new();
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad(spec, "empty item between commas"));
        }
        let (layer_range, expert_part) = match part.split_once(':') {
            Some((l, e)) => (parse_range(part, l, layers, "layer")?, e),
            None => (0..=layers.saturating_sub(1), part),
        };
        let expert_range = parse_range(part, expert_part, experts, "expert")?;
        for layer in layer_range {
            for expert in expert_range.clone() {
                set.insert((layer, expert));
            }
        }
    }
    Ok(ExpertSelection::Only(set))
}

/// `N` or `A-B` (inclusive), each below `limit`.
fn parse_range(
    part: &str,
    text: &str,
    limit: usize,
    what: &str,
) -> Result<RangeInclusive<usize>, NodeError> {
    let index = |s: &str| -> Result<usize, NodeError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(bad(part, &format!("missing {what} index")));
        }
        let n: usize = s
            .parse()
            .map_err(|_| bad(part, &format!("`{s}` is not a valid {what} index")))?;
        if n >= limit {
            return Err(bad(
                part,
                &format!("{what} {n} out of range (the model has {limit})"),
            ));
        }
        Ok(n)
    };
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (index(a)?, index(b)?);
            if a > b {
                return Err(bad(part, &format!("{what} range {a}-{b} is backwards")));
            }
            Ok(a..=b)
        }
        None => {
            let n = index(text)?;
            Ok(n..=n)
        }
    }
}

fn bad(part: &str, reason: &str) -> NodeError {
    NodeError::Spec {
        part: part.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(pairs: &[(usize, usize)]) -> ExpertSelection {
        ExpertSelection::Only(pairs.iter().copied().collect())
    }

    fn err(spec: &str) -> String {
        match parse_expert_spec(spec, 4, 8) {
            Err(e) => e.to_string(),
            Ok(sel) => panic!("`{spec}` parsed to {sel:?}"),
        }
    }

    #[test]
    fn keywords() {
        assert_eq!(
            parse_expert_spec("all", 4, 8).unwrap(),
            ExpertSelection::All
        );
        assert_eq!(parse_expert_spec(" none ", 4, 8).unwrap(), only(&[]));
    }

    #[test]
    fn expert_lists_apply_to_every_layer() {
        assert_eq!(
            parse_expert_spec("0,5", 2, 8).unwrap(),
            only(&[(0, 0), (0, 5), (1, 0), (1, 5)])
        );
        assert_eq!(
            parse_expert_spec("0-2, 7", 1, 8).unwrap(),
            only(&[(0, 0), (0, 1), (0, 2), (0, 7)])
        );
        assert_eq!(parse_expert_spec("3-3", 1, 8).unwrap(), only(&[(0, 3)]));
    }

    #[test]
    fn explicit_pairs_and_ranges_on_either_side() {
        assert_eq!(
            parse_expert_spec("0:1,3:2", 4, 8).unwrap(),
            only(&[(0, 1), (3, 2)])
        );
        assert_eq!(
            parse_expert_spec("2:0-2", 4, 8).unwrap(),
            only(&[(2, 0), (2, 1), (2, 2)])
        );
        assert_eq!(
            parse_expert_spec("0-1:7", 4, 8).unwrap(),
            only(&[(0, 7), (1, 7)])
        );
        // Mixed forms are a union; duplicates collapse.
        assert_eq!(
            parse_expert_spec("1,0:1,0:2", 2, 8).unwrap(),
            only(&[(0, 1), (0, 2), (1, 1)])
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        let e = err("0,8");
        assert!(
            e.contains("`8`") && e.contains("expert 8 out of range"),
            "{e}"
        );
        let e = err("0:1,4:0");
        assert!(e.contains("`4:0`") && e.contains("layer 4"), "{e}");
        let e = err("1,x");
        assert!(
            e.contains("`x`") && e.contains("not a valid expert index"),
            "{e}"
        );
        let e = err("5-2");
        assert!(e.contains("`5-2`") && e.contains("backwards"), "{e}");
        let e = err("1:2:3");
        assert!(e.contains("`1:2:3`"), "{e}");
        let e = err("0,,1");
        assert!(e.contains("empty item"), "{e}");
        let e = err("");
        assert!(e.contains("empty spec"), "{e}");
        let e = err("-1");
        assert!(e.contains("`-1`"), "{e}");
        let e = err("0-");
        assert!(e.contains("`0-`"), "{e}");
        let e = err("ALL");
        assert!(e.contains("`ALL`"), "{e}");
    }
}
