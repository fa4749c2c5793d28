//! Shutting down without leaving an agent hanging: when the stop signal
//! comes, every held call is answered at once (its approval stays in the
//! store, for the restart or another replica), `/readyz` turns 503, and only
//! then does pingora stop its listeners and let passing calls finish.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::watch;

/// Whether the gateway is shutting down; cheap to clone into every call.
#[derive(Debug, Clone)]
pub struct Draining(watch::Receiver<bool>);

impl Draining {
    /// A flag and the switch that raises it.
    pub fn new() -> (DrainSwitch, Self) {
        let (tx, rx) = watch::channel(false);
        (DrainSwitch(tx), Self(rx))
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the gateway starts shutting down (never, if its switch
    /// is dropped without being raised).
    pub async fn started(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Raises the [`Draining`] flag.
#[derive(Debug)]
pub struct DrainSwitch(watch::Sender<bool>);

impl DrainSwitch {
    pub fn raise(&self) {
        self.0.send_replace(true);
    }
}

/// Wraps pingora's shutdown signal: the flag is raised before pingora is
/// told to stop, so held calls are answered while their connections are
/// still open.
pub(crate) struct DrainFirst<S> {
    pub(crate) signal: S,
    pub(crate) switch: DrainSwitch,
    /// The approval engine, drained for at most this long before pingora
    /// stops: approved calls in flight are forwarded and recorded, leases
    /// handed back.
    pub(crate) engine: Option<(
        std::sync::Arc<crate::approval::engine::Engine>,
        std::time::Duration,
    )>,
}

#[async_trait]
impl<S: ShutdownSignalWatch + Sync> ShutdownSignalWatch for DrainFirst<S> {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.signal.recv().await;
        tracing::info!("shutting down: answering held calls, then closing listeners");
        self.switch.raise();
        // Let the held calls' answers leave before the listeners go.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Some((engine, grace)) = &self.engine {
            engine.drain(*grace).await;
        }
        signal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_the_switch_is_raised() {
        let (switch, draining) = Draining::new();
        assert!(!draining.is_draining());
        let waiter = tokio::spawn({
            let draining = draining.clone();
            async move { draining.started().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        switch.raise();
        waiter.await.unwrap();
        assert!(draining.is_draining());
        // Late callers return at once.
        draining.started().await;
    }
}
