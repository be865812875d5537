//! A client the Service tests run as a process of a simulated node: in the
//! node's (or a pod's) network namespace and in the node's cgroup, where the
//! agent's socket programs see its calls. Prints one JSON line.
//!
//! - `tcp ADDR [MSG]`: connect, send MSG (default `who`), read the answer;
//!   `peer` is what `getpeername` says.
//! - `udp ADDR [--connected]`: send `who`, receive the answer; `from` is
//!   the answer's source as `recvfrom` reports it.
//! - `load ADDR --seconds S --parallel P`: new TCP connections (`who`) for
//!   S seconds from P threads; counts answers by backend and every failure.
//! - `hold ADDR --count N --seconds S`: N long-lived TCP connections, each
//!   asking `who` every 100 ms; counts the ones that broke.
//! - `udp-stay ADDR --seconds S`: one connected UDP socket asking `who`
//!   every 100 ms, replaced by a new one when it fails (as a resolver
//!   does); counts answers by backend and the errors seen.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Tcp {
        addr: SocketAddr,
        #[arg(default_value = "who")]
        message: String,
    },
    Udp {
        addr: SocketAddr,
        #[arg(long)]
        connected: bool,
    },
    Load {
        addr: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    Hold {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: f64,
    },
    UdpStay {
        addr: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
}

const TIMEOUT: Duration = Duration::from_secs(3);

fn error(e: &std::io::Error) -> Value {
    json!({"error": e.to_string(), "kind": format!("{:?}", e.kind())})
}

fn ask(addr: SocketAddr, message: &str) -> Result<(String, SocketAddr), std::io::Error> {
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let peer = conn.peer_addr()?;
    conn.write_all(message.as_bytes())?;
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), peer))
}

fn main() {
    let out = match Cli::parse().command {
        Cmd::Tcp { addr, message } => match ask(addr, &message) {
            Ok((reply, peer)) => json!({"reply": reply, "peer": peer.to_string()}),
            Err(e) => error(&e),
        },
        Cmd::Udp { addr, connected } => udp(addr, connected).unwrap_or_else(|e| error(&e)),
        Cmd::Load {
            addr,
            seconds,
            parallel,
        } => load(addr, seconds, parallel),
        Cmd::Hold {
            addr,
            count,
            seconds,
        } => hold(addr, count, seconds),
        Cmd::UdpStay { addr, seconds } => udp_stay(addr, seconds),
    };
    println!("{out}");
}

fn udp(addr: SocketAddr, connected: bool) -> Result<Value, std::io::Error> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 64];
    if connected {
        socket.connect(addr)?;
        socket.send(b"who")?;
        let peer = socket.peer_addr()?;
        let (n, from) = socket.recv_from(&mut buf)?;
        return Ok(json!({
            "reply": String::from_utf8_lossy(&buf[..n]),
            "from": from.to_string(),
            "peer": peer.to_string(),
        }));
    }
    socket.send_to(b"who", addr)?;
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(json!({"reply": String::from_utf8_lossy(&buf[..n]), "from": from.to_string()}))
}

fn load(addr: SocketAddr, seconds: f64, parallel: usize) -> Value {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let answers: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    let failures: Arc<Mutex<Vec<String>>> = Default::default();
    let threads: Vec<_> = (0..parallel)
        .map(|_| {
            let (answers, failures) = (answers.clone(), failures.clone());
            std::thread::spawn(move || {
                while Instant::now() < until {
                    match ask(addr, "who") {
                        Ok((who, _)) => *answers.lock().unwrap().entry(who).or_default() += 1,
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let answers = answers.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    json!({"answers": answers, "failures": failures})
}

fn hold(addr: SocketAddr, count: usize, seconds: f64) -> Value {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut conns = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(c) => {
                let _ = c.set_read_timeout(Some(TIMEOUT));
                conns.push((c, String::new()));
            }
            Err(e) => failures.push(format!("connect: {e}")),
        }
    }
    let mut broken: BTreeMap<String, u64> = BTreeMap::new();
    let mut buf = [0u8; 64];
    while Instant::now() < until && !conns.is_empty() {
        conns.retain_mut(|(c, backend)| {
            let answer = c
                .write_all(b"who")
                .and_then(|()| c.read(&mut buf))
                .ok()
                .filter(|n| *n > 0)
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
            match answer {
                Some(who) => {
                    *backend = who;
                    true
                }
                None => {
                    *broken.entry(backend.clone()).or_default() += 1;
                    false
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut alive: BTreeMap<String, u64> = BTreeMap::new();
    for (_, backend) in &conns {
        *alive.entry(backend.clone()).or_default() += 1;
    }
    json!({"alive": alive, "broken": broken, "failures": failures})
}

fn udp_stay(addr: SocketAddr, seconds: f64) -> Value {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let connect = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.connect(addr)?;
        Ok(s)
    };
    let mut socket = connect().expect("a UDP socket");
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let mut sockets = 1;
    let mut buf = [0u8; 64];
    while Instant::now() < until {
        match socket.send(b"who").and_then(|_| socket.recv(&mut buf)) {
            Ok(n) => {
                *answers
                    .entry(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .or_default() += 1
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                errors.push(e.to_string());
                socket = connect().expect("a UDP socket");
                sockets += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    json!({"answers": answers, "errors": errors, "sockets": sockets})
}
