//! The engines of a fleet for the benchmarks: a PostgreSQL server (Debian's
//! `/usr/lib/postgresql/<version>/bin/{initdb,postgres}`, a fresh cluster in a temporary
//! directory, password authentication, `fsync=on`, `synchronous_commit=on`, as the `postgres`
//! system user when run as root) and a Redis server (`redis-server` from `PATH`, no
//! persistence), each on a free loopback port, started the way `deploy/local/fleet.sh up
//! --engines` starts them, and killed with their directories removed on drop.
//!
//! What it is not: a way to run the engines in production (operators run their own), nor a
//! test fixture (the tests use `peerlink-testkit`, which the shipped binaries may not link).

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{FleetError, Result};

/// Superuser of the benchmark's PostgreSQL cluster.
const PG_USER: &str = "peerlink";
/// How long an engine gets to accept connections.
const START_WAIT: Duration = Duration::from_secs(60);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn engine_error(name: &str, what: impl Into<String>) -> FleetError {
    FleetError::Service {
        name: name.to_owned(),
        what: what.into(),
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
fn pg_bin() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(|| {
        engine_error(
            "postgres",
            "server binaries not found in /usr/lib/postgresql/<version>/bin: run scripts/setup.sh",
        )
    })
}

/// As root: the `postgres` user's uid and gid (the server refuses to run as root).
fn pg_owner() -> Result<Option<(u32, u32)>> {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
        != 0
    {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "postgres")
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .map(Some)
        .ok_or_else(|| engine_error("postgres", "running as root and no `postgres` user exists"))
}

/// A running engine process and its directory; killed and removed on drop.
struct Engine {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server for a benchmark.
pub struct Postgres {
    engine: Engine,
    port: u16,
    password: String,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    databases: u32,
}

impl Postgres {
    /// initdb a cluster in a new directory under `parent` and start it.
    pub fn start(parent: &Path) -> Result<Postgres> {
        let bin = pg_bin()?;
        let owner = pg_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("peerlink-bench-pg-")
            .tempdir_in(parent)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let password = format!("{:032x}", rand_u128());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let command = |program: &str| {
            let mut c = Command::new(bin.join(program));
            c.current_dir(dir.path()).stdin(Stdio::null());
            if let Some((uid, gid)) = owner {
                c.uid(uid).gid(gid).env("HOME", dir.path());
            }
            c
        };
        let out = command("initdb")
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                PG_USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()?;
        if !out.status.success() {
            return Err(engine_error(
                "postgres",
                format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)),
            ));
        }
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path().join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut cmd = command("postgres");
        cmd.arg("-D")
            .arg(dir.path().join("data"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("port={port}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "max_connections=200"])
            .stdout(log.try_clone()?)
            .stderr(log);
        peerlink_cli::process::die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        let mut pg = Postgres {
            engine: Engine { child, dir },
            port,
            password,
            bin,
            owner,
            databases: 0,
        };
        let deadline = Instant::now() + START_WAIT;
        while pg.psql("postgres", "SELECT 1").is_err() {
            if let Ok(Some(s)) = pg.engine.child.try_wait() {
                return Err(engine_error("postgres", format!("exited at start ({s})")));
            }
            if Instant::now() > deadline {
                return Err(engine_error(
                    "postgres",
                    "did not accept connections in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pg)
    }

    /// Run `sql` in database `db` with `psql` (from the same installation).
    fn psql(&self, db: &str, sql: &str) -> Result<()> {
        let psql = if self.bin.join("psql").is_file() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let mut c = Command::new(psql);
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            PG_USER,
        ])
        .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .env("PGPASSWORD", &self.password)
        .env("PGCONNECT_TIMEOUT", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid).env("HOME", self.engine.dir.path());
        }
        let out = c.output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(engine_error(
                "postgres",
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }

    /// A new empty database; its `postgres://` URL.
    pub fn create_database(&mut self) -> Result<String> {
        self.databases += 1;
        let name = format!("bench_{}", self.databases);
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(format!(
            "postgres://{PG_USER}:{}@127.0.0.1:{}/{name}",
            self.password, self.port
        ))
    }
}

/// A Redis server for a benchmark.
pub struct Redis {
    _engine: Engine,
    port: u16,
}

impl Redis {
    /// Start `redis-server` without persistence in a new directory under `parent`.
    pub fn start(parent: &Path) -> Result<Redis> {
        let dir = tempfile::Builder::new()
            .prefix("peerlink-bench-redis-")
            .tempdir_in(parent)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("redis.log"))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        peerlink_cli::process::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            engine_error(
                "redis-server",
                format!("{e} (scripts/setup.sh installs redis-server)"),
            )
        })?;
        let mut engine = Engine { child, dir };
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read as _, Write as _};
                let mut buf = [0u8; 16];
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    break;
                }
            }
            if let Ok(Some(s)) = engine.child.try_wait() {
                return Err(engine_error(
                    "redis-server",
                    format!("exited at start ({s})"),
                ));
            }
            if Instant::now() > deadline {
                return Err(engine_error("redis-server", "did not answer PING in time"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Redis {
            _engine: engine,
            port,
        })
    }

    /// `redis://127.0.0.1:PORT/DB?prefix=PREFIX`.
    pub fn url(&self, db: u8, prefix: &str) -> String {
        format!("redis://127.0.0.1:{}/{db}?prefix={prefix}", self.port)
    }
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish();
    h.write_u64(a);
    (u128::from(a) << 64) | u128::from(h.finish())
}
