//! One SSH "session" channel: collects its requests (pty, env, window size) until it asks
//! for a shell, a command or the SFTP subsystem, then hands it to [`exec`] or
//! [`sftp`].
//!
//! The requests are answered (success/failure) by the connection's handler; this task only
//! acts on them, in order, as the channel delivers them.

use std::sync::Arc;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg};

use super::process::{dimension, Request, Terminal};
use super::{exec, sftp, Shared};

/// What a session channel asked to start.
enum Start {
    /// A shell or command.
    Process(Request),
    /// The SFTP subsystem.
    Sftp,
}

/// Serves one session channel until it closes or the connection ends.
pub async fn serve(mut channel: Channel<Msg>, handle: Handle, shared: Arc<Shared>) {
    let start = tokio::select! {
        start = requests(&mut channel) => start,
        () = shared.cancel.cancelled() => return,
    };
    match start {
        Some(Start::Process(request)) => exec::run(channel, handle, request, shared).await,
        Some(Start::Sftp) => sftp::serve(channel, &shared).await,
        None => {}
    }
}

/// Reads requests until a start request; `None` when the channel closes first.
async fn requests(channel: &mut Channel<Msg>) -> Option<Start> {
    let mut request = Request::default();
    loop {
        match channel.wait().await? {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            } => {
                request.terminal = Some(Terminal {
                    term,
                    cols: dimension(col_width, 80),
                    rows: dimension(row_height, 24),
                });
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Some(t) = request.terminal.as_mut() {
                    t.cols = dimension(col_width, t.cols);
                    t.rows = dimension(row_height, t.rows);
                }
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                // The handler already refused what `add_env` refuses.
                request.add_env(&variable_name, &variable_value);
            }
            ChannelMsg::RequestShell { .. } => return Some(Start::Process(request)),
            ChannelMsg::Exec { command, .. } => {
                request.command = Some(command);
                return Some(Start::Process(request));
            }
            ChannelMsg::RequestSubsystem { name, .. } if name == sftp::SUBSYSTEM => {
                return Some(Start::Sftp)
            }
            ChannelMsg::Close => return None,
            _ => {}
        }
    }
}
