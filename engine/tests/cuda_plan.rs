//! The CUDA backend's host-side planning (permutation by expert, offsets, per-token rows,
//! M-tile schedule), checked against a naive implementation on random batches. No GPU.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_engine::cuda::plan::{Plan, PlanError, PlanLayout, TILE_M, Tile, max_tiles};

/// Rows per expert, each as (token, weight, original index), in original order.
fn naive_groups(experts: usize, work: &[(u32, u32, f32)]) -> Vec<Vec<(u32, f32, usize)>> {
    let mut g = vec![Vec::new(); experts];
    for (i, &(t, e, w)) in work.iter().enumerate() {
        g[e as usize].push((t, w, i));
    }
    g
}

fn check(tokens: usize, experts: usize, work: &[(u32, u32, f32)]) {
    let plan = Plan::build(tokens, experts, work).unwrap();
    let groups = naive_groups(experts, work);
    assert_eq!(plan.rows(), work.len());
    assert_eq!(plan.expert_off.len(), experts + 1);
    assert_eq!(plan.tok_off.len(), tokens + 1);

    // Rows grouped by expert, in expert order, stable within an expert.
    let mut row = 0usize;
    let mut row_of_index = vec![usize::MAX; work.len()];
    for (e, g) in groups.iter().enumerate() {
        assert_eq!(plan.expert_off[e] as usize, row, "offset of expert {e}");
        for &(t, w, i) in g {
            assert_eq!(plan.sorted_tok[row], t as i32);
            assert_eq!(plan.sorted_w[row].to_bits(), w.to_bits());
            row_of_index[i] = row;
            row += 1;
        }
    }
    assert_eq!(plan.expert_off[experts] as usize, work.len());
    // The busiest expert's rows, which pick the skinny kernels (at most SK_ROWS rows per
    // expert, each in a tile of its own).
    let busiest = groups.iter().map(Vec::len).max().unwrap_or(0);
    assert_eq!(plan.max_expert_rows(), busiest);
    if busiest <= 8 {
        assert_eq!(
            plan.tiles.len(),
            groups.iter().filter(|g| !g.is_empty()).count()
        );
    }

    // Each token's rows: exactly its assignments, in the order given.
    for t in 0..tokens {
        let mine: Vec<i32> = work
            .iter()
            .enumerate()
            .filter(|(_, a)| a.0 as usize == t)
            .map(|(i, _)| row_of_index[i] as i32)
            .collect();
        let (b, e) = (plan.tok_off[t] as usize, plan.tok_off[t + 1] as usize);
        assert_eq!(&plan.tok_rows[b..e], mine.as_slice(), "rows of token {t}");
    }

    // Tiles: cover every row exactly once, never cross an expert, none for empty experts,
    // in expert order, and within the bound the workspaces are sized by.
    let mut covered = vec![0u8; work.len()];
    let mut last_expert = -1;
    for tile in &plan.tiles {
        let Tile {
            expert,
            row0,
            row_end,
            ..
        } = *tile;
        assert!(expert >= last_expert);
        last_expert = expert;
        let e = expert as usize;
        assert_eq!(row_end, plan.expert_off[e + 1]);
        assert!(row0 >= plan.expert_off[e] && row0 < row_end);
        assert_eq!((row0 - plan.expert_off[e]) as usize % TILE_M, 0);
        for r in row0..row_end.min(row0 + TILE_M as i32) {
            covered[r as usize] += 1;
        }
    }
    assert!(
        covered.iter().all(|c| *c == 1),
        "every row in exactly one tile"
    );
    for (e, g) in groups.iter().enumerate() {
        let n = plan.tiles.iter().filter(|t| t.expert as usize == e).count();
        assert_eq!(n, g.len().div_ceil(TILE_M), "tiles of expert {e}");
    }
    assert!(plan.tiles.len() <= max_tiles(work.len(), experts));

    // The packed buffer holds every part where the layout says.
    let mut buf = Vec::new();
    plan.pack_into(&mut buf);
    let l = plan.layout();
    assert_eq!(l, PlanLayout::new(work.len(), tokens, plan.tiles.len()));
    assert_eq!(buf.len(), l.len);
    assert_eq!(l.tiles % 4, 0);
    let n = work.len();
    assert_eq!(
        &buf[l.sorted_tok..l.sorted_tok + n],
        plan.sorted_tok.as_slice()
    );
    for r in 0..n {
        assert_eq!(buf[l.sorted_w + r] as u32, plan.sorted_w[r].to_bits());
    }
    assert_eq!(
        &buf[l.tok_off..l.tok_off + tokens + 1],
        plan.tok_off.as_slice()
    );
    assert_eq!(&buf[l.tok_rows..l.tok_rows + n], plan.tok_rows.as_slice());
    for (i, t) in plan.tiles.iter().enumerate() {
        assert_eq!(
            &buf[l.tiles + 4 * i..l.tiles + 4 * i + 4],
            &[t.expert, t.row0, t.row_end, 0]
        );
    }
}

/// Top-k routing over the first `used` of `experts` experts (the rest get zero tokens).
fn random_work(
    rng: &mut ChaCha8Rng,
    tokens: usize,
    experts: usize,
    used: usize,
    k: usize,
) -> Vec<(u32, u32, f32)> {
    let mut work = Vec::new();
    for t in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k.min(used) {
            let e = rng.random_range(0..used as u32);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            work.push((t as u32, e, rng.random::<f32>()));
        }
    }
    let _ = experts;
    work
}

#[test]
fn plans_match_a_naive_grouping() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &tokens in &[1usize, 3, 17, 64, 511, 4096] {
        for &(experts, used, k) in &[(8, 8, 2), (8, 3, 2), (4, 4, 1), (16, 16, 4), (1, 1, 1)] {
            let work = random_work(&mut rng, tokens, experts, used, k);
            check(tokens, experts, &work);
        }
    }
}

#[test]
fn skewed_shuffled_and_empty_batches() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // No work at all: no rows, no tiles, every token sums nothing.
    check(5, 8, &[]);
    let plan = Plan::build(5, 8, &[]).unwrap();
    assert!(plan.tiles.is_empty() && plan.tok_off.iter().all(|o| *o == 0));
    // Everything on one expert, exact multiples and one past a tile boundary.
    for n in [TILE_M, TILE_M + 1, 3 * TILE_M] {
        let work: Vec<_> = (0..n as u32).map(|t| (t, 5, 0.5)).collect();
        check(n, 8, &work);
    }
    // Assignments in random order, tokens with none, a token with several on one expert.
    let mut work: Vec<(u32, u32, f32)> = (0..300)
        .map(|_| {
            (
                rng.random_range(0..40),
                rng.random_range(0..6),
                rng.random::<f32>(),
            )
        })
        .collect();
    work.push((7, 2, 1.0));
    work.push((7, 2, 2.0));
    check(50, 6, &work);
}

#[test]
fn rejects_out_of_range_work() {
    assert_eq!(
        Plan::build(2, 4, &[(0, 1, 1.0), (2, 0, 1.0)]),
        Err(PlanError::BadToken {
            index: 1,
            token: 2,
            tokens: 2
        })
    );
    assert_eq!(
        Plan::build(2, 4, &[(1, 4, 1.0)]),
        Err(PlanError::BadExpert {
            index: 0,
            expert: 4,
            experts: 4
        })
    );
}
