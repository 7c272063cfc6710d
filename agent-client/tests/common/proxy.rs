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
        let (gen2, stop2) = (generation.clone(), stop.clone());
        rt.spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    () = stop2.cancelled() => return,
                };
                let cut = gen2.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            generation,
            stop,
        })
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
