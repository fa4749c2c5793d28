//! A TCP proxy the suite controls, in front of PostgreSQL: it forwards,
//! cuts every connection (reset), or black-holes (accepts and keeps the
//! sockets open, but moves no byte) until healed, which is what a failover
//! or a dead network path looks like to the gateways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    BlackHole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    /// Bumped by a cut: every connection of an older generation is reset.
    generation: u64,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(State {
            mode: Mode::Forward,
            generation: 0,
        });
        let state = Arc::new(state);
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = accept_state.subscribe();
                tokio::spawn(connection(client, target, rx));
            }
        });
        Self { addr, state, task }
    }

    /// Resets every open connection (new ones are forwarded as before).
    pub fn cut(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }

    /// Stops moving bytes, on open connections and new ones alike.
    pub fn black_hole(&self) {
        self.state.send_modify(|s| s.mode = Mode::BlackHole);
    }

    /// Forwards again; what was held back is delivered.
    pub fn heal(&self) {
        self.state.send_modify(|s| s.mode = Mode::Forward);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Every connection ends with the proxy.
        self.cut();
    }
}

/// Waits while the proxy black-holes; `false` when this connection's
/// generation was cut (or the proxy is gone).
async fn may_forward(rx: &mut watch::Receiver<State>, generation: u64) -> bool {
    loop {
        let state = *rx.borrow_and_update();
        if state.generation != generation {
            return false;
        }
        if state.mode == Mode::Forward {
            return true;
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

/// Closes with a reset (RST), not a FIN.
fn reset(stream: TcpStream) {
    // Linger 0 does not block on drop: the socket is reset at once.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// One proxied connection, both directions in one task: a cut resets both
/// sockets; black-holed, neither is read (the senders' windows fill up, as
/// on a dead path) nor written.
async fn connection(mut client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<State>) {
    let generation = rx.borrow().generation;
    if !may_forward(&mut rx, generation).await {
        reset(client);
        return;
    }
    let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target));
    let mut server = match connect.await {
        Ok(Ok(server)) => server,
        _ => {
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        if !may_forward(&mut rx, generation).await {
            break;
        }
        let (n, upward) = tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => (n, true),
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => (n, false),
            },
            // A change of mode or a cut while waiting for bytes: look again.
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        if !may_forward(&mut rx, generation).await {
            break;
        }
        let written = if upward {
            server.write_all(&up[..n]).await
        } else {
            client.write_all(&down[..n]).await
        };
        if written.is_err() {
            break;
        }
    }
    reset(client);
    reset(server);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        stream.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn forwards_black_holes_heals_and_cuts() {
        let proxy = TcpProxy::start(echo_server().await).await;
        let mut a = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(
            echo(&mut a, Duration::from_secs(2)).await.as_deref(),
            Some(&b"ping"[..])
        );

        proxy.black_hole();
        assert_eq!(echo(&mut a, Duration::from_millis(300)).await, None);
        let mut b = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(echo(&mut b, Duration::from_millis(300)).await, None);
        proxy.heal();
        // What was held back arrives: the ping of `a` sent meanwhile, and b's.
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), a.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping");
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), b.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();

        proxy.cut();
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(
            echo(&mut c, Duration::from_secs(2)).await.as_deref(),
            Some(&b"ping"[..])
        );
    }
}
