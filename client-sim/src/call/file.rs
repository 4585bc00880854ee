//! The file part of a file session: what to send or where to save, the QUIC identity, and
//! the transfer over the selected path.

use super::*;

/// The file part of a file session.
pub(super) struct FileSide {
    /// Sender: the file; receiver: the directory to save into.
    pub(super) job: FileJob,
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) identity: TransferIdentity,
    pub(super) peer_fp: Option<Fingerprint>,
    pub(super) progress: bool,
    pub(super) result: Option<Result<TransferReport, String>>,
}

pub(super) enum FileJob {
    Send(PathBuf),
    Receive(PathBuf),
}

impl Leg {
    /// Starts the QUIC transfer of a file session over the selected path (virtual addresses:
    /// path changes and ICE restarts underneath are invisible to QUIC). Returns the pipe of
    /// datagrams QUIC wants sent and the task's handle.
    pub(super) fn start_transfer(&mut self) -> Result<(Pipe, TransferTask), CallError> {
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| CallError::Transfer("not a file session".into()))?;
        let peer_fp = f
            .peer_fp
            .ok_or_else(|| CallError::Transfer("no peer fingerprint".into()))?;
        let (role, local, peer) = match self.role {
            IceRole::Controlling => (
                TransferRole::Client,
                VIRTUAL_CLIENT_ADDR,
                VIRTUAL_SERVER_ADDR,
            ),
            IceRole::Controlled => (
                TransferRole::Server,
                VIRTUAL_SERVER_ADDR,
                VIRTUAL_CLIENT_ADDR,
            ),
        };
        let (path, handle) = DatagramPath::new(local, peer);
        self.quic_in = Some(handle.incoming.clone());
        let identity = f.identity.clone();
        let bar = ProgressBar::new(&f.name, !f.progress);
        let job = match &f.job {
            FileJob::Send(p) => FileJob::Send(p.clone()),
            FileJob::Receive(d) => FileJob::Receive(d.clone()),
        };
        let task = tokio::spawn(async move {
            let opts = EndpointOptions::default();
            let pc = crate::transfer::endpoint(path, &identity, peer_fp, role, &opts)
                .await
                .map_err(|e| format!("QUIC connection: {e}"))?;
            match job {
                FileJob::Send(p) => {
                    let r = crate::transfer::send_file(&pc.connection, &p, bar.callback()).await;
                    pc.close().await;
                    r.map_err(|e| e.to_string())
                }
                FileJob::Receive(dir) => {
                    let r =
                        crate::transfer::receive_file(&pc.connection, &dir, bar.callback()).await;
                    // The sender closes once it has our verdict; closing first could drop it.
                    if r.is_ok() {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), pc.connection.closed())
                                .await;
                    }
                    pc.close().await;
                    r.map_err(|e| e.to_string())
                }
            }
        });
        Ok((handle.outgoing.clone(), task))
    }
}
