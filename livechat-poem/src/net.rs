//! [`NoDelay`]: serve with `TCP_NODELAY` (issue #5, delivery latency).
//!
//! Chat frames are small. With Nagle's algorithm on, the kernel holds a
//! small write back while an earlier segment is unacknowledged, and the
//! peer's delayed ACK can add up to 40 ms to a delivery. Poem's
//! `TcpAcceptor` leaves Nagle on; hosts serving the WebSocket gateway
//! should wrap their acceptor in [`NoDelay`].

use std::io::Result as IoResult;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};

/// An acceptor that turns on `TCP_NODELAY` for every accepted TCP
/// connection of the wrapped acceptor (e.g. poem's `TcpAcceptor`).
///
/// ```no_run
/// # async fn serve(app: poem::Route) -> std::io::Result<()> {
/// use poem::listener::{Listener, TcpListener};
/// let acceptor = TcpListener::bind("127.0.0.1:8080").into_acceptor().await?;
/// poem::Server::new_with_acceptor(livechat_poem::NoDelay(acceptor))
///     .run(app)
///     .await
/// # }
/// ```
#[derive(Debug)]
pub struct NoDelay<A>(pub A);

impl<A> Acceptor for NoDelay<A>
where
    A: Acceptor<Io = tokio::net::TcpStream>,
{
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(&mut self) -> IoResult<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        // Failing to set it only costs latency; keep the connection.
        if let Err(error) = io.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY could not be set");
        }
        Ok((io, local, remote, scheme))
    }
}
