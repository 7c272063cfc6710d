//! Creating the control socket safely, and removing it at exit.
//!
//! Something already at the path is handled by what it is: a socket of this user that
//! nobody listens on is stale and replaced; a socket someone listens on (another agent), a
//! socket of another user, or anything that is not a socket (a symbolic link, a file) stops
//! the start and is left alone. The new socket is bound inside a fresh private directory
//! (mode 0700), set to mode 0600 there, and renamed into place, so no other user can connect
//! in between; the server also checks each peer's user id. At exit the file is removed only
//! if it is still the one this agent created.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The agent's bound control socket; the file is removed on drop if it is still ours.
#[derive(Debug)]
pub struct LocalSocket {
    path: PathBuf,
    /// Device and inode of the file we created.
    id: (u64, u64),
}

impl LocalSocket {
    /// Binds the control socket at `path` (see the module documentation). Returns the
    /// guard and the listener (blocking mode; the server makes it non-blocking).
    pub fn bind(path: &Path) -> Result<(Self, UnixListener), String> {
        let shown = path.display();
        clear_stale(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let private = parent.join(format!(".porthole-agent-{:016x}", rand::random::<u64>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| format!("cannot create the control socket {shown}: {e}"))?;
        let staged = private.join("s");
        let bound = UnixListener::bind(&staged).and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            Ok(listener)
        });
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&private);
        let listener = bound.map_err(|e| {
            format!("cannot create the control socket {shown}: {e} (pass another --pid-file)")
        })?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot inspect the control socket {shown}: {e}"))?;
        Ok((
            Self {
                path: path.to_owned(),
                id: (meta.dev(), meta.ino()),
            },
            listener,
        ))
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
            }
        }
    }
}

/// Removes a stale socket of this user at `path`; refuses anything else that is there.
fn clear_stale(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{shown} exists and is not a socket: refusing to replace it (remove it yourself, \
             or pass another --pid-file)"
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "control socket {shown} belongs to another user (uid {}): refusing to replace it \
             (pass another --pid-file)",
            meta.uid()
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "another porthole-agent listens on {shown}: stop it, or pass --pid-file to run a \
             second agent"
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(path = %shown, "replacing a stale control socket");
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale control socket {shown}: {e}"))
        }
        Err(e) => Err(format!("cannot check control socket {shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn bound_0600_and_removed_only_while_ours() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid.sock");
        let (socket, listener) = LocalSocket::bind(&path)?;
        assert_eq!(socket.path(), path);
        let meta = std::fs::symlink_metadata(&path)?;
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing else is left in the directory (the private staging directory is gone).
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        // A live socket stops a second agent.
        let err = LocalSocket::bind(&path).err().unwrap_or_default();
        assert!(err.contains("another porthole-agent listens"), "{err}");
        drop(listener);
        drop(socket);
        assert!(!path.exists());

        // Replaced by someone else meanwhile: theirs stays.
        let (socket, listener) = LocalSocket::bind(&path)?;
        drop(listener);
        std::fs::remove_file(&path)?;
        let other = UnixListener::bind(&path)?;
        drop(socket);
        assert!(path.exists());
        drop(other);
        Ok(())
    }

    #[test]
    fn a_stale_socket_is_replaced() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid.sock");
        // Bound and closed: the file stays, nobody listens.
        drop(UnixListener::bind(&path)?);
        assert!(path.exists());
        let (_socket, _listener) = LocalSocket::bind(&path)?;
        assert!(UnixStream::connect(&path).is_ok());
        Ok(())
    }

    #[test]
    fn files_links_and_directories_are_left_alone() -> TestResult {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("file.sock");
        std::fs::write(&file, "precious\n")?;
        let err = LocalSocket::bind(&file).err().unwrap_or_default();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file)?, "precious\n");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link)?;
        let err = LocalSocket::bind(&link).err().unwrap_or_default();
        assert!(err.contains("is not a socket"), "{err}");
        assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());

        let sub = dir.path().join("sub.sock");
        std::fs::create_dir(&sub)?;
        let err = LocalSocket::bind(&sub).err().unwrap_or_default();
        assert!(err.contains("is not a socket"), "{err}");
        Ok(())
    }
}
