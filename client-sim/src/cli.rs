//! The `peerlink-sim` command line (clap derive) and its commands. Credentials are cached in a
//! small JSON state file (`--state`, mode 0600): server URL, username, device, tokens and the
//! last message seq this device processed (for `inbox` resume).
//!
//! `send-file` runs a file session (QUIC over the session's ICE path); `listen --save-dir`
//! accepts them, `listen --sessions N` answers N sessions (calls or files) one after another.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use peerlink_api::signaling::{ClientMsg, ServerMsg};
use peerlink_api::signaling_client::{HttpApi, SignalError, SignalSession, Tokens, parse_turn_uri};
use peerlink_api::tls::Trust;
use peerlink_sim::call::{self, CallOptions};
use peerlink_sim::demo::{self, DemoOptions};
use peerlink_sim::fleet::{Fleet, FleetOptions};
use peerlink_sim::turn::TurnConfig;
use serde::{Deserialize, Serialize};

/// peerlink reference client.
#[derive(Parser, Debug)]
#[command(name = "peerlink-sim", version, about = "peerlink reference client")]
pub struct Cli {
    /// Signaling server URL: http://host:port, or https://host:port for a server with TLS
    /// (WebSocket over wss://); several nodes of one fleet comma-separated, tried in order
    /// when one cannot be reached, also when a session reconnects [default: from the state
    /// file, else http://127.0.0.1:8443].
    #[arg(long, global = true, env = "PEERLINK_SERVER")]
    pub server: Option<String>,
    /// CA certificate file (PEM, one or more certificates) trusted for an https:// server and
    /// for relays reached over TLS (`turns:`), besides the system's roots, e.g. a private fleet
    /// CA (repeatable).
    #[arg(long = "ca", global = true, env = "PEERLINK_CA", value_name = "PEM")]
    pub ca: Vec<PathBuf>,
    /// State file caching credentials [default: $HOME/.peerlink-sim.json].
    #[arg(long, global = true, env = "PEERLINK_SIM_STATE")]
    pub state: Option<PathBuf>,
    /// Device id of this client.
    #[arg(long, global = true, default_value = "sim")]
    pub device: String,
    /// Print the result as one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
    /// Logging, on stderr [default filter: $PEERLINK_LOG, else warn].
    #[command(flatten)]
    pub log: peerlink_cli::log::LogArgs,
    /// Command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create an account.
    Register {
        /// Username.
        user: String,
        /// Password (8-256 bytes).
        #[arg(long, env = "PEERLINK_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Log in and cache the tokens in the state file.
    Login {
        /// Username.
        user: String,
        /// Password.
        #[arg(long, env = "PEERLINK_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Send a text message (waits for the server's durable ack).
    Chat {
        /// Recipient.
        user: String,
        /// Text.
        text: String,
    },
    /// Fetch messages pending for this device (resuming after the last one processed),
    /// acknowledge them and print them.
    Inbox {
        /// How long to wait for messages after connecting.
        #[arg(long, default_value = "1s", value_parser = peerlink_cli::parse_duration)]
        wait: Duration,
    },
    /// Call USER over a real UDP socket: ICE via the connectivity agent, Opus media on the
    /// selected path (direct or relay), record what is heard, print the call report.
    Call {
        /// Callee.
        user: String,
        /// WAV to send (48 kHz mono 16-bit) [default: speech-like generator].
        #[arg(long)]
        audio: Option<PathBuf>,
        /// Record what is heard to this WAV.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Media duration once connected.
        #[arg(long, default_value = "10s", value_parser = peerlink_cli::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Send a file to USER in a file session: QUIC (pinned per-session certificates, BLAKE3
    /// verified, resumable) over the session's selected path, direct or relay; progress bar on
    /// stderr unless --json; prints the transfer report.
    SendFile {
        /// Receiver (must run `listen --save-dir DIR`).
        user: String,
        /// The file to send.
        path: PathBuf,
        /// Bound on the transfer once connected.
        #[arg(long, default_value = "600s", value_parser = peerlink_cli::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Wait for sessions and answer them automatically: calls (record what is heard until the
    /// caller hangs up) and, with --save-dir, file sessions; print one report per session
    /// (one JSON line each with --json, with "kind": "call" | "file" | "declined" | "error").
    Listen {
        /// Record what is heard to this WAV.
        #[arg(long)]
        record: Option<PathBuf>,
        /// WAV to send back [default: speech-like generator].
        #[arg(long)]
        audio: Option<PathBuf>,
        /// How long to wait for a call.
        #[arg(long, default_value = "120s", value_parser = peerlink_cli::parse_duration)]
        wait: Duration,
        /// Longest call accepted before hanging up.
        #[arg(long, default_value = "600s", value_parser = peerlink_cli::parse_duration)]
        max_duration: Duration,
        /// Accept file sessions and save the files here (declined without it).
        #[arg(long)]
        save_dir: Option<PathBuf>,
        /// Sessions to handle one after another before exiting (each waits up to --wait).
        #[arg(long, default_value_t = 1)]
        sessions: u32,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Add a contact and print the contact list with presence.
    Contacts {
        /// Add this user first.
        #[arg(long)]
        add: Option<String>,
    },
    /// Get TURN credentials and make a real allocation on the first relay, then release it.
    TurnCheck,
    /// Classify the NAT in front of this host (RFC 5780: mapping, filtering, port allocation,
    /// hairpinning) against a STUN server with an alternate address on a second IP, such as
    /// signaling run with `--stun IP1:PORT --stun-alt IP2:PORT`.
    NatCheck {
        /// The STUN server's primary address.
        #[arg(long)]
        stun: SocketAddr,
        /// How long one test waits for its answer (800ms, 2s, ...).
        #[arg(long, default_value = "800ms", value_parser = peerlink_cli::parse_duration)]
        wait: Duration,
        /// Bound on the whole check.
        #[arg(long, default_value = "10s", value_parser = peerlink_cli::parse_duration)]
        timeout: Duration,
    },
    /// Start a local fleet (directory, relay, signaling) on loopback and keep it running
    /// until SIGINT (Ctrl-C) or SIGTERM, which stop every service it started.
    Fleet,
    /// Start a local fleet (or use --server), register two users and exercise presence,
    /// chat, offline delivery, a call, TURN and media through the relay; print the report.
    Demo {
        /// Seconds of media in the call and through the relay (0 = neither).
        #[arg(long, default_value_t = 4.0)]
        media_seconds: f64,
        /// WAV (48 kHz mono 16-bit) alice sends [default: speech-like generator].
        #[arg(long)]
        audio: Option<PathBuf>,
        /// Directory for the recorded WAVs.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Relay metrics address for /stats when using --server.
        #[arg(long)]
        relay_metrics: Option<SocketAddr>,
        /// TURN relay (host:port) of the fixed-relay media exchange [default: the first one
        /// signaling offers]; it must accept signaling's TURN credentials.
        #[arg(long)]
        relay: Option<SocketAddr>,
        /// Signaling's STUN address when using --server.
        #[arg(long)]
        stun: Option<SocketAddr>,
    },
}

/// Network settings of a call.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Host address the call's UDP socket binds on; give it twice (an IPv4 and an IPv6
    /// address) to choose the IPv6 socket's address too [default: 127.0.0.1; the IPv6 socket
    /// beside an IPv4 one binds on the source address towards the IPv6 --stun].
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: Vec<std::net::IpAddr>,
    /// Signaling's STUN responder (for the server-reflexive candidate); repeat it for its
    /// other family (signaling prints both on its `stun=` line): one per family.
    #[arg(long)]
    pub stun: Vec<SocketAddr>,
    /// Do not ask for TURN credentials (no relayed candidate).
    #[arg(long, conflicts_with = "relay_only")]
    pub no_turn: bool,
    /// Signal only relayed candidates: host addresses stay private, media goes via the relay.
    #[arg(long)]
    pub relay_only: bool,
}

impl NetArgs {
    fn options(&self, trust: &Trust) -> CallOptions {
        CallOptions {
            bind_ip: self.bind_ip(),
            bind6: self.bind6(),
            stun: self.stun4(),
            stun6: self.stun6(),
            use_turn: !self.no_turn,
            relay_only: self.relay_only,
            turn_trust: Some(trust.clone()),
            ..CallOptions::default()
        }
    }
}

impl NetArgs {
    /// The primary socket's address: the first `--bind`.
    fn bind_ip(&self) -> std::net::IpAddr {
        self.bind
            .first()
            .copied()
            .unwrap_or(CallOptions::default().bind_ip)
    }

    /// An IPv6 `--bind` beside an IPv4 primary one.
    fn bind6(&self) -> Option<std::net::IpAddr> {
        let primary = self.bind_ip();
        self.bind
            .iter()
            .copied()
            .find(|a| a.is_ipv6() && primary.is_ipv4())
    }

    /// The `--stun` of the primary socket's family (else the first).
    fn stun4(&self) -> Option<SocketAddr> {
        let primary = self.bind_ip();
        self.stun
            .iter()
            .find(|s| s.is_ipv4() == primary.is_ipv4())
            .or(self.stun.first())
            .copied()
    }

    /// An IPv6 `--stun` beside it.
    fn stun6(&self) -> Option<SocketAddr> {
        let first = self.stun4();
        self.stun
            .iter()
            .copied()
            .find(|s| s.is_ipv6() && Some(*s) != first)
    }
}

/// The cached client state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Server URL the tokens belong to.
    pub server: Option<String>,
    /// Tokens of the logged-in user.
    pub tokens: Option<Tokens>,
    /// Last message seq processed, per device.
    #[serde(default)]
    pub last_seq: std::collections::BTreeMap<String, u64>,
    /// NAT classifications per network (STUN server and the local address towards it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<NatCacheEntry>,
}

/// One network's NAT classification, cached for [`NAT_CACHE_TTL`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatCacheEntry {
    /// The STUN server asked.
    pub stun: SocketAddr,
    /// This host's address towards it (another network, another entry).
    pub local_ip: std::net::IpAddr,
    /// When it was found, Unix seconds.
    pub at: u64,
    /// The classification; none when the check could not tell (e.g. a server without an
    /// alternate address), which is cached too.
    pub class: Option<peerlink_api::signaling::NatClass>,
}

/// How long a network's NAT classification is reused.
pub const NAT_CACHE_TTL: Duration = Duration::from_secs(600);
/// Networks remembered in the state file.
const NAT_CACHE_MAX: usize = 8;
/// Bound on the check a call, listen or file session makes when its network has no fresh
/// classification.
const NAT_CHECK_AT_START: Duration = Duration::from_secs(4);

fn default_state_path() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".peerlink-sim.json"),
        None => PathBuf::from(".peerlink-sim.json"),
    }
}

