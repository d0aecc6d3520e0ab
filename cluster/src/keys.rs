//! Where cluster state lives in etcd (../DESIGN.md, "Cluster state"):
//!
//! ```text
//! /switchyard/<cluster>/nodes/<node-id>        node record, on the node's lease
//! /switchyard/<cluster>/placement              the published placement, written by the leader
//! /switchyard/<cluster>/leader                 the elected coordinator, on its lease
//! /switchyard/<cluster>/drain/<node-id>        an operator asked this node to leave
//! /switchyard/<cluster>/load/<coordinator-id>  routed-token counts, on the coordinator's lease
//! /switchyard/<cluster>/rebalance              an operator asked for a rebalance (`ctl rebalance`)
//! /switchyard/<cluster>/rebalance-status       the leader's answer: adopted, moving, done
//! ```

/// Every key of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Cluster names become key segments: a `/` in one would make keys of one cluster
    /// fall under another's prefix.
    pub fn new(cluster: &str) -> Result<Self, String> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(format!(
                "cluster name `{cluster}` must be non-empty and contain no `/`"
            ));
        }
        Ok(Keys {
            root: format!("/switchyard/{cluster}/"),
        })
    }

    /// The prefix every key of the cluster starts with.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }

    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    pub fn drains(&self) -> String {
        format!("{}drain/", self.root)
    }

    pub fn drain(&self, id: &str) -> String {
        format!("{}drain/{id}", self.root)
    }

    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }

    pub fn load(&self, coordinator: &str) -> String {
        format!("{}load/{coordinator}", self.root)
    }

    pub fn rebalance(&self) -> String {
        format!("{}rebalance", self.root)
    }

    pub fn rebalance_status(&self) -> String {
        format!("{}rebalance-status", self.root)
    }
}

/// Node and coordinator ids are key segments too.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.contains('/') {
        return Err(format!(
            "{what} `{id}` must be non-empty and contain no `/`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_do_not_share_prefixes() {
        let a = Keys::new("a").unwrap();
        let ab = Keys::new("ab").unwrap();
        assert!(!ab.node("x").starts_with(a.root()));
        assert!(a.node("n1").starts_with(&a.nodes()));
        assert!(a.drain("n1").starts_with(&a.drains()));
        assert!(Keys::new("a/b").is_err());
        assert!(Keys::new("").is_err());
        assert!(check_id("node id", "x/y").is_err());
    }
}
