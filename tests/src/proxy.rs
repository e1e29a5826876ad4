//! A small TCP forwarder owned by the test: listens on an address and pipes every connection
//! to a target. It exposes a service bound to `127.0.0.1` (the test etcd) on another address,
//! e.g. the host's end of a [`Netns`](crate::netfault::Netns) link, and it can cut what goes
//! through it: [`Proxy::cut`] closes every connection and holds new ones open without
//! forwarding a byte (a black hole: the client's calls hang until its own deadlines), until
//! [`Proxy::heal`]. Dropping the [`Proxy`] stops it and closes every connection.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running forwarder. Stops on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    /// `Open`, `Cut`, or `Stopped`.
    state: watch::Sender<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Cut,
    Stopped,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free port) and forwards every connection to `target`.
    ///
    /// # Errors
    /// When `listen` cannot be bound.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (state, rx) = watch::channel(State::Open);
        tokio::spawn(async move {
            let mut stopped = rx.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.wait_for(|s| *s == State::Stopped) => return,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                tokio::spawn(pipe(inbound, target, rx.clone()));
            }
        });
        Ok(Proxy { addr, state })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection and black-holes new ones.
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Forwards new connections again.
    pub fn heal(&self) {
        self.state.send_replace(State::Open);
    }
}

/// Forwards one connection while the proxy is open; holds it silent while cut.
async fn pipe(mut inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<State>) {
    let now = *state.borrow_and_update();
    match now {
        State::Stopped => {}
        State::Cut => {
            // Accepted, never answered: the client learns nothing until it gives up. Closed
            // when the proxy heals or stops.
            let _ = state.wait_for(|s| *s != State::Cut).await;
        }
        State::Open => {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = state.wait_for(|s| *s != State::Open) => {}
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.send_replace(State::Stopped);
    }
}
