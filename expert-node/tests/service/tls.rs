//! Mutual TLS on the node's port: only clients holding a certificate from the node's CA
//! get an answer; plaintext, certificate-less and foreign-CA clients are refused at the
//! handshake, and none of them disturbs the node.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_proto::tls::{DevCerts, Tls, write_dev_certs};
use switchyard_proto::{ExpertServiceClient, WireFormat};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Case, ForwardStream, HELD, full_store, output_of, start_with_tls};

const HIDDEN: usize = 64;

fn certs(dir: &tempfile::TempDir) -> DevCerts {
    write_dev_certs(dir.path(), 1, &[]).unwrap()
}

/// Health over a channel built from `tls` (plaintext when `None`); Err is the refusal.
async fn health_via(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<i32, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_serves_only_clients_with_a_certificate_from_its_ca() {
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ours, theirs) = (certs(&ours), certs(&theirs));
    let node_tls = ours.nodes[0].load().unwrap();
    let node = start_with_tls(Some(node_tls)).await;
    let good: Tls = ours.coordinator.load().unwrap();
    let foreign: Tls = theirs.coordinator.load().unwrap();
    let our_ca = Certificate::from_pem(std::fs::read(&ours.ca).unwrap());

    // The coordinator's configuration: served.
    let status = health_via(node.addr, Some(good.client_config("127.0.0.1"))).await;
    assert_eq!(status, Ok(ServingStatus::Serving as i32));

    // Plaintext HTTP/2 to a TLS port.
    let plain = health_via(node.addr, None).await;
    assert!(plain.is_err(), "plaintext client was served: {plain:?}");

    // TLS, trusting the node, but presenting no certificate.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(our_ca.clone())
        .domain_name("127.0.0.1");
    let r = health_via(node.addr, Some(anonymous)).await;
    assert!(r.is_err(), "client without a certificate was served: {r:?}");

    // TLS, trusting the node, presenting a certificate signed by another CA.
    let impostor = ClientTlsConfig::new()
        .ca_certificate(our_ca)
        .domain_name("127.0.0.1")
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&theirs.coordinator.cert).unwrap(),
            std::fs::read(&theirs.coordinator.key).unwrap(),
        ));
    let r = health_via(node.addr, Some(impostor)).await;
    assert!(
        r.is_err(),
        "client with a foreign certificate was served: {r:?}"
    );

    // A client of another cluster does not trust this node either.
    let r = health_via(node.addr, Some(foreign.client_config("127.0.0.1"))).await;
    assert!(r.is_err(), "client trusted a node of another CA: {r:?}");
    let e = r.unwrap_err();
    assert!(
        e.contains("InvalidCertificate"),
        "refused for the wrong reason: {e}"
    );

    // A name the node's certificate does not carry is refused too.
    let r = health_via(node.addr, Some(good.client_config("node-7.example"))).await;
    assert!(
        r.is_err(),
        "certificate accepted for a name it lacks: {r:?}"
    );

    // None of that disturbed the node: a real Forward exchange over mTLS is exact.
    let channel = Endpoint::from_shared(format!("https://{}", node.addr))
        .unwrap()
        .tls_config(good.client_config("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ExpertServiceClient::new(channel);
    let mut stream = ForwardStream::open(&mut client).await;
    let case = Case::random(21, 1, 6, HIDDEN, &HELD);
    let resp = stream.call(case.request(1, WireFormat::F32)).await;
    let got = output_of(&resp, 1, WireFormat::F32, 6, HIDDEN);
    assert_eq!(got, case.expected(&full_store(), WireFormat::F32));
    assert!(node.is_serving());
    node.shutdown().await;
}
