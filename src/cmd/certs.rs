//! `switchyard certs`: a development CA and certificates for mutual TLS between the
//! coordinator and expert nodes. For production, use your own PKI: any PEM certificates
//! that chain to one CA and name the hosts nodes are dialled at will do.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use switchyard_proto::tls::write_dev_certs;

#[derive(clap::Args)]
pub struct Args {
    /// Directory to write into (created if missing; existing files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Expert-node certificates to make: node-0 .. node-(N-1).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Another DNS name or IP address every certificate names, besides localhost,
    /// 127.0.0.1, ::1 and its own name (repeat for several).
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let certs = write_dev_certs(&a.out, a.nodes, &a.names)?;
    println!("CA:          {}", certs.ca.display());
    println!(
        "coordinator: --tls-cert {} --tls-key {} --tls-ca {}",
        certs.coordinator.cert.display(),
        certs.coordinator.key.display(),
        certs.ca.display()
    );
    for (i, n) in certs.nodes.iter().enumerate() {
        println!(
            "node-{i}:      --tls-cert {} --tls-key {} --tls-ca {}",
            n.cert.display(),
            n.key.display(),
            n.ca.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
