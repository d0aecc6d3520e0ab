//! Nodes registered but cut off from the coordinators: etcd still sees them (their lease
//! is renewed), so nothing else would ever move their copies, and every expert they hold
//! runs on its other copies alone until the link heals. The coordinators say which
//! placed nodes they cannot reach in their load reports.

use std::collections::BTreeSet;

use crate::etcd::Snapshot;

/// Registered nodes that every coordinator reporting now (its report lives on its lease)
/// says it cannot reach. One coordinator's word is not enough while another reaches the
/// node: the fault may be its own. Nor is anyone's when it would leave no node at all:
/// then the coordinators' side is the likelier fault, and a placement on nothing serves
/// nothing.
pub fn unreachable_nodes(snap: &Snapshot) -> BTreeSet<String> {
    if snap.loads.is_empty() {
        return BTreeSet::new();
    }
    let cut: BTreeSet<String> = snap
        .nodes
        .values()
        .filter(|n| snap.loads.iter().all(|r| r.unreachable.contains(&n.addr)))
        .map(|n| n.id.clone())
        .collect();
    if cut.len() == snap.nodes.len() {
        return BTreeSet::new();
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::tests::node;
    use crate::records::LoadReport;

    fn report(coordinator: &str, unreachable: &[&str]) -> LoadReport {
        LoadReport {
            coordinator: coordinator.into(),
            window_ms: 2000,
            tokens: Vec::new(),
            unreachable: unreachable.iter().map(|id| format!("{id}:1")).collect(),
        }
    }

    fn snapshot(nodes: &[&str], loads: Vec<LoadReport>) -> Snapshot {
        Snapshot {
            nodes: nodes
                .iter()
                .map(|id| (id.to_string(), node(id, 0)))
                .collect(),
            loads,
            ..Snapshot::default()
        }
    }

    fn ids(set: BTreeSet<String>) -> Vec<String> {
        set.into_iter().collect()
    }

    #[test]
    fn a_node_is_cut_off_only_when_every_coordinator_says_so() {
        let nodes = ["a", "b", "c"];
        // Nobody reports: nothing is known.
        assert!(unreachable_nodes(&snapshot(&nodes, Vec::new())).is_empty());
        let both = vec![report("c0", &["b"]), report("c1", &["b", "c"])];
        assert_eq!(ids(unreachable_nodes(&snapshot(&nodes, both))), ["b"]);
        // c1 still reaches b: not cut off.
        let one = vec![report("c0", &["b"]), report("c1", &[])];
        assert!(unreachable_nodes(&snapshot(&nodes, one)).is_empty());
        // A lone coordinator's word decides...
        let alone = vec![report("c0", &["a", "c"])];
        assert_eq!(ids(unreachable_nodes(&snapshot(&nodes, alone))), ["a", "c"]);
        // ...unless it reaches no node at all.
        let blind = vec![report("c0", &["a", "b", "c"])];
        assert!(unreachable_nodes(&snapshot(&nodes, blind)).is_empty());
    }
}
