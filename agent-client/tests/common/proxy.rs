//! A TCP proxy in front of the relay's agent endpoint whose connections can be cut, to
//! break the agent's link without touching either side.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// A running proxy.
pub struct Proxy {
    /// Address agents connect to.
    pub addr: String,
    /// Cancelling it cuts every current connection.
    generation: Arc<Mutex<CancellationToken>>,
    /// Cancelling it makes every current connection go silent (no FIN, no RST).
    freezer: Arc<Mutex<CancellationToken>>,
    /// Stops the proxy.
    stop: CancellationToken,
}

impl Proxy {
    /// Starts a proxy to `target` on `rt`.
    pub fn start(rt: &Runtime, target: String) -> anyhow::Result<Self> {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?.to_string();
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let freezer = Arc::new(Mutex::new(CancellationToken::new()));
        let (gen2, stop2, freeze2) = (generation.clone(), stop.clone(), freezer.clone());
        rt.spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    () = stop2.cancelled() => return,
                };
                let cut = gen2.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let freeze = freeze2.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let (target, stop3) = (target.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                        () = freeze.cancelled() => {
                            // A silent link: nothing forwarded, nothing closed.
                            stop3.cancelled().await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            generation,
            freezer,
            stop,
        })
    }

    /// Stops forwarding on every connection open now without closing any (a link that
    /// dies silently); new connections still pass.
    pub fn freeze(&self) {
        let mut f = self.freezer.lock().unwrap_or_else(|p| p.into_inner());
        f.cancel();
        *f = CancellationToken::new();
    }

    /// Cuts every connection open now (new ones still pass).
    pub fn cut(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        g.cancel();
        *g = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
