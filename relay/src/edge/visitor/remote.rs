//! Visitors served across the nodes of a cluster, with one relay hop: a visitor arrives
//! at a node that does not hold the session's agent link; that node asks the owner over the
//! peer link ([`crate::cluster::Peers::open`]), the owner sends the agent `open_at` naming
//! the visitor's node, and the agent attaches its data connection there. The visitor's
//! bytes cross exactly one relay (its own node), as on a single node.
//!
//! - [`Relay::open_for_peer`]: the owner's side.
//! - [`serve`]: the visitor's node's side, after the visitor was admitted.

use porthole_protocol::{DataPlane, Message, Secret};

use super::forward::{forward_visitor, Paired, Visit};
use super::guards::VisitorRefusal;
use crate::cluster::RemoteOpen;
use crate::session::runtime::VisitorGuard;
use crate::shared::Relay;

impl Relay {
    /// The owner's side of a cross-node visitor: tells the agent to attach the visitor's
    /// data connection to the node in `open.attach`. The error says why not (for the asking
    /// node's log).
    pub fn open_for_peer(&self, open: RemoteOpen) -> Result<(), String> {
        let session = self
            .sessions
            .get(&open.session_id)
            .ok_or("no such session on this node")?;
        if !session.services().contains(&open.service) {
            return Err(format!("the session has no {} service", open.service));
        }
        if self.config.data_plane != DataPlane::Tls {
            return Err("visitors on other nodes need the tls data plane".into());
        }
        let link = {
            let inner = session.lock();
            inner
                .link
                .clone()
                .filter(|_| inner.life.accepts_visitors())
                .ok_or("this node does not hold the agent's link")?
        };
        if !link.attach_elsewhere {
            return Err("the session's agent is too old to attach to another node".into());
        }
        link.tx
            .try_send(Message::OpenAt {
                conn_id: open.conn_id,
                service: open.service,
                secret: open.secret,
                relay: open.attach,
            })
            .map_err(|_| "the agent's control queue is full".to_owned())
    }
}

/// Serves a visitor admitted on this node whose session's agent link `owner` holds.
pub(super) async fn serve(
    visit: &Visit<'_>,
    owner: &str,
    counted: VisitorGuard,
    stream: tokio::net::TcpStream,
    early: &[u8],
) {
    let relay = visit.relay;
    let session = visit.session;
    let Some(cluster) = relay.cluster.as_ref() else {
        return visit.refuse(VisitorRefusal::AgentNotConnected);
    };
    let Some(peers) = cluster.peers.get().cloned() else {
        return visit.refuse(VisitorRefusal::AgentNotConnected);
    };
    let secret = Secret::generate("phc_");
    let (conn_id, rx) = session.register_remote_open(&secret);
    let open = RemoteOpen {
        session_id: session.id.clone(),
        service: visit.service,
        conn_id,
        secret,
        attach: cluster.advertise_agent.clone(),
    };
    let deadline = tokio::time::Instant::now() + relay.config.open_timeout;
    let asked = tokio::time::timeout_at(deadline, peers.open(owner, open)).await;
    if let Err(why) = asked.unwrap_or_else(|_| Err("no answer in time".into())) {
        session.cancel_open(conn_id);
        tracing::info!(session_id = %session.id, owner, reason = %why, "the owning node could not open a visitor");
        return visit.refuse(VisitorRefusal::AgentFailed);
    }
    counted.announce();
    let data = tokio::select! {
        got = tokio::time::timeout_at(deadline, rx) => match got {
            Ok(Ok(data)) => data,
            Ok(Err(_)) => return visit.refuse(VisitorRefusal::AgentFailed),
            Err(_) => {
                session.cancel_open(conn_id);
                return visit.refuse(VisitorRefusal::AgentFailed);
            }
        },
        () = session.cancel.cancelled() => return,
    };
    relay.metrics.pairings.with_label_values(&["remote"]).inc();
    let paired = Paired {
        stream,
        data,
        conn_id,
        counted,
    };
    forward_visitor(visit, &session.cancel, paired, early).await;
}
