//! HTTP/1 connections under the API: how long a client may take to send its request
//! (slowloris), and a shutdown that neither waits on clients that never finish a request
//! nor, past a grace period, on anything else.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// How long a client may take to send a request, and how long shutdown waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// To receive a whole request head, counted from the connection's start or the end of
    /// its previous response: also how long an idle keep-alive connection stays open.
    pub header: Duration,
    /// To receive a whole request body, counted from the end of its head.
    pub body: Duration,
    /// How long shutdown lets requests in progress finish before closing their connections.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// After shutdown begins, a connection with no request in progress gets this long to
/// close by itself (flushing the end of a response already produced) before it is dropped.
const IDLE_LINGER: Duration = Duration::from_millis(500);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, closes
/// connections with no request in progress, and waits for the others at most
/// `timeouts.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            tcp = accept(&listener) => {
                // Streamed tokens are small writes: with Nagle's algorithm each one after
                // the first waits for the client's (delayed, up to 40 ms) ACK of the one
                // before.
                if let Err(e) = tcp.set_nodelay(true) {
                    debug!(error = %e, "could not set TCP_NODELAY on a connection");
                }
                conns.spawn(connection(tcp, app.clone(), timeouts, stop_rx.clone()));
            }
            // Reaped as they end, so the set holds live connections only.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // `stop_rx` is still held here, so the send cannot fail.
    let _ = stop_tx.send(true);
    if !conns.is_empty() {
        info!(
            connections = conns.len(),
            grace_s = timeouts.shutdown_grace.as_secs_f64(),
            "shutting down: letting requests in progress finish"
        );
    }
    let drained = tokio::time::timeout(timeouts.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "shutdown grace period over: closing connections with requests still in progress"
        );
        conns.shutdown().await;
    }
}

