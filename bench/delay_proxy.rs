//! A TCP proxy that adds latency, for benchmarks where `tc netem` is not available.
//!
//!     delay_proxy LISTEN_PORT UPSTREAM_HOST:PORT RTT_MS
//!
//! Every chunk of bytes is forwarded RTT/2 after it arrived, in each direction, so a
//! request/response exchange takes RTT longer, and a new connection's first bytes wait one
//! more RTT (its handshake). The delay does not limit bandwidth: chunks are queued and
//! forwarded in a pipeline. Each direction holds at most WINDOW bytes in flight, like a TCP
//! window, so one connection carries at most WINDOW / (RTT/2) bytes per second.
//!
//! Standard library only, so `rustc -O delay_proxy.rs` builds it in seconds (bench/remote.sh
//! does). Prints "listening PORT" once ready; runs until killed.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const WINDOW: usize = 4 << 20;
const CHUNK: usize = 256 << 10;

#[derive(Default)]
struct Queue {
    items: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// Forwards `from` to `to`, each chunk `delay` after it arrived (plus `first` for the first).
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, first: Duration) {
    let q = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let q2 = q.clone();
    thread::spawn(move || {
        let mut extra = first;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let (lock, cv) = &*q2;
            let mut g = lock.lock().unwrap();
            while n > 0 && g.bytes >= WINDOW {
                g = cv.wait(g).unwrap();
            }
            g.items.push_back((Instant::now() + delay + extra, buf[..n].to_vec()));
            g.bytes += n;
            extra = Duration::ZERO;
            cv.notify_all();
            if n == 0 {
                return;
            }
        }
    });
    thread::spawn(move || {
        let (lock, cv) = &*q;
        loop {
            let (due, data) = {
                let mut g = lock.lock().unwrap();
                loop {
                    if let Some(item) = g.items.pop_front() {
                        break item;
                    }
                    g = cv.wait(g).unwrap();
                }
            };
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if data.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&data).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            let mut g = lock.lock().unwrap();
            g.bytes -= data.len();
            cv.notify_all();
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delay_proxy LISTEN_PORT UPSTREAM_HOST:PORT RTT_MS");
        std::process::exit(2);
    }
    let rtt = Duration::from_secs_f64(args[3].parse::<f64>().expect("RTT_MS must be a number") / 1000.0);
    let listener = TcpListener::bind(("127.0.0.1", args[1].parse::<u16>().expect("bad port"))).expect("cannot listen");
    println!("listening {}", listener.local_addr().expect("address").port());
    let _ = std::io::stdout().flush();
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(&args[2]) else { continue };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
        pipe(client, server, rtt / 2, rtt);
        pipe(s2, c2, rtt / 2, Duration::ZERO);
    }
}
