pub mod bench;
pub mod certs;
pub mod coordinator;
pub mod ctl;
pub mod device;
pub mod expert_node;
pub mod generate;
pub mod link;
pub mod serve_args;
pub mod synth;
pub mod up;
pub mod verify;

/// Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send). The handlers are
/// installed when this is called, not when the future is first polled: call it before
/// announcing readiness, so a signal sent right after the announcement is not lost to the
/// default action (exit by signal).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {},
                _ = wait(terminate) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// This machine's name, for default node and coordinator ids.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
