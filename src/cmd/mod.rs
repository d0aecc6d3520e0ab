pub mod expert_node;
pub mod generate;
pub mod synth;
pub mod verify;
