//! A TCP proxy that holds every byte for a settable one-way delay in each direction,
//! order and bytes unchanged: a slow link (or a gray node) in front of a real process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub struct DelayProxy {
    /// Where clients connect instead of the upstream.
    pub addr: String,
    delay_us: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`,
    /// with no delay until [`DelayProxy::set_delay`].
    pub fn start(upstream: &str) -> DelayProxy {
        DelayProxy::start_on("127.0.0.1", upstream)
    }

    /// [`DelayProxy::start`], listening on a free port of `ip`.
    pub fn start_on(ip: &str, upstream: &str) -> DelayProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the proxy");
        let listener = runtime
            .block_on(TcpListener::bind((ip, 0)))
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let delay_us = Arc::new(AtomicU64::new(0));
        let (upstream, delay) = (upstream.to_owned(), delay_us.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, delay) = (upstream.clone(), delay.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, delay.clone()));
                    tokio::spawn(pump(sr, cw, delay));
                });
            }
        });
        DelayProxy {
            addr,
            delay_us,
            _runtime: runtime,
        }
    }

    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            // tokio's timer rounds up to whole milliseconds: no sleep at all for no delay.
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = Instant::now() + Duration::from_micros(delay.load(Ordering::SeqCst));
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
