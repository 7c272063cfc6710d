//! `ssh -L`: a "direct-tcpip" channel to a service on the build machine.

use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Shared;

/// Channel data messages (at most 32 KiB each) queued for a slow target: 8 MiB.
const QUEUE: usize = 256;
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
    let target = match connect.await {
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
    let (mut rx, tx) = channel.split();
    let (mut from_target, mut to_target) = target.into_split();
    // Channel data is queued for the target on its own task, so the channel keeps being read
    // (see exec::write_input for why that matters with russh).
    let (queue_tx, mut queue_rx) = mpsc::channel::<bytes::Bytes>(QUEUE);
    // Ends when the client closes the channel (or the connection goes); its EOF only ends
    // the data towards the target.
    let inbound = async move {
        let mut queue_tx = Some(queue_tx);
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(queue) = &queue_tx {
                        if queue.send(data).await.is_err() {
                            queue_tx = None;
                        }
                    }
                }
                ChannelMsg::Eof => queue_tx = None,
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    let write_target = async move {
        while let Some(data) = queue_rx.recv().await {
            if to_target.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to_target.shutdown().await;
    };
    let outbound = async {
        let mut writer = tx.make_writer();
        if let Err(e) = tokio::io::copy(&mut from_target, &mut writer).await {
            tracing::debug!(%host, port, error = %e, "ssh -L: forwarding ended");
        }
        let _ = tx.eof().await;
    };
    tokio::select! {
        _ = async { tokio::join!(write_target, outbound) } => {}
        () = inbound => {}
        () = shared.cancel.cancelled() => {}
    }
    let _ = tx.close().await;
}
