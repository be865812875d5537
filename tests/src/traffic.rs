//! Traffic between namespaces: TCP echo, intact bulk transfer, throughput,
//! and a UDP probe that counts every lost packet.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// Checks a TCP connection from `client` to `server_ip` in `server` (the
/// server echoes what it reads) and returns the client address the server saw.
pub fn tcp_echo(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs) -> Result<SocketAddr, String> {
    use std::io::{Read, Write};
    let listener = server.enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))));
    let listener = listener.map_err(|e| format!("bind {server_ip}: {e}"))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let echo = s.spawn(move || -> std::io::Result<SocketAddr> {
            let (mut conn, peer) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf)?;
            conn.write_all(&buf[..n])?;
            Ok(peer)
        });
        let reply = client.enter(|| -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"beeline")?;
            let mut buf = vec![0u8; 7];
            conn.read_exact(&mut buf)?;
            Ok(buf)
        });
        match reply {
            Ok(buf) if buf == b"beeline" => {
                echo.join().unwrap().map_err(|e| format!("server: {e}"))
            }
            Ok(buf) => Err(format!("wrong echo {buf:?}")),
            Err(e) => {
                // Unblock the accept so the scope can end.
                let _ =
                    server.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
                Err(format!("connect to {addr}: {e}"))
            }
        }
    })
}

/// One TCP connection from `client` to `server_ip` in `server`: `receive`
/// runs on the accepted end in a thread, `send` on the client's end. When
/// sending fails the accept is unblocked and the send error returned.
fn tcp_one_way<T: Send>(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    receive: impl FnOnce(TcpStream) -> Result<T, String> + Send,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<()> + Send,
) -> Result<T, String> {
    let listener = server
        .enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))))
        .map_err(|e| format!("bind {server_ip}: {e}"))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            receive(conn)
        });
        let sent = client.enter(|| {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            send(&mut conn)
        });
        if let Err(e) = sent {
            let _ = server.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
            let _ = receiver.join();
            return Err(format!("sending to {addr}: {e}"));
        }
        receiver.join().unwrap()
    })
}

/// Sends `bytes` of a pseudo-random stream over TCP from `client` to
/// `server_ip` in `server`, which checks every byte against the same stream
/// (TCP checksums are not verified between namespaces of one kernel, so a
/// datapath that corrupts GSO packets would otherwise go unnoticed).
pub fn tcp_transfer_intact(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    bytes: u64,
) -> Result<(), String> {
    use std::io::{Read, Write};
    fn fill(stream: &mut u64, buf: &mut [u8]) {
        for b in buf {
            // xorshift64: cheap and never repeats within the transfer.
            *stream ^= *stream << 13;
            *stream ^= *stream >> 7;
            *stream ^= *stream << 17;
            *b = *stream as u8;
        }
    }
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    let check = move |mut conn: TcpStream| -> Result<(), String> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (mut stream, mut offset) = (SEED, 0u64);
        let mut got = vec![0u8; 1 << 16];
        let mut want = vec![0u8; 1 << 16];
        loop {
            let n = conn
                .read(&mut got)
                .map_err(|e| format!("at {offset}: {e}"))?;
            if n == 0 {
                break;
            }
            fill(&mut stream, &mut want[..n]);
            if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                return Err(format!("byte {} differs", offset + i as u64));
            }
            offset += n as u64;
        }
        if offset != bytes {
            return Err(format!("received {offset} of {bytes} bytes"));
        }
        Ok(())
    };
    let send = move |conn: &mut TcpStream| -> std::io::Result<()> {
        // A datapath that loses data stalls the stream: fail, not hang.
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        let (mut stream, mut left) = (SEED, bytes);
        let mut buf = vec![0u8; 1 << 17];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill(&mut stream, &mut buf[..n]);
            conn.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    };
    tcp_one_way(server, server_ip, client, check, send)
}

/// Bulk TCP from `client` to `server_ip` in `server` for `duration`;
/// returns the goodput in Gbit/s.
pub fn tcp_throughput(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    duration: Duration,
) -> Result<f64, String> {
    use std::io::{Read, Write};
    let sink = |mut conn: TcpStream| -> Result<f64, String> {
        let start = Instant::now();
        let mut buf = vec![0u8; 1 << 17];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf).map_err(|e| format!("receiving: {e}"))? {
                0 => return Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9),
                n => total += n as u64,
            }
        }
    };
    let send = move |conn: &mut TcpStream| -> std::io::Result<()> {
        let buf = vec![0x5au8; 1 << 17];
        let end = Instant::now() + duration;
        while Instant::now() < end {
            conn.write_all(&buf)?;
        }
        Ok(())
    };
    tcp_one_way(server, server_ip, client, sink, send)
}

/// Numbered UDP datagrams from `client` to `server_ip` in `server`, every
/// `interval` until [`UdpProbe::finish`]: counts what arrived, so a test can
/// require that not one packet was lost (TCP would hide a loss behind a
/// retransmission).
pub struct UdpProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<std::io::Result<u64>>,
    receiver: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl UdpProbe {
    pub fn start(
        server: &NetNs,
        server_ip: Ipv4Addr,
        client: &NetNs,
        interval: Duration,
    ) -> UdpProbe {
        use std::{
            net::UdpSocket,
            sync::{
                Arc,
                atomic::{AtomicBool, Ordering},
            },
        };
        let stop = Arc::new(AtomicBool::new(false));
        let socket = server
            .enter(|| UdpSocket::bind(SocketAddr::from((server_ip, 0))))
            .expect("bind the probe's receiver");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let sending = client
            .enter(|| UdpSocket::bind("0.0.0.0:0"))
            .expect("bind the probe's sender");
        let done = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let (mut received, mut quiet_since) = (0u64, None::<Instant>);
            loop {
                match socket.recv(&mut buf) {
                    Ok(_) => {
                        received += 1;
                        quiet_since = None;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        // Stopped and nothing in flight for 300 ms: done.
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if done.load(Ordering::Relaxed)
                            && since.elapsed() > Duration::from_millis(300)
                        {
                            return Ok(received);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        let done = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !done.load(Ordering::Relaxed) {
                sending.send_to(&sent.to_be_bytes(), addr)?;
                sent += 1;
                std::thread::sleep(interval);
            }
            Ok(sent)
        });
        UdpProbe {
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending; (sent, received) once the last datagram had time to land.
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .sender
            .join()
            .unwrap()
            .expect("the probe's sender failed");
        let received = self
            .receiver
            .join()
            .unwrap()
            .expect("the probe's receiver failed");
        (sent, received)
    }
}
