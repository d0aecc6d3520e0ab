//! Health checks, hostile bytes on the port, and shutdown with streams open.

use std::time::Duration;

use bytes::Bytes;
use switchyard_proto::pb::ForwardRequest;
use switchyard_proto::{WireFormat, encode_activations};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Case, ForwardStream, HELD, channel, client, full_store, output_of, start};

const HIDDEN: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving() {
    let node = start().await;
    let mut health = HealthClient::new(channel(node.addr).await);
    for service in ["", "switchyard.expert.v1.ExpertService"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            ServingStatus::Serving as i32,
            "service `{service}`"
        );
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    node.shutdown().await;
}

/// Writes `bytes` on a fresh connection and reads whatever comes back until the server
/// closes it (or a short while passes).
async fn throw(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = sock.write_all(bytes).await;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = sock.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_does_not_take_the_node_down() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    // A stream opened before the garbage must survive it too.
    let mut stream = ForwardStream::open(&mut client).await;

    let mut noise = vec![0u8; 64 << 10];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for b in &mut noise {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut after_preface = preface.to_vec();
    after_preface.extend_from_slice(&noise[..4096]);
    // A frame header claiming a 16 MiB DATA frame on stream 1, then nothing.
    let mut huge_frame = preface.to_vec();
    huge_frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    for bytes in [
        &noise[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(),
        &after_preface[..],
        &huge_frame[..],
        b"".as_slice(),
    ] {
        throw(node.addr, bytes).await;
    }
    assert!(node.is_serving());

    let case = Case::random(5, 3, 9, HIDDEN, &HELD);
    let resp = stream.call(case.request(1, WireFormat::Bf16)).await;
    let got = output_of(&resp, 1, WireFormat::Bf16, 9, HIDDEN);
    crate::harness::assert_bf16_close(&got, &case.expected(&reference, WireFormat::Bf16));

    let mut fresh = client_after(node.addr).await;
    let resp = fresh.call(case.request(2, WireFormat::F32)).await;
    let got = output_of(&resp, 2, WireFormat::F32, 9, HIDDEN);
    assert_eq!(got, case.expected(&reference, WireFormat::F32));
    node.shutdown().await;
}

async fn client_after(addr: std::net::SocketAddr) -> ForwardStream {
    let mut c = client(addr).await;
    ForwardStream::open(&mut c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_instead_of_hanging() {
    let node = start().await;
    let mut client = client(node.addr).await;
    let mut stream = ForwardStream::open(&mut client).await;
    let case = Case::random(6, 0, 2, HIDDEN, &HELD);
    let resp = stream.call(case.request(1, WireFormat::F32)).await;
    assert_eq!(resp.error_code, 0);

    // The open stream must end promptly, well inside the server's drain time-out (5 s)
    // that otherwise caps a shutdown held open by clients.
    let started = std::time::Instant::now();
    node.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    match stream.next_raw().await {
        Ok(None) | Err(_) => {}
        Ok(Some(resp)) => panic!("unexpected answer after shutdown: {resp:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_forever_for_a_silent_client() {
    let node = start().await;
    // A well-formed HTTP/2 client that then stops reading and writing: it never
    // acknowledges the server's shutdown handshake.
    let mut sock = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.shutdown().await;
    drop(sock);
}

/// A coordinator that lies: huge declared token counts over a few bytes, assignment
/// arrays far longer than the tokens could need, duplicated pairs, activations that
/// overflow. Each gets an in-band error quickly, nothing is allocated for what the message
/// does not carry, and the node keeps serving good requests on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_coordinator_cannot_crash_or_stall_the_node() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    let mut stream = ForwardStream::open(&mut client).await;
    let hostile = |i: u64| -> ForwardRequest {
        let f32s = WireFormat::F32.to_proto() as i32;
        match i % 4 {
            // 4 billion tokens declared, 8 bytes sent.
            0 => ForwardRequest {
                id: i,
                layer: 0,
                num_tokens: u32::MAX,
                dtype: f32s,
                activations: Bytes::from_static(&[0; 8]),
                token: vec![0; 1000],
                expert: vec![0; 1000],
                weight: vec![1.0; 1000],
            },
            // One real token, a quarter of a million assignments to it.
            1 => ForwardRequest {
                id: i,
                layer: 1,
                num_tokens: 1,
                dtype: f32s,
                activations: encode_activations(&[0.5; HIDDEN], WireFormat::F32),
                token: vec![0; 250_000],
                expert: vec![0; 250_000],
                weight: vec![1.0; 250_000],
            },
            // Within the count bound, but the same pair eight times.
            2 => ForwardRequest {
                id: i,
                layer: 2,
                num_tokens: 1,
                dtype: f32s,
                activations: encode_activations(&[0.5; HIDDEN], WireFormat::F32),
                token: vec![0; 8],
                expert: vec![5; 8],
                weight: vec![1.0; 8],
            },
            // Finite activations whose expert output overflows.
            _ => ForwardRequest {
                id: i,
                layer: 3,
                num_tokens: 1,
                dtype: f32s,
                activations: encode_activations(&[f32::MAX; HIDDEN], WireFormat::F32),
                token: vec![0],
                expert: vec![0],
                weight: vec![1.0],
            },
        }
    };
    let started = std::time::Instant::now();
    for i in 0..400u64 {
        let resp = stream.call(hostile(i)).await;
        assert_eq!(resp.id, i);
        assert_ne!(resp.error_code, 0, "hostile request {i} was accepted");
        assert!(resp.output.is_empty());
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "400 hostile requests took {:?}",
        started.elapsed()
    );
    let case = Case::random(9, 2, 4, HIDDEN, &HELD);
    let resp = stream.call(case.request(10_000, WireFormat::F32)).await;
    let got = output_of(&resp, 10_000, WireFormat::F32, 4, HIDDEN);
    assert_eq!(got, case.expected(&reference, WireFormat::F32));
    assert!(node.is_serving());
    node.shutdown().await;
}
