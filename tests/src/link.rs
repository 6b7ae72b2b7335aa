//! A TCP link between one service and its NATS server that a test can cut and restore: the
//! network failing between the two while both keep running, which stopping the server
//! cannot show (every other client would lose it too).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Forwards every connection made to [`Link::url`] to the target while up; [`Link::cut`]
/// closes them all and, until [`Link::restore`], closes new ones at once.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    accept: AbortHandle,
}

#[derive(Default)]
struct Shared {
    cut: bool,
    forwards: Vec<AbortHandle>,
}

impl Link {
    /// A link to `target` (`host:port`) on a loopback port of its own.
    pub async fn start(target: &str) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let target = target.to_owned();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if state.lock().unwrap().cut {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                state.lock().unwrap().forwards.push(forward.abort_handle());
            }
        })
        .abort_handle();
        Link {
            addr,
            shared,
            accept,
        }
    }

    /// `nats://` URL of the link's end.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Closes every connection through the link, and each new one, until restored.
    pub fn cut(&self) {
        let mut shared = self.shared.lock().unwrap();
        shared.cut = true;
        for forward in shared.forwards.drain(..) {
            forward.abort();
        }
    }

    pub fn restore(&self) {
        self.shared.lock().unwrap().cut = false;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
