//! The expert node over real sockets: the server runs in-process on 127.0.0.1:0 (in a
//! child process for the memory tests, which measure it) and the tests talk to it with
//! the generated tonic client, as a coordinator would.

mod harness;

mod bad_input;
mod control;
mod forward;
mod memory;
mod robustness;
mod tls;
