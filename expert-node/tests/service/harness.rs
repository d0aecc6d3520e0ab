//! Starting a node, talking to it, and computing what it should answer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_engine::{Assignment, Checkpoint, ExpertSelection, ExpertStore, ModelConfig};
use switchyard_expert_node::{ExpertNode, NodeConfig, NodeError, serve_with_tls};
use switchyard_proto::pb::{ForwardRequest, ForwardResponse};
use switchyard_proto::{ExpertServiceClient, MAX_MESSAGE_BYTES, WireFormat, encode_activations};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// The experts the node under test starts with, in every layer.
pub const HELD: [u32; 2] = [0, 5];

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-tiny")
}

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), NodeError>>,
}

impl Running {
    /// Stops the server and waits for it, failing if shutdown hangs.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("server did not shut down within 10 s")
            .expect("server task panicked")
            .expect("server failed");
    }

    /// Whether the server task is still running.
    pub fn is_serving(&self) -> bool {
        !self.server.is_finished()
    }
}

/// The CPU node the tests serve: [`HELD`] in every layer of the f32 fixture.
pub fn node_config() -> NodeConfig {
    let cfg = ModelConfig::from_dir(&fixture()).unwrap();
    let initial = ExpertSelection::in_every_layer(&HELD.map(|e| e as usize), cfg.num_layers);
    NodeConfig {
        model_dir: fixture(),
        node_id: "test-node".into(),
        initial,
        max_experts: None,
        device: switchyard_engine::cuda::Device::Cpu,
        work_memory_bytes: None,
        max_request_tokens: None,
        cpu_weights: Default::default(),
    }
}

/// A node holding [`HELD`] in every layer of the f32 fixture.
pub async fn start() -> Running {
    start_with_tls(None).await
}

/// [`start`], serving mutual TLS with `tls` when given.
pub async fn start_with_tls(tls: Option<switchyard_proto::tls::Tls>) -> Running {
    let node = ExpertNode::open(node_config()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve_with_tls(node, listener, tls.as_ref(), async {
            let _ = stopped.await;
        })
        .await
    });
    Running {
        addr,
        stop: Some(stop),
        server,
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

pub async fn client(addr: SocketAddr) -> ExpertServiceClient<Channel> {
    ExpertServiceClient::new(channel(addr).await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// One open Forward stream, used as the coordinator does: requests in, answers back in
/// order.
pub struct ForwardStream {
    tx: mpsc::Sender<ForwardRequest>,
    rx: Streaming<ForwardResponse>,
}

impl ForwardStream {
    pub async fn open(client: &mut ExpertServiceClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let rx = client
            .forward(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        ForwardStream { tx, rx }
    }

    pub async fn send(&self, req: ForwardRequest) {
        self.tx.send(req).await.unwrap();
    }

    pub async fn recv(&mut self) -> ForwardResponse {
        tokio::time::timeout(Duration::from_secs(30), self.rx.message())
            .await
            .expect("no answer within 30 s")
            .expect("stream failed")
            .expect("stream ended")
    }

    pub async fn call(&mut self, req: ForwardRequest) -> ForwardResponse {
        self.send(req).await;
        self.recv().await
    }

    /// What the stream yields next once the server has stopped: its end or an error.
    pub async fn next_raw(&mut self) -> Result<Option<ForwardResponse>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("stream neither answered nor ended within 10 s")
    }
}

/// An independently loaded store with every expert: the reference the node must match.
pub fn full_store() -> ExpertStore {
    let cfg = ModelConfig::from_dir(&fixture()).unwrap();
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap()
}

/// A unit of work with random activations and random assignments to `experts`: each
/// token gets up to two distinct experts (some get none).
pub struct Case {
    pub layer: u32,
    pub tokens: usize,
    pub x: Vec<f32>,
    pub work: Vec<Assignment>,
}

impl Case {
    pub fn random(seed: u64, layer: u32, tokens: usize, hidden: usize, experts: &[u32]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = (0..tokens * hidden)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let mut work = Vec::new();
        for t in 0..tokens as u32 {
            let k = rng.random_range(0..=2usize.min(experts.len()));
            let first = rng.random_range(0..experts.len());
            for i in 0..k {
                work.push(Assignment {
                    token: t,
                    expert: experts[(first + i) % experts.len()],
                    weight: rng.random_range(0.01f32..1.0),
                });
            }
        }
        Case {
            layer,
            tokens,
            x,
            work,
        }
    }

    pub fn request(&self, id: u64, format: WireFormat) -> ForwardRequest {
        ForwardRequest {
            id,
            layer: self.layer,
            num_tokens: self.tokens as u32,
            dtype: format.to_proto() as i32,
            activations: encode_activations(&self.x, format),
            token: self.work.iter().map(|a| a.token).collect(),
            expert: self.work.iter().map(|a| a.expert).collect(),
            weight: self.work.iter().map(|a| a.weight).collect(),
        }
    }

    /// The answer computed locally from what the wire carries in `format`.
    pub fn expected(&self, store: &ExpertStore, format: WireFormat) -> Vec<f32> {
        let x: Vec<f32> = match format {
            WireFormat::F32 => self.x.clone(),
            WireFormat::Bf16 => self
                .x
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect(),
        };
        store
            .combine(self.layer as usize, &x, self.tokens, &self.work)
            .unwrap()
    }
}

/// Decodes a successful answer, checking its envelope.
pub fn output_of(
    resp: &ForwardResponse,
    id: u64,
    format: WireFormat,
    tokens: usize,
    hidden: usize,
) -> Vec<f32> {
    assert_eq!(resp.id, id);
    assert_eq!(resp.error_code, 0, "request {id} refused: {}", resp.error);
    assert!(resp.error.is_empty());
    assert_eq!(resp.dtype, format.to_proto() as i32);
    switchyard_proto::decode_activations(&resp.output, format, tokens, hidden).unwrap()
}

/// bf16 keeps 8 significant bits; the node rounds its f32 result once on the way out.
pub fn assert_bf16_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = w.abs() / 256.0 + 1e-6;
        assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}
