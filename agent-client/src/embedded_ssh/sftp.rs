//! The SFTP subsystem (what `sftp` and OpenSSH's `scp` use) on the build machine's file
//! system, as the agent's user. Relative paths start at the working directory.
//!
//! `russh-sftp` speaks the protocol; this file maps its requests onto `std::fs` (on the
//! blocking pool, as `tokio::fs` does).

use std::collections::HashMap;
use std::fs::{File as FsFile, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::io::AsyncWriteExt;

use super::Shared;

/// The subsystem name clients ask for.
pub const SUBSYSTEM: &str = "sftp";
/// Open files and directories per SFTP session.
const MAX_HANDLES: usize = 256;
/// Most bytes one read returns: OpenSSH's `sftp-server` limit, so the answer fits in the
/// 256 KiB messages OpenSSH clients accept.
const MAX_READ: u32 = 256 * 1024 - 1024;
/// Bytes buffered between the channel and the protocol task.
const PIPE_BUFFER: usize = 8 * 1024 * 1024;
/// Directory entries per `readdir` answer.
const READDIR_BATCH: usize = 128;

/// Serves SFTP on `channel` until the client ends it, then reports exit status 0 as
/// OpenSSH's `sftp-server` does (`scp` treats a missing status as a failure).
///
/// `russh-sftp` runs on one end of an in-memory pipe and this task copies between the pipe
/// and the channel, so it sees the end of the subsystem and can report its status before
/// closing the channel.
pub async fn serve(channel: Channel<Msg>, shared: &Shared) {
    let handler = Sftp {
        root: shared.settings.workdir.clone(),
        handles: HashMap::new(),
        next_handle: 0,
    };
    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
    // Like exec's input queue: the channel must keep being read (see exec::write_input), so
    // the pipe holds more than the requests an OpenSSH client keeps in flight.
    // Runs on its own task and ends at end of input.
    russh_sftp::server::run(theirs, handler).await;
    let (mut rx, tx) = channel.split();
    let (mut from_sftp, mut to_sftp) = tokio::io::split(ours);
    let mut to_client = tx.make_writer();
    let outbound = async {
        let _ = tokio::io::copy(&mut from_sftp, &mut to_client).await;
        let _ = to_client.flush().await;
    };
    let inbound = async {
        while let Some(msg) = rx.wait().await {
            let stop = match msg {
                ChannelMsg::Data { data } => to_sftp.write_all(&data).await.is_err(),
                ChannelMsg::Eof | ChannelMsg::Close => true,
                _ => false,
            };
            if stop {
                break;
            }
        }
        let _ = to_sftp.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(outbound, inbound) } => {
            let _ = tx.exit_status(0).await;
            let _ = tx.eof().await;
        }
        () = shared.cancel.cancelled() => {}
    }
    let _ = tx.close().await;
}

enum Open {
    File(Arc<FsFile>),
    /// Read a batch at a time (a directory may be huge); `None` while a batch is read.
    Dir(Option<std::fs::ReadDir>),
}

struct Sftp {
    root: PathBuf,
    handles: HashMap<String, Open>,
    next_handle: u64,
}

type Reply<T> = Result<T, StatusReply>;

fn io_error(e: std::io::Error) -> StatusReply {
    tracing::debug!(error = %e, "sftp: request failed");
    let code = match e.kind() {
        ErrorKind::NotFound => StatusCode::NoSuchFile,
        ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        ErrorKind::UnexpectedEof => StatusCode::Eof,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Reply<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(io_error),
        Err(e) => Err(StatusCode::Failure.with_message(e.to_string())),
    }
}

/// The attributes `stat` (run on the blocking pool) finds, as an answer to request `id`.
async fn attrs(
    id: u32,
    stat: impl FnOnce() -> std::io::Result<std::fs::Metadata> + Send + 'static,
) -> Reply<Attrs> {
    let meta = blocking(stat).await?;
    Ok(Attrs {
        id,
        attrs: FileAttributes::from(&meta),
    })
}

/// `path` made absolute against `root`. `..` is left to the kernel, which resolves it after
/// following links (there is no sandbox to keep: the user has a shell).
fn resolve(root: &Path, path: &str) -> PathBuf {
    if path.is_empty() {
        root.to_path_buf()
    } else {
        root.join(path)
    }
}

fn apply_attrs(path: &Path, attrs: &FileAttributes) -> std::io::Result<()> {
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    set_times(&FsFile::open(path)?, attrs)
}

