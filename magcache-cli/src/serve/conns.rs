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
                // wait a moment rather than spin, as axum does.
                Err(e) if is_connection_error(&e) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
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

    /// A server of one route on a loopback port, with the given header deadline; it stops when
    /// the returned sender is dropped or sent to.
    fn start(header_timeout: Duration) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
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
        std::thread::spawn(move || {
            let router = Router::new().route("/", axum::routing::get(|| async { "hello" }));
            let stop = async move {
                let _ = rx.await;
            };
            rt.block_on(serve(
                listener,
                router,
                header_timeout,
                stop,
                std::future::pending(),
            ));
        });
        (addr, tx)
    }

    fn read_all(s: &mut TcpStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A client that never finishes its headers is cut off at the deadline (it held the
    /// connection for ever under `axum::serve`); a whole request on the next connection is
    /// answered.
    #[test]
    fn unfinished_headers_are_cut_off_at_the_deadline() {
        let (addr, _stop) = start(Duration::from_millis(300));
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        let t = std::time::Instant::now();
        let got = read_all(&mut slow);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "held {:?}",
            t.elapsed()
        );
        assert!(!got.contains("hello"), "{got}");
        let mut ok = TcpStream::connect(addr).unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let got = read_all(&mut ok);
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("hello"),
            "{got}"
        );
    }

    /// After `stop`, new connections are refused and an open idle one is closed.
    #[test]
    fn stop_closes_the_listener_and_idle_connections() {
        let (addr, stop) = start(HEADER_READ_TIMEOUT);
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 12];
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        idle.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        stop.send(()).unwrap();
        let rest = read_all(&mut idle);
        assert!(rest.ends_with("hello"), "{rest}");
        let t = std::time::Instant::now();
        while TcpStream::connect(addr).is_ok() {
            assert!(t.elapsed() < Duration::from_secs(5), "still accepting");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