fn load_state(path: &Path) -> anyhow::Result<State> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_state(path: &Path, s: &State) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(s)?;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

struct Ctx {
    server: String,
    /// The CAs trusted for an https:// server.
    trust: Trust,
    state_path: PathBuf,
    state: State,
    device: String,
    json: bool,
}

impl Ctx {
    /// One client per node of `--server`, in order.
    fn apis(&self) -> anyhow::Result<Vec<HttpApi>> {
        let apis = self
            .server
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                HttpApi::with_trust(
                    u,
                    peerlink_api::signaling_client::DEFAULT_IO_TIMEOUT,
                    &self.trust,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if apis.is_empty() {
            bail!("--server names no URL");
        }
        Ok(apis)
    }

    /// `request` on the first node of `--server` that can be reached (a node that answers,
    /// even with an error, settles it).
    async fn on_any<T, F, Fut>(&self, request: F) -> anyhow::Result<T>
    where
        F: Fn(HttpApi) -> Fut,
        Fut: std::future::Future<Output = Result<T, SignalError>>,
    {
        let mut last = None;
        for api in self.apis()? {
            match request(api).await {
                Ok(v) => return Ok(v),
                Err(e) if peerlink_api::signaling_client::is_unreachable(&e) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("--server names no URL"), Into::into))
    }

    /// Cached tokens for this server, refreshed when due (and saved).
    async fn tokens(&mut self) -> anyhow::Result<Tokens> {
        let Some(t) = self.state.tokens.clone() else {
            bail!("not logged in: run `peerlink-sim login USER` first");
        };
        if self.state.server.as_deref() != Some(self.server.as_str()) {
            bail!(
                "cached login is for {:?}, not {}: log in again",
                self.state.server,
                self.server
            );
        }
        if t.needs_refresh() {
            let t = self
                .on_any(|api| {
                    let rt = t.refresh_token.clone();
                    async move { api.refresh(&rt).await }
                })
                .await
                .context("refreshing the access token (log in again if this persists)")?;
            self.state.tokens = Some(t.clone());
            save_state(&self.state_path, &self.state)?;
            return Ok(t);
        }
        Ok(t)
    }

    async fn session(&mut self, resume: bool) -> anyhow::Result<SignalSession> {
        let tokens = self.tokens().await?;
        let resume_from = if resume {
            self.state.last_seq.get(&self.device).copied()
        } else {
            None
        };
        Ok(SignalSession::connect_any(self.apis()?, tokens, &self.device, resume_from).await?)
    }

    /// This network's NAT classification towards `stun`: cached in the state file per network
    /// for [`NAT_CACHE_TTL`], else found now (bounded by [`NAT_CHECK_AT_START`]; a check that
    /// cannot tell gives none, and the call goes on without it).
    async fn nat_class(
        &mut self,
        stun: Option<SocketAddr>,
    ) -> Option<peerlink_api::signaling::NatClass> {
        let stun = stun?;
        let local_ip = peerlink_sim::natcheck::local_ip_toward(stun).await.ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(e) = self.state.nat.iter().find(|e| {
            e.stun == stun
                && e.local_ip == local_ip
                && now.saturating_sub(e.at) < NAT_CACHE_TTL.as_secs()
        }) {
            return e.class;
        }
        let opts = peerlink_sim::natcheck::NatCheckOptions {
            wait: Duration::from_millis(400),
            timeout: NAT_CHECK_AT_START,
            ..Default::default()
        };
        let class = match peerlink_sim::natcheck::run(stun, &opts).await {
            Ok(r) => Some(r.class()),
            Err(e) => {
                tracing::info!("NAT check against {stun}: {e}");
                None
            }
        };
        self.state
            .nat
            .retain(|e| !(e.stun == stun && e.local_ip == local_ip));
        if self.state.nat.len() >= NAT_CACHE_MAX {
            self.state.nat.remove(0);
        }
        self.state.nat.push(NatCacheEntry {
            stun,
            local_ip,
            at: now,
            class,
        });
        if let Err(e) = save_state(&self.state_path, &self.state) {
            tracing::warn!("saving the NAT classification: {e:#}");
        }
        class
    }

    fn print(&self, v: serde_json::Value, human: String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{human}");
        }
    }
}