/// The next connection. Errors that concern one connection are skipped; others (out of
/// file descriptors) are retried after a pause rather than spun on.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => return tcp,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                warn!(error = %e, "accepting a connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One connection, until it closes or, once `stop` is set, until it has no request in
/// progress.
async fn connection(
    tcp: TcpStream,
    app: Router,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let service = {
        let in_flight = in_flight.clone();
        let stop = stop.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::enter(&in_flight);
            let body_stop = stop.clone();
            let req = req.map(|b| Body::new(DeadlineBody::new(b, timeouts.body, body_stop)));
            let call = app.clone().oneshot(req);
            async move {
                let resp = call.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| {
                    Body::new(GuardedBody {
                        inner: b,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let mut builder = http1::Builder::new();
    // The header timeout also starts before the first byte, so a client that connects
    // and sends nothing is closed too.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(tcp), service));
    tokio::select! {
        result = conn.as_mut() => return log_end(result),
        // A dropped sender means the server is gone: stop as well.
        _ = stop.wait_for(|stop| *stop) => {}
    }
    // Closes the connection once its response in progress, if any, is written.
    conn.as_mut().graceful_shutdown();
    // hyper keeps waiting for a request head that has begun: a half-sent request would
    // hold shutdown up to the header timeout. It has not reached the API, so drop it.
    let mut check = tokio::time::interval_at(Instant::now() + IDLE_LINGER, IDLE_LINGER / 2);
    loop {
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            _ = check.tick() => {
                if in_flight.load(Ordering::Acquire) == 0 {
                    debug!("shutting down: closing a connection with no request in progress");
                    return;
                }
            }
        }
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        // Timeouts and clients that go away: routine, one per bad client.
        debug!(error = %e, "connection ended with an error");
    }
}

/// Counts a request as in progress from its head until its response body is done or
/// dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress while it is sent.
struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why reading a request body was given up.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BodyCut {
    #[error(
        "the request body did not arrive within {} s (--body-timeout-s)",
        .0.as_secs_f64()
    )]
    TimedOut(Duration),
    #[error("the server is shutting down; send the request again")]
    ShuttingDown,
}

impl BodyCut {
    /// The cut behind a body error, if that is what it was (it arrives wrapped in axum's
    /// extractor rejections).
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<BodyCut> {
        let mut e = Some(err);
        while let Some(cur) = e {
            if let Some(cut) = cur.downcast_ref::<BodyCut>() {
                return Some(*cut);
            }
            e = cur.source();
        }
        None
    }
}

/// A request body that fails with [`BodyCut`] unless all of it has arrived by a deadline,
/// or as soon as shutdown begins while the rest of it is still awaited: such a request has
/// not reached the scheduler, and its client may take any time. The deadline covers the
/// whole body, not the gap between bytes, so a body that trickles in is bounded too. Only
/// reading the body is bounded: not a handler that never reads it, nor the response.
struct DeadlineBody<B> {
    inner: B,
    cut: Pin<Box<dyn Future<Output = BodyCut> + Send>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, timeout: Duration, mut stop: watch::Receiver<bool>) -> Self {
        // Counted from now (the end of the head), not from the handler's first read.
        let deadline = Instant::now() + timeout;
        let cut = async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => BodyCut::TimedOut(timeout),
                // A dropped sender means the server is gone: a shutdown too.
                _ = stop.wait_for(|stop| *stop) => BodyCut::ShuttingDown,
            }
        };
        DeadlineBody {
            inner,
            cut: Box::pin(cut),
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        // Data already there is taken even past the deadline: only waiting is bounded.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.cut.as_mut().poll(cx) {
            Poll::Ready(cut) => Poll::Ready(Some(Err(Box::new(cut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{FromRequest, Request};

    /// A body that sends one chunk and then never ends.
    struct Stalled(Option<Bytes>);

    impl HttpBody for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    /// What the handlers' `Bytes` extractor makes of a body (it adds the size limit's
    /// wrapping).
    async fn extract(
        body: impl HttpBody<Data = Bytes, Error = axum::BoxError> + Send + 'static,
    ) -> Result<Bytes, axum::extract::rejection::BytesRejection> {
        Bytes::from_request(Request::new(Body::new(body)), &()).await
    }

    #[tokio::test]
    async fn a_stalled_body_is_rejected_with_the_timeout_under_axum_wrapping() {
        let (_stop_tx, stop) = watch::channel(false);
        let timeout = Duration::from_millis(50);
        let stalled = Stalled(Some(Bytes::from_static(b"{\"mo")));
        let rejection = extract(DeadlineBody::new(stalled, timeout, stop))
            .await
            .expect_err("the body never ends");
        assert_eq!(BodyCut::find(&rejection), Some(BodyCut::TimedOut(timeout)));
    }

    #[tokio::test]
    async fn shutdown_cuts_a_body_still_awaited_at_once() {
        let (stop_tx, stop) = watch::channel(false);
        let stalled = Stalled(Some(Bytes::from_static(b"{\"mo")));
        let read = tokio::spawn(extract(DeadlineBody::new(
            stalled,
            Duration::from_secs(3600),
            stop,
        )));
        stop_tx.send(true).expect("the body holds a receiver");
        let rejection = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("cut at once, not at the timeout")
            .expect("the read task")
            .expect_err("the body never ends");
        assert_eq!(BodyCut::find(&rejection), Some(BodyCut::ShuttingDown));
    }

    #[tokio::test]
    async fn a_complete_body_is_read_whole_and_other_errors_are_not_cuts() {
        let (_stop_tx, stop) = watch::channel(false);
        let json = "{\"model\": \"m\"}";
        let body = DeadlineBody::new(Body::from(json), Duration::from_millis(50), stop.clone());
        let bytes = extract(body).await.expect("a whole body");
        assert_eq!(&bytes[..], json.as_bytes());

        let big = DeadlineBody::new(
            Body::from(vec![b'a'; 3 << 20]),
            Duration::from_secs(5),
            stop,
        );
        let rejection = extract(big).await.expect_err("over the default limit");
        assert_eq!(BodyCut::find(&rejection), None);
    }
}
