//! Damping for flapping nodes. A node whose lease runs out has its copies moved to the
//! other nodes; that is needed, since it may be dead. Moving them back the moment it
//! registers again is not: a link that flaps every few seconds would then move its
//! copies away and back at every flap, each move a load of expert weights on some node
//! (22 placements in a minute in RELIABILITY.md's flapping scenario before this). A node
//! that registers again within [`FLAP_WINDOW`] of losing its lease is held out of new
//! placements until it has stayed registered for [`REJOIN_HOLD`]. A node that never lost
//! its lease, or lost it long ago, joins at once.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tracing::info;

/// How long a lost lease counts against a node that registers again.
pub const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// How long such a node must stay registered before it is placed again.
pub const REJOIN_HOLD: Duration = Duration::from_secs(10);

/// What the leader has seen of registrations (every coordinator keeps it, leader or
/// not, so one that takes over knows the history too).
#[derive(Debug, Default)]
pub struct Rejoins {
    registered: BTreeSet<String>,
    /// When each node was last seen to lose its registration.
    lost: HashMap<String, Instant>,
    /// Nodes that registered again within the flap window, and when.
    back: HashMap<String, Instant>,
}

impl Rejoins {
    /// Notes the nodes registered now.
    pub fn observe<'a>(&mut self, registered: impl IntoIterator<Item = &'a str>, now: Instant) {
        let current: BTreeSet<String> = registered.into_iter().map(str::to_owned).collect();
        for gone in self.registered.difference(&current) {
            self.lost.insert(gone.clone(), now);
            self.back.remove(gone);
        }
        for new in current.difference(&self.registered) {
            if let Some(lost) = self.lost.get(new)
                && now.duration_since(*lost) < FLAP_WINDOW
            {
                info!(
                    node = %new,
                    "registered again {:.1} s after losing its lease: placed once it has \
                     stayed registered {} s",
                    now.duration_since(*lost).as_secs_f64(),
                    REJOIN_HOLD.as_secs()
                );
                self.back.insert(new.clone(), now);
            }
        }
        self.lost
            .retain(|_, t| now.duration_since(*t) < FLAP_WINDOW);
        self.back
            .retain(|_, t| now.duration_since(*t) < REJOIN_HOLD);
        self.registered = current;
    }

    /// Whether `node` is held out of new placements.
    pub fn held(&self, node: &str) -> bool {
        self.back.contains_key(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_node_back_soon_after_losing_its_lease_waits_out_the_hold() {
        let t0 = Instant::now();
        let mut r = Rejoins::default();
        r.observe(["a", "b"], t0);
        assert!(
            !r.held("a") && !r.held("b"),
            "first registrations join at once"
        );
        r.observe(["b"], t0 + S);
        r.observe(["a", "b"], t0 + 4 * S);
        assert!(r.held("a"), "back 3 s after losing its lease");
        assert!(!r.held("b"));
        // Still registered, the hold not over yet.
        r.observe(["a", "b"], t0 + 4 * S + REJOIN_HOLD - S);
        assert!(r.held("a"));
        r.observe(["a", "b"], t0 + 4 * S + REJOIN_HOLD);
        assert!(!r.held("a"), "held exactly REJOIN_HOLD");
    }

    #[test]
    fn flapping_restarts_the_hold_and_an_old_loss_is_forgotten() {
        let t0 = Instant::now();
        let mut r = Rejoins::default();
        r.observe(["a"], t0);
        // Flaps every 3 s: never registered 10 s in a row, so held throughout.
        for k in 0..10u32 {
            let t = t0 + 6 * S * k;
            r.observe([], t + 3 * S);
            assert!(!r.held("a"), "not registered: nothing to hold");
            r.observe(["a"], t + 6 * S);
            assert!(r.held("a"), "flap {k}");
        }
        // Gone for longer than the flap window: a new node as far as placement goes.
        let t = t0 + 60 * S + FLAP_WINDOW;
        r.observe([], t);
        r.observe([], t + FLAP_WINDOW);
        r.observe(["a"], t + FLAP_WINDOW + S);
        assert!(!r.held("a"));
    }
}
