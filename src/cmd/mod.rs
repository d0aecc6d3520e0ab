pub mod coordinator;
pub mod expert_node;
pub mod generate;
pub mod serve_args;
pub mod synth;
pub mod up;
pub mod verify;
