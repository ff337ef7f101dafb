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
//! On Linux the bytes wait in pipes and move with splice(2), so the proxy does not copy them
//! through user space: it shares the machine with the client and the server it measures,
//! and should take as little of it as a router would. Elsewhere they are read and written.
//!
//! Standard library only, so `rustc -O delay_proxy.rs` builds it in seconds (bench/remote.sh
//! does). Prints "listening PORT" once ready; runs until killed.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const WINDOW: usize = 4 << 20;
const CHUNK: usize = 256 << 10;

/// Bytes that arrived together and wait for their time.
struct Held {
    due: Instant,
    len: usize,
    /// `None` marks the end of the stream.
    data: Option<chunk::Chunk>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Held>,
    bytes: usize,
    /// Chunks (pipes) ready to be used again.
    spare: Vec<chunk::Chunk>,
}

/// Forwards `from` to `to`, each chunk `delay` after it arrived (plus `first` for the first).
fn pipe(from: TcpStream, to: TcpStream, delay: Duration, first: Duration) {
    let q = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let q2 = q.clone();
    thread::spawn(move || {
        let mut extra = first;
        loop {
            let (lock, cv) = &*q2;
            let spare = {
                let mut g = lock.lock().unwrap();
                while g.bytes >= WINDOW {
                    g = cv.wait(g).unwrap();
                }
                g.spare.pop()
            };
            // No pipe to be had ends the stream like an error does, so the writer ends too.
            let mut c = match spare.map_or_else(chunk::Chunk::new, Ok) {
                Ok(c) => c,
                Err(_) => {
                    let mut g = lock.lock().unwrap();
                    g.items.push_back(Held { due: Instant::now(), len: 0, data: None });
                    cv.notify_all();
                    return;
                }
            };
            let n = c.fill(&from).unwrap_or(0);
            let mut g = lock.lock().unwrap();
            let due = Instant::now() + delay + extra;
            extra = Duration::ZERO;
            if n == 0 {
                g.items.push_back(Held { due, len: 0, data: None });
                cv.notify_all();
                return;
            }
            g.items.push_back(Held { due, len: n, data: Some(c) });
            g.bytes += n;
            cv.notify_all();
        }
    });
    thread::spawn(move || {
        let (lock, cv) = &*q;
        loop {
            let held = {
                let mut g = lock.lock().unwrap();
                loop {
                    if let Some(item) = g.items.pop_front() {
                        break item;
                    }
                    g = cv.wait(g).unwrap();
                }
            };
            let now = Instant::now();
            if held.due > now {
                thread::sleep(held.due - now);
            }
            let Some(mut c) = held.data else {
                let _ = to.shutdown(Shutdown::Write);
                return;
            };
            if c.drain(&to, held.len).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            let mut g = lock.lock().unwrap();
            g.bytes -= held.len;
            g.spare.push(c);
            cv.notify_all();
        }
    });
}

#[cfg(target_os = "linux")]
mod chunk {
    //! A chunk is a pipe: bytes are spliced from the socket into it and out of it again.
    use std::io;
    use std::net::TcpStream;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    extern "C" {
        fn pipe2(fds: *mut i32, flags: i32) -> i32;
        fn fcntl(fd: i32, cmd: i32, ...) -> i32;
        fn splice(fd_in: i32, off_in: *mut i64, fd_out: i32, off_out: *mut i64, len: usize, flags: u32) -> isize;
    }
    const O_CLOEXEC: i32 = 0o2000000;
    const F_SETPIPE_SZ: i32 = 1031;
    const SPLICE_F_MOVE: u32 = 1;

    pub struct Chunk {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Chunk {
        pub fn new() -> io::Result<Chunk> {
            let mut fds = [0i32; 2];
            if unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // Best effort: a smaller pipe only makes chunks smaller.
            unsafe { fcntl(write.as_raw_fd(), F_SETPIPE_SZ, super::CHUNK as i32) };
            Ok(Chunk { read, write })
        }

        /// Waits for bytes on `from` and moves what came (up to the pipe's size) into the
        /// pipe; 0 at the end of the stream.
        pub fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
            loop {
                let n = unsafe {
                    splice(
                        from.as_raw_fd(),
                        std::ptr::null_mut(),
                        self.write.as_raw_fd(),
                        std::ptr::null_mut(),
                        super::CHUNK,
                        SPLICE_F_MOVE,
                    )
                };
                if n >= 0 {
                    return Ok(n as usize);
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }

        /// Moves the `len` bytes the pipe holds to `to`.
        pub fn drain(&mut self, to: &TcpStream, mut len: usize) -> io::Result<()> {
            while len > 0 {
                let n = unsafe {
                    splice(
                        self.read.as_raw_fd(),
                        std::ptr::null_mut(),
                        to.as_raw_fd(),
                        std::ptr::null_mut(),
                        len,
                        SPLICE_F_MOVE,
                    )
                };
                if n > 0 {
                    len -= n as usize;
                    continue;
                }
                let e = if n == 0 { io::ErrorKind::WriteZero.into() } else { io::Error::last_os_error() };
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            Ok(())
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod chunk {
    //! A chunk is a buffer the bytes are read into and written from.
    use std::io::{self, Read, Write};
    use std::net::TcpStream;

    pub struct Chunk(Vec<u8>);

    impl Chunk {
        pub fn new() -> io::Result<Chunk> {
            Ok(Chunk(vec![0; super::CHUNK]))
        }

        pub fn fill(&mut self, mut from: &TcpStream) -> io::Result<usize> {
            from.read(&mut self.0)
        }

        pub fn drain(&mut self, mut to: &TcpStream, len: usize) -> io::Result<()> {
            to.write_all(&self.0[..len])
        }
    }
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