fn apply_file_attrs(file: &FsFile, attrs: &FileAttributes) -> std::io::Result<()> {
    if let Some(mode) = attrs.permissions {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(size) = attrs.size {
        file.set_len(size)?;
    }
    set_times(file, attrs)
}

fn set_times(file: &FsFile, attrs: &FileAttributes) -> std::io::Result<()> {
    let time = |secs: u32| UNIX_EPOCH + Duration::from_secs(u64::from(secs));
    let mut times = std::fs::FileTimes::new();
    let mut any = false;
    if let Some(a) = attrs.atime {
        times = times.set_accessed(time(a));
        any = true;
    }
    if let Some(m) = attrs.mtime {
        times = times.set_modified(time(m));
        any = true;
    }
    if any {
        file.set_times(times)?;
    }
    Ok(())
}

impl Sftp {
    fn path(&self, path: &str) -> PathBuf {
        resolve(&self.root, path)
    }

    fn insert(&mut self, open: Open) -> Reply<String> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure
                .with_message(format!("too many open handles (at most {MAX_HANDLES})")));
        }
        self.next_handle += 1;
        let name = format!("h{}", self.next_handle);
        self.handles.insert(name.clone(), open);
        Ok(name)
    }

    fn file(&self, handle: &str) -> Reply<Arc<FsFile>> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f.clone()),
            _ => Err(StatusCode::Failure.with_message("no such file handle")),
        }
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        let mut options: OpenOptions = pflags.into();
        if let Some(mode) = attrs.permissions {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode & 0o7777);
        }
        let file = blocking(move || options.open(path)).await?;
        let handle = self.insert(Open::File(Arc::new(file)))?;
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let len = len.min(MAX_READ) as usize;
        let data = blocking(move || {
            let mut buf = vec![0u8; len];
            let mut filled = 0;
            while filled < len {
                match file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        })
        .await?;
        if data.is_empty() && len > 0 {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || file.write_all_at(&data, offset)).await?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let path = self.path(&path);
        attrs(id, move || std::fs::symlink_metadata(path)).await
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let path = self.path(&path);
        attrs(id, move || std::fs::metadata(path)).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let file = self.file(&handle)?;
        attrs(id, move || file.metadata()).await
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || apply_attrs(&path, &attrs)).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || apply_file_attrs(&file, &attrs)).await?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let path = self.path(&path);
        let entries = blocking(move || std::fs::read_dir(&path)).await?;
        let handle = self.insert(Open::Dir(Some(entries)))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir(slot)) = self.handles.get_mut(&handle) else {
            return Err(StatusCode::Failure.with_message("no such directory handle"));
        };
        let Some(mut entries) = slot.take() else {
            return Err(StatusCode::Failure.with_message("directory handle busy"));
        };
        let (entries, files) = blocking(move || {
            let mut files = Vec::new();
            for entry in entries.by_ref() {
                // A failing entry ends this batch (the listing stays usable); alone, it is
                // the answer.
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if files.is_empty() => return Ok((entries, Err(e))),
                    Err(_) => break,
                };
                // Gone since it was listed: skip it.
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                let name = entry.file_name().to_string_lossy().into_owned();
                files.push(File::new(name, FileAttributes::from(&meta)));
                if files.len() >= READDIR_BATCH {
                    break;
                }
            }
            Ok((entries, Ok(files)))
        })
        .await?;
        if let Some(Open::Dir(slot)) = self.handles.get_mut(&handle) {
            *slot = Some(entries);
        }
        let files = files.map_err(io_error)?;
        if files.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let path = self.path(&filename);
        blocking(move || std::fs::remove_file(path)).await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || {
            let mut builder = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(
                &mut builder,
                attrs.permissions.unwrap_or(0o777) & 0o7777,
            );
            builder.create(path)
        })
        .await?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || std::fs::remove_dir(path)).await?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = self.path(&path);
        // Canonical when it exists; else its canonical directory and name (a file about to
        // be uploaded).
        let real = blocking(move || {
            Ok(std::fs::canonicalize(&path).unwrap_or_else(|_| {
                match (path.parent().map(std::fs::canonicalize), path.file_name()) {
                    (Some(Ok(dir)), Some(name)) => dir.join(name),
                    _ => path,
                }
            }))
        })
        .await?;
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let (from, to) = (self.path(&oldpath), self.path(&newpath));
        blocking(move || {
            // SFTP v3: renaming onto an existing file fails.
            if to.symlink_metadata().is_ok() {
                return Err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists", to.display()),
                ));
            }
            std::fs::rename(from, to)
        })
        .await?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = self.path(&path);
        let target = blocking(move || std::fs::read_link(path)).await?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        // OpenSSH sends the two paths of SSH_FXP_SYMLINK in reverse order (its PROTOCOL
        // file, "sftp: Reversal of arguments to SSH_FXP_SYMLINK"): the first is the existing
        // target, the second the link to create. OpenSSH is the client this serves.
        let target = PathBuf::from(&linkpath);
        let link = self.path(&targetpath);
        blocking(move || std::os::unix::fs::symlink(target, link)).await?;
        Ok(ok(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_the_working_directory() {
        let root = Path::new("/work/build");
        assert_eq!(resolve(root, ""), PathBuf::from("/work/build"));
        assert_eq!(resolve(root, "."), PathBuf::from("/work/build/."));
        assert_eq!(
            resolve(root, "out/a.txt"),
            PathBuf::from("/work/build/out/a.txt")
        );
        assert_eq!(resolve(root, "../x"), PathBuf::from("/work/build/../x"));
        assert_eq!(resolve(root, "/etc/hosts"), PathBuf::from("/etc/hosts"));
    }
}
