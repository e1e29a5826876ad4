//! A small TCP forwarder owned by the test: listens on an address and pipes every connection
//! to a target. Used to expose a service bound to `127.0.0.1` (the test etcd) on another
//! address, e.g. the host's end of a [`Netns`](crate::netfault::Netns) link, so a node inside
//! the namespace can reach it. Dropping the [`Proxy`] stops it and closes every connection.

use std::net::SocketAddr;

use shutdown::Shutdown;
use tokio::net::{TcpListener, TcpStream};

/// A running forwarder. Stops on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    stop: Shutdown,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free port) and forwards every connection to `target`.
    ///
    /// # Errors
    /// When `listen` cannot be bound.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stop = Shutdown::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = stopped.wait() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = stopped.wait() => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, stop })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.fire();
    }
}

/// A one-shot broadcast "stop" built on a tokio watch channel.
mod shutdown {
    use tokio::sync::watch;

    #[derive(Debug, Clone)]
    pub struct Shutdown {
        tx: std::sync::Arc<watch::Sender<bool>>,
        rx: watch::Receiver<bool>,
    }

    impl Shutdown {
        pub fn new() -> Self {
            let (tx, rx) = watch::channel(false);
            Shutdown {
                tx: std::sync::Arc::new(tx),
                rx,
            }
        }

        pub fn fire(&self) {
            let _ = self.tx.send(true);
        }

        pub async fn wait(&self) {
            let mut rx = self.rx.clone();
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}
