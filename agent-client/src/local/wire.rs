//! The messages of the control socket: one JSON object per line.

use serde::{Deserialize, Serialize};

use crate::status::Status;

/// Longest request line the agent reads.
pub const MAX_REQUEST: usize = 4096;
/// Longest answer line a client reads.
pub const MAX_REPLY: usize = 1 << 20;

/// Client → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Answer the status once.
    Status,
    /// The build finished: tell the relay (the grace period starts).
    Finish {
        /// Opt-in early end: if no visitor connected during the session and none connects
        /// within this many milliseconds, end the session (`end`).
        #[serde(default)]
        wait_if_nobody_connected_ms: Option<u64>,
    },
    /// Stream the status at once and at every change, until the session ended.
    Wait,
}

/// Agent → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The agent's status (the answer to `status`; each line of `wait`).
    Status {
        /// The status.
        status: Status,
    },
    /// `finish` was taken; `status` is the status after the relay took it (or after a
    /// few seconds, when the link is down: it is sent once the link is back).
    Finished {
        /// The status then.
        status: Status,
    },
    /// Something the agent decided (in `wait`).
    Notice {
        /// One sentence.
        message: String,
    },
    /// The request was refused.
    Error {
        /// Why.
        message: String,
    },
}

/// `value` as one line of JSON with its newline.
pub fn line<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(mut text) => {
            text.push('\n');
            text
        }
        // Our own types always serialize; never send a broken line.
        Err(e) => format!(
            "{{\"type\":\"error\",\"message\":\"cannot encode the answer: {}\"}}\n",
            e.to_string().replace(['"', '\\'], "'")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let finish: Request =
            serde_json::from_str(r#"{"op":"finish","wait_if_nobody_connected_ms":2000}"#)
                .unwrap_or(Request::Wait);
        assert_eq!(
            finish,
            Request::Finish {
                wait_if_nobody_connected_ms: Some(2000)
            }
        );
        let plain: Request = serde_json::from_str(r#"{"op":"finish"}"#).unwrap_or(Request::Wait);
        assert_eq!(
            plain,
            Request::Finish {
                wait_if_nobody_connected_ms: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let text = line(&Reply::Notice {
            message: "hi".into(),
        });
        assert_eq!(text, "{\"type\":\"notice\",\"message\":\"hi\"}\n");
    }
}
