//! `ssh -L`: a "direct-tcpip" channel to a service on the build machine.

use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use super::Shared;

/// Deadline for reaching the forwarding target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `host:port`, then accepts the channel and copies both ways until either side
/// ends or the connection does; refuses the channel when the target cannot be reached.
pub async fn serve(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u32,
    shared: Arc<Shared>,
) {
    let Ok(port) = u16::try_from(port) else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)));
    let mut target = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(%host, port, error = %e, "ssh -L: cannot reach the target");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            tracing::info!(%host, port, "ssh -L: connecting to the target timed out");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    reply.accept().await;
    let mut stream = channel.into_stream();
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut stream, &mut target) => {
            if let Err(e) = r {
                tracing::debug!(%host, port, error = %e, "ssh -L: forwarding ended");
            }
        }
        () = shared.cancel.cancelled() => {}
    }
}