/// The exit status of a failed command (2 for a CA file that cannot be used, 1 otherwise)
/// and a hint to print after the error, if one helps.
pub fn failure(e: &anyhow::Error) -> (u8, Option<&'static str>) {
    if e.downcast_ref::<peerlink_api::tls::TrustError>().is_some() {
        return (2, None);
    }
    let tls = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<SignalError>(),
            Some(SignalError::Tls { .. })
        )
    });
    if tls {
        return (
            1,
            Some("trust the CA that signed the server's certificate with --ca FILE"),
        );
    }
    (1, None)
}

/// Run the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let state_path = cli.state.clone().unwrap_or_else(default_state_path);
    let state = load_state(&state_path)?;
    let server = cli
        .server
        .clone()
        .or_else(|| state.server.clone())
        .unwrap_or_else(|| "http://127.0.0.1:8443".to_owned());
    let trust = Trust::with_ca_files(&cli.ca)?;
    let mut ctx = Ctx {
        server,
        trust,
        state_path,
        state,
        device: cli.device.clone(),
        json: cli.json,
    };
    match cli.cmd {
        Cmd::Register { user, password } => {
            ctx.on_any(|api| {
                let (user, password) = (user.clone(), password.clone());
                async move { api.register(&user, &password).await }
            })
            .await?;
            ctx.print(
                serde_json::json!({"registered": user, "server": ctx.server}),
                format!("registered {user} on {}", ctx.server),
            );
        }
        Cmd::Login { user, password } => {
            let t = ctx
                .on_any(|api| {
                    let (user, password) = (user.clone(), password.clone());
                    async move { api.login(&user, &password).await }
                })
                .await?;
            let name = t.username.clone();
            if ctx.state.tokens.as_ref().map(|t| &t.username) != Some(&name)
                || ctx.state.server.as_deref() != Some(ctx.server.as_str())
            {
                ctx.state.last_seq.clear();
            }
            ctx.state.server = Some(ctx.server.clone());
            ctx.state.tokens = Some(t);
            save_state(&ctx.state_path, &ctx.state)?;
            ctx.print(
                serde_json::json!({"logged_in": name, "server": ctx.server,
                    "state": ctx.state_path.display().to_string()}),
                format!(
                    "logged in as {name}; tokens cached in {}",
                    ctx.state_path.display()
                ),
            );
        }
        Cmd::Chat { user, text } => {
            let mut s = ctx.session(false).await?;
            let (id, stored) = s
                .send_message(&user, &text, Duration::from_secs(15))
                .await?;
            s.close().await;
            ctx.print(
                serde_json::json!({"sent": id, "to": user, "stored_at_ms": stored}),
                format!("sent to {user} (id {id}); stored durably at {stored} ms"),
            );
        }
        Cmd::Inbox { wait } => {
            let mut s = ctx.session(true).await?;
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, s.recv()).await {
                    Err(_) => break,
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(ServerMsg::Message {
                        seq,
                        id,
                        from,
                        body,
                        sent_at_ms,
                    })) => {
                        s.ack(seq).await?;
                        got.push(serde_json::json!({"seq": seq, "id": id, "from": from,
                            "body": body, "sent_at_ms": sent_at_ms}));
                    }
                    Ok(Ok(_)) => {}
                }
            }
            let acked = s.acked_seq();
            s.close().await;
            ctx.state.last_seq.insert(ctx.device.clone(), acked);
            save_state(&ctx.state_path, &ctx.state)?;
            let human = if got.is_empty() {
                "no new messages".to_owned()
            } else {
                got.iter()
                    .map(|m| {
                        format!(
                            "[{}] {}: {}",
                            m["seq"],
                            m["from"].as_str().unwrap_or("?"),
                            m["body"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            ctx.print(
                serde_json::json!({"messages": got, "acked_seq": acked}),
                human,
            );
        }
        Cmd::Call {
            user,
            audio,
            record,
            duration,
            net,
        } => {
            let nat = ctx.nat_class(net.stun4()).await;
            let mut s = ctx.session(false).await?;
            let opts = CallOptions {
                audio,
                record,
                duration,
                nat,
                ..net.options(&ctx.trust)
            };
            if !ctx.json {
                eprintln!("calling {user}…");
            }
            let r = call::call(&mut s, &user, &opts).await?;
            s.close().await;
            ctx.print(serde_json::to_value(&r)?, demo::render_call(&r));
        }
        Cmd::SendFile {
            user,
            path,
            timeout,
            net,
        } => {
            let mut s = ctx.session(false).await?;
            let opts = CallOptions {
                duration: timeout,
                progress: !ctx.json,
                ..net.options(&ctx.trust)
            };
            if !ctx.json {
                eprintln!("sending {} to {user}…", path.display());
            }
            let r = call::send_file(&mut s, &user, &path, &opts).await?;
            s.close().await;
            ctx.print(serde_json::to_value(&r)?, demo::render_file(&r));
        }
        Cmd::Listen {
            record,
            audio,
            wait,
            max_duration,
            save_dir,
            sessions,
            net,
        } => {
            if let Some(d) = &save_dir
                && !d.is_dir()
            {
                bail!("--save-dir {} is not a directory", d.display());
            }
            let nat = ctx.nat_class(net.stun4()).await;
            let mut s = ctx.session(false).await?;
            let mut failed = 0u32;
            for i in 0..sessions.max(1) {
                // Several calls: one recording per session (name.wav, name-2.wav, ...).
                let record = record.as_ref().map(|p| {
                    if i == 0 {
                        p.clone()
                    } else {
                        let stem = p.file_stem().and_then(|x| x.to_str()).unwrap_or("call");
                        p.with_file_name(format!("{stem}-{}.wav", i + 1))
                    }
                });
                let opts = CallOptions {
                    audio: audio.clone(),
                    record,
                    save_dir: save_dir.clone(),
                    progress: !ctx.json,
                    nat,
                    ..net.options(&ctx.trust)
                };
                if !ctx.json {
                    eprintln!("listening as {} (session {}/{sessions})…", s.user(), i + 1);
                }
                match call::answer_session(&mut s, wait, max_duration, &opts).await {
                    Ok(r) => {
                        let human = match &r {
                            call::SessionReport::Call(c) => demo::render_call(c),
                            call::SessionReport::File(f) => demo::render_file(f),
                            call::SessionReport::Declined(d) => {
                                format!("declined a session from {}: {}", d.peer, d.reason)
                            }
                        };
                        ctx.print(serde_json::to_value(&r)?, human);
                    }
                    Err(e) => {
                        failed += 1;
                        // A wait that ran out ends the listening: nobody is calling.
                        let stop = matches!(e, call::CallError::Signal(_));
                        ctx.print(
                            serde_json::json!({"kind": "error", "error": e.to_string()}),
                            format!("session failed: {e}"),
                        );
                        if stop {
                            break;
                        }
                    }
                }
            }
            s.close().await;
            if failed > 0 {
                bail!("{failed} session(s) failed");
            }
        }
        Cmd::Contacts { add } => {
            let mut s = ctx.session(false).await?;
            let msg = match add {
                Some(u) => ClientMsg::AddContact { username: u },
                None => ClientMsg::ListContacts,
            };
            s.send(&msg).await?;
            let m = s
                .wait_for(Duration::from_secs(15), "contacts", None, |m| {
                    matches!(m, ServerMsg::Contacts { .. } | ServerMsg::Error { .. })
                })
                .await?;
            s.close().await;
            match m {
                ServerMsg::Contacts { contacts } => {
                    let human = contacts
                        .iter()
                        .map(|c| format!("{} {:?}", c.username, c.status).to_lowercase())
                        .collect::<Vec<_>>()
                        .join("\n");
                    ctx.print(serde_json::to_value(&contacts)?, human);
                }
                ServerMsg::Error { code, message, .. } => bail!("{code:?}: {message}"),
                _ => bail!("unexpected answer"),
            }
        }
        Cmd::NatCheck {
            stun,
            wait,
            timeout,
        } => {
            let opts = peerlink_sim::natcheck::NatCheckOptions {
                wait,
                timeout,
                ..Default::default()
            };
            let r = peerlink_sim::natcheck::run(stun, &opts).await?;
            let delta = r
                .port_delta
                .map(|d| format!(" (delta {d:+})"))
                .unwrap_or_default();
            ctx.print(
                serde_json::to_value(&r)?,
                format!(
                    "mapped address {}{}\nmapping: {}\nfiltering: {}\nport allocation: {}{delta}\nhairpin: {}",
                    r.mapped,
                    if r.nat { "" } else { " (no NAT)" },
                    r.mapping,
                    r.filtering,
                    r.port_allocation,
                    if r.hairpin { "yes" } else { "no" },
                ),
            );
        }
        Cmd::TurnCheck => {
            let tokens = ctx.tokens().await?;
            let creds = ctx
                .on_any(|api| {
                    let token = tokens.access_token.clone();
                    async move { api.turn_credentials(&token).await }
                })
                .await?;
            let Some(relay) = creds.uris.iter().find_map(|u| parse_turn_uri(u)) else {
                bail!("signaling offered no usable relay: {:?}", creds.uris);
            };
            let mut ep = demo::turn_path::TurnEndpoint::bind(TurnConfig::new(
                relay,
                creds.username,
                creds.password,
            ))
            .await?;
            let a = ep.allocate(Duration::from_secs(15)).await?;
            // A full or draining relay may have sent the allocation to another (300).
            let used = ep.client().config().server;
            ep.deallocate(Duration::from_secs(15)).await?;
            let redirected = (used != relay).then(|| format!(" (redirected by {relay})"));
            ctx.print(
                serde_json::json!({"relay": used.to_string(), "offered": relay.to_string(),
                    "allocation": a}),
                format!(
                    "relay {used}{}: allocated {} for {} (mapped {:?}, lifetime {} s) in {:.1} ms; released",
                    redirected.unwrap_or_default(),
                    a.relayed, a.local, a.mapped, a.lifetime_s, a.took_ms
                ),
            );
        }
        Cmd::Fleet => {
            let f = Fleet::start(FleetOptions::default()).await?;
            let relay = f.relay;
            ctx.print(
                serde_json::json!({"directory": f.directory_url, "signaling": f.signaling_url,
                    "stun": f.stun.map(|s| s.to_string()),
                    "stun6": f.stun6.map(|s| s.to_string()),
                    "relay": relay.map(|r| r.turn.to_string()),
                    "relay_metrics": relay.map(|r| r.metrics.to_string()),
                    "logs": f.dir().display().to_string()}),
                format!(
                    "directory {}\nsignaling {}\nstun {}{}\nrelay {} (metrics {})\nlogs in {}\nCtrl-C or SIGTERM stops the fleet",
                    f.directory_url,
                    f.signaling_url,
                    f.stun.map(|s| s.to_string()).unwrap_or_default(),
                    f.stun6.map(|s| format!("\nstun6 {s}")).unwrap_or_default(),
                    relay.map(|r| r.turn.to_string()).unwrap_or_default(),
                    relay.map(|r| r.metrics.to_string()).unwrap_or_default(),
                    f.dir().display()
                ),
            );
            // Until SIGINT or SIGTERM, which end the command by dropping this future, and the
            // fleet with it: every child is killed.
            let _running = f;
            std::future::pending::<()>().await;
        }
        Cmd::Demo {
            media_seconds,
            audio,
            out,
            relay_metrics,
            relay,
            stun,
        } => {
            let opts = DemoOptions {
                server: cli.server.clone(),
                ca: cli.ca.clone(),
                relay_metrics,
                relay,
                out_dir: out,
                media_seconds,
                stun,
                audio,
            };
            if !ctx.json {
                eprintln!("peerlink-sim demo: running…");
            }
            let r = demo::run(opts, !ctx.json).await?;
            ctx.print(serde_json::to_value(&r)?, demo::render(&r));
        }
    }
    Ok(())
}
