use proptest::prelude::*;

use super::*;

fn record(epoch: u64, experts: usize, holders: &[Vec<&str>]) -> PlacementRecord {
    let mut names: Vec<&str> = holders.iter().flatten().copied().collect();
    names.sort_unstable();
    names.dedup();
    PlacementRecord {
        epoch,
        num_layers: holders.len() / experts,
        num_experts: experts,
        nodes: names
            .iter()
            .map(|id| PlacedNode {
                id: id.to_string(),
                addr: format!("{id}:7000"),
            })
            .collect(),
        holders: holders
            .iter()
            .map(|h| {
                let mut h: Vec<u32> = h
                    .iter()
                    .map(|id| names.iter().position(|n| n == id).unwrap() as u32)
                    .collect();
                h.sort_unstable();
                h
            })
            .collect(),
    }
}

fn nodes_holding(p: &PlacementRecord, caps: &[(&str, usize)]) -> BTreeMap<String, NodeRecord> {
    caps.iter()
        .map(|&(id, capacity)| {
            (
                id.to_string(),
                NodeRecord {
                    id: id.to_string(),
                    addr: format!("{id}:7000"),
                    device: "cpu".into(),
                    num_layers: p.num_layers,
                    num_experts: p.num_experts,
                    capacity,
                    bytes_per_expert: 1,
                    held: p.experts_of(id),
                    version: String::new(),
                    epoch: p.epoch,
                    weights: "f32".into(),
                },
            )
        })
        .collect()
}

#[test]
fn the_policy_adopts_what_gains_and_an_operator_needs_only_a_gain() {
    let p = RebalancePolicy::default();
    assert!(p.adopt(Some(0.5), Some(0.9), false));
    assert!(
        !p.adopt(Some(0.5), Some(0.52), false),
        "gain under min_gain"
    );
    assert!(
        !p.adopt(Some(0.95), Some(1.0), false),
        "already balanced enough"
    );
    assert!(p.adopt(Some(0.95), Some(0.96), true));
    assert!(!p.adopt(Some(0.95), Some(0.95), true), "no gain, no moves");
    assert!(!p.adopt(None, Some(1.0), true), "no load measured");
    assert_eq!(plannable(54), 48);
    assert_eq!(plannable(1), 0);
    assert_eq!(plannable(0), 0);
}

#[test]
fn a_swap_between_full_nodes_waits_for_room_and_one_free_slot_is_enough() {
    // Two experts, one copy each, to trade places.
    let before = record(1, 2, &[vec!["a"], vec!["b"]]);
    let after = record(0, 2, &[vec!["b"], vec!["a"]]);
    let full = nodes_holding(&before, &[("a", 1), ("b", 1)]);
    let step = next_step(&before, &after, &full, 2);
    assert!(
        step.same_assignment(&before),
        "nowhere to load: nothing moves"
    );
    let roomy = nodes_holding(&before, &[("a", 2), ("b", 2)]);
    let step = next_step(&before, &after, &roomy, 2);
    assert!(step.same_assignment(&after));
    assert_eq!(step.epoch, 2);
}

#[test]
fn copies_are_never_fewer_than_both_placements_give() {
    // Two copies on a and b, to move to c and d; c has room, d has none yet.
    let before = record(1, 1, &[vec!["a", "b"]]);
    let after = record(0, 1, &[vec!["c", "d"]]);
    let mut nodes = nodes_holding(&before, &[("a", 1), ("b", 1), ("c", 1), ("d", 0)]);
    nodes.get_mut("d").unwrap().capacity = 0;
    let step = next_step(&before, &after, &nodes, 2);
    let holders: Vec<&str> = step.holders_of(0, 0).map(|n| n.id.as_str()).collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
    assert!(holders.contains(&"c"));
}

proptest! {
    /// From any placement to any other that leaves every node a free slot: each step
    /// fits in memory while it loads, never leaves an expert short of copies, and the
    /// steps reach the target.
    #[test]
    fn steps_fit_in_memory_keep_every_expert_served_and_arrive(
        from in proptest::collection::vec(proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..3), 8),
        to in proptest::collection::vec(proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..3), 8),
    ) {
        let names = ["n0", "n1", "n2", "n3"];
        let as_ids = |h: &Vec<Vec<usize>>| -> Vec<Vec<&str>> {
            h.iter().map(|c| c.iter().map(|&i| names[i]).collect()).collect()
        };
        let (from_ids, to_ids) = (as_ids(&from), as_ids(&to));
        let count = |h: &Vec<Vec<usize>>, i: usize| h.iter().filter(|c| c.contains(&i)).count();
        let caps: Vec<(&str, usize)> = (0..4)
            .map(|i| (names[i], count(&from, i).max(count(&to, i)) + 1))
            .collect();
        let mut current = record(1, 4, &from_ids);
        let target = record(0, 4, &to_ids);
        let mut nodes = nodes_holding(&current, &caps);
        for epoch in 2..20 {
            let step = next_step(&current, &target, &nodes, epoch);
            prop_assert!(step.validate().is_ok(), "{:?}", step.validate());
            for x in 0..8 {
                let floor = current.holders[x].len().min(target.holders[x].len());
                prop_assert!(step.holders[x].len() >= floor);
            }
            for (id, cap) in &caps {
                // While loading, a node holds its old experts and the step's.
                let mut during: Vec<(usize, usize)> = nodes[*id].held.clone();
                during.extend(step.experts_of(id));
                during.sort_unstable();
                during.dedup();
                prop_assert!(during.len() <= *cap, "{} holds {} > {}", id, during.len(), cap);
            }
            if step.same_assignment(&target) {
                return Ok(());
            }
            prop_assert!(!step.same_assignment(&current), "stuck at epoch {}", epoch);
            current = step;
            nodes = nodes_holding(&current, &caps);
        }
        prop_assert!(false, "did not arrive in 18 steps");
    }
}
