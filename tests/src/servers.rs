//! Private NATS, Redis and MariaDB servers on ports of their own, for tests that stop and restart
//! them without disturbing the other tests, which share the machine's servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::eventually;

/// A server process that can be killed and started again with the same port and data.
pub struct Server {
    program: &'static str,
    args: Vec<String>,
    pub addr: SocketAddr,
    /// Its data directory, removed on drop.
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// nats-server with JetStream on file storage in a directory of its own.
    pub async fn nats() -> Server {
        Server::nats_with(Vec::new()).await
    }

    /// The same, requiring TLS of every client, with a certificate for 127.0.0.1 signed by
    /// `certs`' CA (which is what clients must trust).
    pub async fn nats_tls(certs: &Certificates) -> Server {
        Server::nats_with(vec![
            "--tls".into(),
            "--tlscert".into(),
            certs.cert.display().to_string(),
            "--tlskey".into(),
            certs.key.display().to_string(),
        ])
        .await
    }

    async fn nats_with(extra: Vec<String>) -> Server {
        let addr = crate::free_port();
        let dir = std::env::temp_dir().join(format!("chat-nats-{}", addr.port()));
        let mut args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            addr.port().to_string(),
            "-js".into(),
            "-sd".into(),
            dir.display().to_string(),
        ];
        args.extend(extra);
        Server::start("nats-server", args, addr, dir).await
    }

    /// redis-server that keeps nothing on disk, as in production here.
    pub async fn redis() -> Server {
        let addr = crate::free_port();
        let dir = std::env::temp_dir().join(format!("chat-redis-{}", addr.port()));
        let args = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            addr.port().to_string(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        Server::start("redis-server", args, addr, dir).await
    }

    /// mariadbd with a fresh data directory (root without a password, as on this machine),
    /// small enough to start in a second.
    pub async fn mariadb() -> Server {
        let addr = crate::free_port();
        let dir = std::env::temp_dir().join(format!("chat-mariadb-{}", addr.port()));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("a data directory");
        must_run(
            Command::new("mariadb-install-db")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--skip-test-db",
                    "--auth-root-authentication-method=normal",
                ])
                .arg(format!("--datadir={}", data.display())),
            "mariadb-install-db",
        )
        .await;
        let args = vec![
            "--no-defaults".into(),
            "--user=root".into(),
            format!("--datadir={}", data.display()),
            format!("--socket={}", dir.join("sock").display()),
            format!("--pid-file={}", dir.join("pid").display()),
            format!("--log-error={}", dir.join("error.log").display()),
            "--bind-address=127.0.0.1".into(),
            format!("--port={}", addr.port()),
            "--skip-log-bin".into(),
            "--innodb-buffer-pool-size=32M".into(),
            "--innodb-log-file-size=16M".into(),
        ];
        Server::start("mariadbd", args, addr, dir).await
    }

    /// `mysql://root@host:port` of a [`Server::mariadb`].
    pub fn mysql_url(&self) -> String {
        format!("mysql://root@{}", self.addr)
    }

    async fn start(
        program: &'static str,
        args: Vec<String>,
        addr: SocketAddr,
        dir: PathBuf,
    ) -> Server {
        std::fs::create_dir_all(&dir).expect("a data directory");
        let mut s = Server {
            program,
            args,
            addr,
            dir,
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        let addr = self.addr;
        eventually(&format!("{} answers", self.program), || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
    }

    /// `kill -9`, and wait until it is gone.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts it again on the same port with the same data directory.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway certificate authority and a server certificate it signed for 127.0.0.1 (made
/// with the `openssl` command), in a directory removed on drop.
pub struct Certificates {
    /// Held for its removal on drop.
    _dir: tempfile::TempDir,
    /// The CA's certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// The server's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certificates {
    pub async fn for_localhost() -> Certificates {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let at = |name: &str| dir.path().join(name);
        std::fs::write(
            at("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        )
        .expect("the extensions file");
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let steps = [
            format!(
                "req -x509 {key} -days 2 -subj /CN=chat-test-CA \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.pem"
            ),
            format!("req {key} -subj /CN=127.0.0.1 -keyout server.key -out server.csr"),
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.pem"
                .to_owned(),
        ];
        for args in steps {
            must_run(
                Command::new("openssl")
                    .args(args.split_whitespace())
                    .current_dir(dir.path()),
                &format!("openssl {args}"),
            )
            .await;
        }
        Certificates {
            ca: at("ca.pem"),
            cert: at("server.pem"),
            key: at("server.key"),
            _dir: dir,
        }
    }
}

/// Runs a setup command with its output discarded; panics unless it succeeds.
async fn must_run(command: &mut Command, what: &str) {
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(status.success(), "{what} failed");
}
