//! `ExpertService` over gRPC: thin adapters from tonic requests to [`ExpertNode`].

use std::sync::Arc;

use switchyard_proto::ExpertService;
use switchyard_proto::pb::{
    DescribeRequest, ExpertsRequest, ForwardRequest, ForwardResponse, NodeInfo,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::ExpertNode;

/// Responses a stream may have computed ahead of a slow reader.
const RESPONSE_BUFFER: usize = 8;

/// Requests of one stream computed at once. The coordinator multiplexes by request id, and
/// with micro-batches it has one layer of each in flight: the second must not queue behind
/// the first (the working memory is bounded by the node's budget, not by this). Past this
/// many, the stream stops reading and HTTP/2 flow control pushes back on the sender.
const IN_FLIGHT_PER_STREAM: usize = 8;

pub(crate) struct ExpertNodeService {
    node: Arc<ExpertNode>,
    /// Turns true when the server shuts down: open Forward streams finish the request in
    /// hand and then end cleanly, instead of holding the graceful shutdown open forever.
    stopping: watch::Receiver<bool>,
}

impl ExpertNodeService {
    pub(crate) fn new(node: Arc<ExpertNode>, stopping: watch::Receiver<bool>) -> Self {
        ExpertNodeService { node, stopping }
    }
}

#[tonic::async_trait]
impl ExpertService for ExpertNodeService {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    #[tracing::instrument(name = "forward_stream", skip_all, fields(node = %self.node.node_id(), peer = ?request.remote_addr()))]
    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let node = Arc::clone(&self.node);
        let mut stopping = self.stopping.clone();
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_STREAM));
        let serve_stream = async move {
            tracing::debug!("forward stream opened");
            loop {
                let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
                    break;
                };
                let next = tokio::select! {
                    biased;
                    _ = stopping.wait_for(|stop| *stop) => break,
                    next = inbound.message() => next,
                };
                let req = match next {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    // The stream itself is broken (undecodable frame, oversized message,
                    // reset): report why and end it.
                    Err(status) => {
                        tracing::warn!("forward stream failed: {status}");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let span = tracing::debug_span!(
                    "forward",
                    id = req.id,
                    layer = req.layer,
                    tokens = req.num_tokens,
                    assignments = req.token.len()
                );
                let (node, tx) = (Arc::clone(&node), tx.clone());
                // Each request is its own task, answered when done (out of order is fine:
                // answers carry the request's id). A request in hand when the server stops
                // still finishes: the stream's receiver lives until every task's sender is gone.
                tokio::spawn(
                    async move {
                        let response = node.forward(req).await;
                        // An error here means the client has gone.
                        let _ = tx.send(Ok(response)).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            tracing::debug!("forward stream closed");
        };
        tokio::spawn(serve_stream.in_current_span());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.node_id(), epoch = request.get_ref().epoch, count = request.get_ref().experts.len()))]
    async fn load_experts(
        &self,
        request: Request<ExpertsRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        let req = request.into_inner();
        let info = self.node.load_experts(&req.experts, req.epoch).await?;
        Ok(Response::new(info))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.node_id(), epoch = request.get_ref().epoch, count = request.get_ref().experts.len()))]
    async fn unload_experts(
        &self,
        request: Request<ExpertsRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        let req = request.into_inner();
        let info = self.node.unload_experts(&req.experts, req.epoch).await?;
        Ok(Response::new(info))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.node_id()))]
    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        Ok(Response::new(self.node.describe()))
    }
}
