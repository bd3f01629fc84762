//! Real processes for cluster tests: a `redis-server` on a free loopback
//! port and `wsproto-server` nodes on it. Each is stopped by its PID when
//! dropped, so a failing test leaves nothing running.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use wsproto_client::Client;

use super::{external::require, API_KEY};

/// The server binary under test.
pub const SERVER: &str = env!("CARGO_BIN_EXE_wsproto-server");

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `signal` (`-STOP`, `-CONT`, `-9`…) to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// A `redis-server` of its own: no persistence, loopback only.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port and waits until it answers PING.
    ///
    /// # Panics
    /// When redis-server is not installed (naming the install command).
    pub fn start() -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let program = require("redis-server");
        let child = Command::new(program)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether it answers PING within 200 ms.
    pub fn answers(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut tcp) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
        let mut answer = [0u8; 7];
        tcp.write_all(b"PING\r\n").is_ok()
            && tcp.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Kills it (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a command through `redis-cli`-free raw RESP; returns the reply.
    pub fn command(&self, args: &[&str]) -> String {
        command_on(self.port, args)
    }
}

/// [`Redis::command`] on the Redis at `port` (usable from another thread).
pub fn command_on(port: u16, args: &[&str]) -> String {
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        tcp.write_all(request.as_bytes()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut reply = vec![0u8; 64 * 1024];
        let n = tcp.read(&mut reply).unwrap();
        String::from_utf8_lossy(&reply[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process cannot die until it is continued.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// One `wsproto-server` process on the cluster's Redis.
pub struct Node {
    child: Option<Child>,
    pub id: String,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts a node called `id` on `redis` (with the test API key, and
    /// clients allowed to publish anywhere) and waits for it to listen.
    pub fn start(redis: &Redis, id: &str, extra: &[&str]) -> Node {
        Node::start_at(&redis.url(), id, "127.0.0.1:0", extra)
    }

    /// [`Node::start`] listening on `listen` (a fixed address survives a
    /// restart), with Redis at `redis_url`.
    pub fn start_at(redis_url: &str, id: &str, listen: &str, extra: &[&str]) -> Node {
        let mut child = Command::new(SERVER)
            .args(["--listen", listen, "--broker", redis_url])
            .args([
                "--node-id",
                id,
                "--api-key",
                API_KEY,
                "--client-publish",
                "#",
            ])
            .args(["--rate-limit", "0", "--shutdown-timeout", "2s"])
            .args(extra)
            .env("WSPROTO_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => panic!("node {id} exited before listening"),
            };
            log.lock().unwrap().push(line.clone());
            if let Some((_, addr)) = line.split_once("addr=") {
                break addr.trim().parse().unwrap();
            }
        };
        let keep = log.clone();
        // Keep draining the log so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Node {
            child: Some(child),
            id: id.to_owned(),
            addr,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `ws://ADDR/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A client connected to `/ws?QUERY`, past its WELCOME frame.
    pub async fn client(&self, query: &str) -> Client {
        let url = format!("{}?{query}", self.url());
        let mut client = Client::connect(&url).await.unwrap();
        client.welcome().await.unwrap();
        client
    }

    /// `GET /healthz` as JSON.
    pub async fn health(&self) -> serde_json::Value {
        let response = super::http_get(self.addr, "/healthz").await;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }

    /// POSTs `json` to this node's publish API; returns status and body.
    pub async fn publish_api(&self, json: &str) -> (u16, serde_json::Value) {
        let url = format!("http://{}/api/publish", self.addr);
        let (status, body) = wsproto_client::http::post_json(&url, Some(API_KEY), json)
            .await
            .unwrap();
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status.as_u16(), body)
    }

    /// What the node has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Stops it as a deployment does (SIGTERM) and waits for it to exit;
    /// panics if it takes over 10 s.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "node {} ignored SIGTERM",
                    self.id
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills it (SIGKILL): no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
