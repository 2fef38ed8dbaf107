//! Real backend servers for tests (feature `testing`): a `redis-server`
//! started on a free loopback port, killed (by its own PID) when dropped.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    password: Option<String>,
    /// With TLS: (cert, key, CA) files; the server then listens only on TLS.
    tls: Option<[std::path::PathBuf; 3]>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl RedisServer {
    /// Starts `redis-server` (append-only file on, like a durable setup).
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// As `start`, requiring `password`.
    pub fn start_with(password: Option<&str>) -> RedisServer {
        Self::start_full(password, None)
    }

    /// A server that speaks only TLS and requires client certificates signed
    /// by `ca` (`cert`/`key`: its own, PEM files).
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> RedisServer {
        Self::start_full(
            None,
            Some([cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()]),
        )
    }

    fn start_full(password: Option<&str>, tls: Option<[std::path::PathBuf; 3]>) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut server = RedisServer {
            port,
            child: spawn(port, &dir.path().to_path_buf(), password, tls.as_ref()),
            dir,
            password: password.map(str::to_string),
            tls,
        };
        server.wait_up();
        server
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Stops the server (SIGKILL) and starts it again on the same port and
    /// data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kills the server (SIGKILL); `start_again` brings it back.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and data directory.
    pub fn start_again(&mut self) {
        self.child = spawn(
            self.port,
            &self.dir.path().to_path_buf(),
            self.password.as_deref(),
            self.tls.as_ref(),
        );
        self.wait_up();
    }

    fn wait_up(&mut self) {
        wait_listening(&mut self.child, self.port, "redis-server");
    }
}

/// Waits until the server `child` accepts connections on `port`.
fn wait_listening(child: &mut Child, port: u16, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited: {status}; is it installed? (scripts/test installs it)");
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not start within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(port: u16, dir: &PathBuf, password: Option<&str>, tls: Option<&[PathBuf; 3]>) -> Child {
    let mut cmd = Command::new("redis-server");
    match tls {
        Some([cert, key, ca]) => {
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca);
        }
        None => {
            cmd.args(["--port", &port.to_string()]);
        }
    }
    cmd.args(["--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = password {
        cmd.args(["--requirepass", p]);
    }
    cmd.spawn()
        .expect("start redis-server (is it installed? scripts/test installs it)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `nats-server` with JetStream on a free loopback port.
pub struct NatsServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// As `start`, with more server flags (e.g. `--tls ...`).
    pub fn start_with(args: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut server = NatsServer {
            port,
            child: spawn_nats(port, dir.path(), &args),
            dir,
            args,
        };
        wait_listening(&mut server.child, port, "nats-server");
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_nats(self.port, self.dir.path(), &self.args);
        wait_listening(&mut self.child, self.port, "nats-server");
    }
}

fn spawn_nats(port: u16, dir: &std::path::Path, args: &[String]) -> Child {
    let bin = if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    };
    Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server (is it installed? scripts/test installs it)")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
