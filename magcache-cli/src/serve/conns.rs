//! The accept loop: each connection served by hyper's HTTP/1 with a deadline on its request
//! headers, then drained on shutdown.
//!
//! Why not `axum::serve`: it builds hyper's connections without a timer, so hyper's header read
//! timeout never fires (a client that opens connections and never finishes its headers holds each
//! one, and a task, for ever).
//!
//! Half-closed connections stay unanswered, as under `axum::serve`: a client that shuts its
//! writing side after its request (`nc -N`) reads to the server as one that hung up, and a hung-up
//! client's picture job is cancelled at once (the worker is freed within a call). Answering
//! half-closes (hyper's `half_close`) would run every abandoned job to its end instead.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;

/// How long a client may take to send a request's headers (hyper's own default) before its
/// connection is closed.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `stop` completes, then stops accepting and waits for the
/// open connections to finish their requests (each told to close after its current answer), or
/// for `deadline`, whichever comes first; `true` when `deadline` cut them off.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
    deadline: impl Future<Output = ()>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut stop = std::pin::pin!(stop);
    // Accept errors that are not one connection's: said on stderr, once per 10 s at most.
    let (mut failed, mut said) = (0u64, None::<std::time::Instant>);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = TowerToHyperService::new(router.clone());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let watched = graceful.watch(conn);
                    tokio::spawn(async move {
                        // A connection's own errors (reset, a malformed request, the header
                        // deadline) end that connection alone.
                        let _ = watched.await;
                    });
                }
                // Per-connection failures (ECONNABORTED, ...) pass; out of descriptors or memory,
                // wait a moment rather than spin, as axum does, and say so.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    failed += 1;
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        eprintln!("serve: cannot accept connections ({failed} times so far): {e}");
                        said = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            },
            () = &mut stop => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => false,
        () = deadline => true,
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    /// A running [`serve`] on a loopback port: `/` answers at once, `/slow` after 500 ms.
    struct Running {
        addr: std::net::SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        /// What `serve` returned: whether the deadline cut connections off.
        done: Option<std::thread::JoinHandle<bool>>,
    }

    impl Running {
        /// `deadline`: how long after the stop the open connections are cut off (none: never).
        fn start(header_timeout: Duration, deadline: Option<Duration>) -> Running {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
            let done = std::thread::spawn(move || {
                let router = Router::new()
                    .route("/", axum::routing::get(|| async { "hello" }))
                    .route(
                        "/slow",
                        axum::routing::get(|| async {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            "slow hello"
                        }),
                    );
                let stop = async move {
                    let _ = rx.await;
                    let _ = stopped_tx.send(());
                };
                let deadline = async move {
                    let _ = stopped_rx.await;
                    match deadline {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                rt.block_on(serve(listener, router, header_timeout, stop, deadline))
            });
            Running {
                addr,
                stop: Some(tx),
                done: Some(done),
            }
        }

        fn connect(&self) -> TcpStream {
            let s = TcpStream::connect(self.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        }

        fn stop(&mut self) {
            self.stop.take().unwrap().send(()).unwrap();
        }

        /// Waits for `serve` to return (within 5 s) and gives what it returned.
        fn returned(&mut self) -> bool {
            let t = Instant::now();
            let done = self.done.take().unwrap();
            while !done.is_finished() {
                assert!(t.elapsed() < Duration::from_secs(5), "serve did not return");
                std::thread::sleep(Duration::from_millis(10));
            }
            done.join().unwrap()
        }
    }

    /// Everything until the server closes the connection, and how long that took; an error if it
    /// was not closed within the read timeout.
    fn until_closed(s: &mut TcpStream) -> (String, Duration) {
        let t = Instant::now();
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .expect("the server closed the connection");
        (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
    }

    /// A client that never finishes its headers is cut off at the deadline (it held the
    /// connection for ever under `axum::serve`); a whole request on the next connection is
    /// answered.
    #[test]
    fn unfinished_headers_are_cut_off_at_the_deadline() {
        let srv = Running::start(Duration::from_millis(300), None);
        let mut slow = srv.connect();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        let (got, took) = until_closed(&mut slow);
        assert!(took < Duration::from_secs(5), "held {took:?}");
        assert!(!got.contains("hello"), "{got}");
        let mut ok = srv.connect();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (got, _) = until_closed(&mut ok);
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("hello"),
            "{got}"
        );
    }

    /// At the stop: the listener closes, a request in flight gets its answer and then its
    /// connection is closed, an idle keep-alive connection is closed at once, and `serve`
    /// returns without the deadline.
    #[test]
    fn stop_answers_requests_in_flight_and_closes_idle_connections() {
        let mut srv = Running::start(HEADER_READ_TIMEOUT, None);
        let mut idle = srv.connect();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let mut busy = srv.connect();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        srv.stop();
        let (rest, took) = until_closed(&mut idle);
        assert!(rest.ends_with("hello"), "{rest}");
        assert!(
            took < Duration::from_secs(1),
            "the idle connection stayed {took:?}"
        );
        let (answer, _) = until_closed(&mut busy);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow hello"),
            "{answer}"
        );
        assert!(!srv.returned(), "the deadline cut connections off");
        assert!(TcpStream::connect(srv.addr).is_err(), "still accepting");
    }

    /// A connection that never finishes its request holds the drain until the deadline, which
    /// closes it: `serve` returns, saying so.
    #[test]
    fn the_deadline_closes_a_stalled_connection() {
        let mut srv = Running::start(Duration::from_secs(60), Some(Duration::from_millis(300)));
        let mut stalled = srv.connect();
        stalled
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        srv.stop();
        assert!(srv.returned(), "serve returned before its deadline");
        let (got, took) = until_closed(&mut stalled);
        assert!(took < Duration::from_secs(5), "held {took:?}");
        assert!(!got.contains("hello"), "{got}");
    }
}
