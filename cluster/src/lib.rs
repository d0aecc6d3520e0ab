//! Switchyard's cluster state on etcd: expert nodes register under leases, one
//! coordinator is elected leader and publishes placements by epoch, every coordinator
//! follows the published placement. Without etcd none of this runs (static mode).

pub mod etcd;
pub mod keys;
pub mod leader;
pub mod ops;
pub mod planner;
pub mod rebalance;
pub mod records;
pub mod session;
pub mod watch;

pub use etcd::{ClusterConfig, ClusterError, Snapshot, read_snapshot};
pub use keys::Keys;
pub use leader::{ControlError, LeaderConfig, NodeControl};
pub use planner::{
    Candidate, PlanError, PlanInput, balancedness, mean_balancedness, plan, plan_by_load,
};
pub use records::{LeaderRecord, LoadReport, NodeRecord, PlacedNode, PlacementRecord};
pub use session::Session;
pub use watch::{View, follow};
