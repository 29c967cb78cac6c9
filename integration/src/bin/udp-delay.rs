//! `udp-delay DELAY_US LISTEN=TARGET [LISTEN=TARGET …]`: a UDP relay that
//! adds DELAY_US microseconds each way (a round trip of twice that),
//! standing in for netem, which this kernel lacks and which must never go
//! on the host's `lo`. Each `LISTEN` address (a loopback address of the
//! test's own) forwards every datagram to `TARGET` after the delay, from a
//! socket of its own per sender, so the target's answers come back to that
//! sender through `LISTEN`, delayed too. Used by `bench/latency.sh`.
//!
//! Every listener has one sender thread: the delay is the same for every
//! datagram, so the queue is in due order and the thread sleeps until the
//! head is due. Sleeps overshoot by tens of microseconds; the script
//! measures the round trip it gets.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A datagram to send from `via` to `to` once `due`.
struct Out {
    due: Instant,
    via: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

fn sender(rx: std::sync::mpsc::Receiver<Out>) {
    for o in rx {
        let now = Instant::now();
        if o.due > now {
            std::thread::sleep(o.due - now);
        }
        let _ = o.via.send_to(&o.data, o.to);
    }
}

fn relay(listen: SocketAddr, target: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let front = Arc::new(UdpSocket::bind(listen)?);
    let (tx, rx) = channel::<Out>();
    std::thread::spawn(move || sender(rx));
    // One socket towards the target per sender, bound to the listen
    // address's IP (so a firewall rule on it catches both directions).
    let backs: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf)?;
        let due = Instant::now() + delay;
        let back = {
            let mut b = backs.lock().expect("relay map");
            match b.get(&from) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(UdpSocket::bind(SocketAddr::new(listen.ip(), 0))?);
                    b.insert(from, s.clone());
                    spawn_return(s.clone(), front.clone(), from, tx.clone(), delay);
                    s
                }
            }
        };
        let _ = tx.send(Out { due, via: back, to: target, data: buf[..n].to_vec() });
    }
}

/// Answers from the target to `client`, sent back through `front`.
fn spawn_return(back: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr, tx: Sender<Out>, delay: Duration) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, _)) = back.recv_from(&mut buf) {
            let due = Instant::now() + delay;
            if tx.send(Out { due, via: front.clone(), to: client, data: buf[..n].to_vec() }).is_err() {
                return;
            }
        }
    });
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: udp-delay DELAY_US LISTEN=TARGET [LISTEN=TARGET ...] (addresses as 127.0.0.31:7400)";
    let Some(delay) = args.first().and_then(|d| d.parse::<u64>().ok()) else {
        eprintln!("udp-delay: the first argument is the one-way delay in microseconds\n{usage}");
        return std::process::ExitCode::from(2);
    };
    let mut pairs = Vec::new();
    for a in &args[1..] {
        let parsed =
            a.split_once('=').and_then(|(l, t)| Some((l.parse::<SocketAddr>().ok()?, t.parse::<SocketAddr>().ok()?)));
        match parsed {
            Some((l, t)) if l.ip().is_loopback() && t.ip().is_loopback() => pairs.push((l, t)),
            Some(_) => {
                eprintln!("udp-delay: {a}: only loopback addresses (127.0.0.0/8) are relayed");
                return std::process::ExitCode::from(2);
            }
            None => {
                eprintln!("udp-delay: {a}: expected LISTEN=TARGET\n{usage}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if pairs.is_empty() {
        eprintln!("udp-delay: nothing to relay\n{usage}");
        return std::process::ExitCode::from(2);
    }
    let delay = Duration::from_micros(delay);
    let mut threads = Vec::new();
    for (l, t) in pairs {
        threads.push(std::thread::spawn(move || {
            if let Err(e) = relay(l, t, delay) {
                eprintln!("udp-delay: {l} -> {t}: {e}");
                std::process::exit(1);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    std::process::ExitCode::SUCCESS
}
