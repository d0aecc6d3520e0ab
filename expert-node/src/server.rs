//! The gRPC server: `ExpertService` and `grpc.health.v1` on one listener, tuned for the
//! hot path (one round trip per MoE layer per decode step).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::tls::Tls;
use switchyard_proto::{ExpertServiceServer, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::service::ExpertNodeService;
use crate::{ExpertNode, NodeError};

/// HTTP/2's default 64 KiB windows would stall a multi-megabyte prefill chunk on
/// WINDOW_UPDATE round trips; these let a whole layer's activations be in flight at once.
const STREAM_WINDOW_BYTES: u32 = 16 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Pings on idle connections, so a coordinator that vanished without closing its socket
/// does not hold a stream (and its buffers) forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A coordinator needs one Forward stream per node plus the odd unary call; a peer that
/// opens hundreds on one connection is refused past this many, so one connection cannot
/// queue unbounded work.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// How long shutdown waits for clients to finish the HTTP/2 goodbye. A client that is
/// hung (or merely idle on a runtime nobody polls) never acknowledges it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `node` on `listener` until `shutdown` completes. Health reports SERVING from
/// the start (the node's initial experts are already loaded) and NOT_SERVING once
/// shutdown begins; open Forward streams finish the request in hand and end. Returns at
/// most [`DRAIN_TIMEOUT`] after `shutdown` completes, whatever clients do.
pub async fn serve(
    node: impl Into<Arc<ExpertNode>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    serve_with_tls(node, listener, None, shutdown).await
}

/// [`serve`], with mutual TLS when `tls` is given: the listener then speaks TLS only
/// (a plaintext client fails its handshake) and every client must present a certificate
/// signed by the configured CA. A failed handshake drops that connection alone.
pub async fn serve_with_tls(
    node: impl Into<Arc<ExpertNode>>,
    listener: TcpListener,
    tls: Option<&Tls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let addr = listener.local_addr().ok();
    let node: Arc<ExpertNode> = node.into();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExpertServiceServer<ExpertNodeService>>()
        .await;

    let expert_service =
        ExpertServiceServer::new(ExpertNodeService::new(Arc::clone(&node), stop_rx))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Every request is a small latency-bound exchange: never let Nagle hold a segment back.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let node_id = node.node_id().to_owned();
    let signal = async move {
        shutdown.await;
        tracing::info!(node = %node_id, "shutting down");
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<ExpertServiceServer<ExpertNodeService>>()
            .await;
        let _ = stop_tx.send(true);
        let _ = drain_tx.send(());
    };

    tracing::info!(node = %node.node_id(), addr = ?addr, tls = tls.is_some(), "serving experts");
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let server = builder
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(expert_service)
        .serve_with_incoming_shutdown(incoming, signal);
    let drain_deadline = async {
        match drain_rx.await {
            Ok(()) => tokio::time::sleep(DRAIN_TIMEOUT).await,
            // The server ended on its own; it wins the race below.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served?,
        () = drain_deadline => tracing::warn!(
            "clients still connected {DRAIN_TIMEOUT:?} after shutdown; closing anyway"
        ),
    }
    Ok(())
}
