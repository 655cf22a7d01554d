//! `magcache serve`: each run file one model, built once at start (size guard first) and kept warm
//! ([`magcache_layers::weights::warm`]: its weights and the last prompts' embeddings), behind
//! OpenAI's HTTP shapes (docs/serve.md). axum on tokio answers; each model's jobs run one at a time
//! on its own worker thread, from a bounded queue (past it: 429).

mod api;
mod checks;
mod conns;
mod error;
mod metrics;
mod model;
mod videos;

use crate::args::ServeArgs;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use magcache_core::{Error, Result};
use metrics::Metrics;
use model::Served;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Request bodies up to this many bytes (a prompt, or a first frame as a `data:` URL).
pub(crate) const BODY_LIMIT: usize = 16 << 20;

/// What the handlers share.
pub(crate) struct App {
    models: Vec<Served>,
    api_key: Option<String>,
    /// Where requests may come from (`checks::foreign`).
    reach: checks::Reach,
    metrics: Arc<Metrics>,
    /// The cancel flags of the jobs in flight (set on shutdown).
    inflight: Mutex<Vec<Weak<AtomicBool>>>,
    /// Set on shutdown: a job whose request was still being read then is cancelled as it comes.
    shutting_down: AtomicBool,
    /// Video jobs by id.
    videos: Mutex<std::collections::BTreeMap<String, videos::Video>>,
    /// The server's own folder for first frames sent with requests (removed at exit).
    tmp: std::path::PathBuf,
    ids: std::sync::atomic::AtomicU64,
}

impl App {
    fn model(&self, id: &str) -> std::result::Result<&Served, ApiError> {
        self.models.iter().find(|m| m.id == id).ok_or_else(|| {
            let known: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
            ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    format!("no model `{id}` (served: {})", known.join(", ")),
                )
            }
        })
    }

    /// A new job id.
    fn next_id(&self) -> u64 {
        let n = self.ids.fetch_add(1, Ordering::SeqCst);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (t << 16) ^ n
    }

    /// Keeps a job's cancel flag, for shutdown.
    fn track(&self, cancel: &Arc<AtomicBool>) {
        if let Ok(mut v) = self.inflight.lock() {
            if self.shutting_down.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            }
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(cancel));
        }
    }

    /// Cancels every job in flight (each ends within one transformer call).
    fn cancel_all(&self) {
        if let Ok(v) = self.inflight.lock() {
            self.shutting_down.store(true, Ordering::SeqCst);
            for c in v.iter().filter_map(Weak::upgrade) {
                c.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Whether a job is still queued or running on some model's worker.
    fn busy(&self) -> bool {
        self.models
            .iter()
            .any(|m| m.depth.load(Ordering::SeqCst) > 0)
    }
}

/// After the jobs in flight have ended at shutdown, how long the answers they owe get to go out
/// before the connections still open (a client stalled mid-upload, a slow reader) are closed.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The longest a shutdown waits for the cancelled jobs (each ends within one call or block; a
/// stuck one does not hold the process past this).
const SHUTDOWN_JOBS: std::time::Duration = std::time::Duration::from_secs(120);

/// The server's options: the command line's, else the first run file's `[serve]` table's.
struct Options {
    host: String,
    port: u16,
    api_key: Option<String>,
    max_queue: usize,
    /// `--allow-host`, else `[serve] allow_hosts` (lowercased).
    allow_hosts: Vec<String>,
    /// Each run file and its `[serve] id`.
    models: Vec<(std::path::PathBuf, Option<String>)>,
}

fn options(a: ServeArgs) -> Result<Options> {
    let mut o = Options {
        host: String::new(),
        port: 0,
        api_key: a.api_key,
        max_queue: 0,
        allow_hosts: a.allow_host,
        models: Vec::new(),
    };
    let (mut host, mut port, mut queue) = (a.host, a.port, a.max_queue);
    for path in a.config {
        let file = path.display().to_string();
        let doc: toml::Table =
            magcache_core::error::read_text(&path)?
                .parse()
                .map_err(|e: toml::de::Error| {
                    Error::config(&file, "(document)", e.message().to_string())
                })?;
        let t = match doc.get("serve") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => return Err(Error::config(&file, "serve", "must be a table")),
        };
        let text = |k: &str| -> Result<Option<String>> {
            t.get(k)
                .map(|v| {
                    v.as_str().map(String::from).ok_or_else(|| {
                        Error::config(&file, format!("serve.{k}"), "must be a string")
                    })
                })
                .transpose()
        };
        let int = |k: &str, min: i64, max: i64| -> Result<Option<i64>> {
            t.get(k)
                .map(|v| {
                    v.as_integer()
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            Error::config(
                                &file,
                                format!("serve.{k}"),
                                format!("must be an integer {min}..={max}"),
                            )
                        })
                })
                .transpose()
        };
        host = host.or(text("host")?);
        if o.allow_hosts.is_empty() {
            if let Some(v) = t.get("allow_hosts") {
                let names = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|n| n.as_str().map(String::from))
                        .collect::<Option<Vec<_>>>()
                });
                o.allow_hosts = names.ok_or_else(|| {
                    Error::config(&file, "serve.allow_hosts", "must be an array of host names")
                })?;
            }
        }
        o.api_key = o.api_key.or(text("api_key")?);
        port = port.or(int("port", 0, 65535)?.map(|p| p as u16));
        queue = queue.or(int("max_queue", 1, 1 << 20)?.map(|q| q as usize));
        let id = text("id")?;
        model_id(&file, &path, id.as_deref())?;
        o.models.push((path, id));
    }
    distinct_ids(&o.models)?;
    o.host = host.unwrap_or_else(|| "127.0.0.1".into());
    o.port = port.unwrap_or(8000);
    o.max_queue = queue.unwrap_or(16);
    // An empty key (an empty MAGCACHE_API_KEY) or one with whitespace could never be sent in an
    // `Authorization: Bearer KEY` header: every request would be refused.
    if let Some(k) = &o.api_key {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::msg(
                "serve: the API key (--api-key, MAGCACHE_API_KEY or serve.api_key) is empty or holds spaces, control or non-ASCII characters, which an `Authorization: Bearer KEY` header cannot carry; give one without them, or none to serve without one",
            ));
        }
    }
    o.allow_hosts = o
        .allow_hosts
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    Ok(o)
}

/// Refuses two run files served under one id (`[serve] id`, else the file's name), before any
/// model loads.
fn distinct_ids(models: &[(std::path::PathBuf, Option<String>)]) -> Result<()> {
    let ids: Vec<(String, &std::path::Path)> = models
        .iter()
        .map(|(p, id)| (id.clone().unwrap_or_else(|| stem(p)), p.as_path()))
        .collect();
    for (i, (id, p)) in ids.iter().enumerate() {
        if let Some((_, other)) = ids[..i].iter().find(|(x, _)| x == id) {
            return Err(Error::msg(format!(
                "serve: {} and {} would both be model `{id}` (rename one file, or set [serve] id)",
                other.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// A run file's default model id: its name without the extension.
pub(crate) fn stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Checks the id a run file is served as (`[serve] id`, else the file's name without its
/// extension): what a request's `model` names and one path segment of `/v1/models/{id}`, so 1 to
/// 128 characters, no `/`, no control characters, no space at either end. An error names
/// `serve.id`, or the file to rename.
fn model_id(file: &str, path: &std::path::Path, id: Option<&str>) -> Result<()> {
    // The id the model is served as (`stem`: "model" for a path without a name, which fits).
    let (id, what) = match id {
        Some(id) => (id.to_string(), "serve.id"),
        None => (stem(path), "(file name)"),
    };
    let fits = |c: char| c != '/' && !c.is_control();
    if (1..=128).contains(&id.chars().count()) && id.trim() == id && id.chars().all(fits) {
        return Ok(());
    }
    let fix = match what {
        "serve.id" => "give another",
        _ => "rename the file, or set [serve] id",
    };
    Err(Error::config(
        file,
        what,
        format!("the model id {id:?} is empty, longer than 128 characters, or holds a `/`, a control character or a space at either end: requests name it as `model`, and /v1/models/{{id}} as one path segment; {fix}"),
    ))
}

/// The server's own folder for the first frames sent with requests: made fresh (a random name,
/// created only where nothing is, never through a link, private to the user) and removed with
/// what it holds when the server ends; nothing that was there before is used or removed.
fn tmp_dir() -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix("magcache-serve-");
    // Owner only: the pictures users send are theirs (tempfile's default is 0o777 less the umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o700));
    }
    b.tempdir().map_err(|e| {
        Error::msg(format!(
            "serve: cannot make a folder for request pictures in {}: {e}",
            std::env::temp_dir().display()
        ))
    })
}

/// Runs the server until SIGINT or SIGTERM (then jobs in flight are cancelled and it exits 0).
pub(crate) fn serve(a: ServeArgs) -> Result<()> {
    if a.config.is_empty() {
        return Err(Error::msg("serve: give at least one --config RUN.toml"));
    }
    let o = options(a)?;
    if o.max_queue == 0 {
        return Err(Error::msg(
            "serve: --max-queue (serve.max_queue) must be at least 1",
        ));
    }
    // The address is bound first (a port in use is said before minutes of loading, not after)
    // and listened on once every model is loaded: until then a connection is refused, not queued.
    let socket = bind(&o.host, o.port)?;
    crate::prepare::link_strategies();
    magcache_layers::weights::warm::keep_warm();
    let metrics = Arc::new(Metrics::default());
    let mut models: Vec<Served> = Vec::new();
    for (path, id) in &o.models {
        eprintln!("serve: loading {}", path.display());
        let m = Served::start(path, id.clone(), o.max_queue, metrics.clone())?;
        eprintln!("serve: model `{}` ({}) ready", m.id, m.family);
        models.push(m);
    }
    let kept = magcache_layers::weights::warm::kept_bytes();
    eprintln!("serve: {:.1} MB of weights kept warm", kept as f64 / 1e6);
    let tmp_folder = tmp_dir()?;
    let tmp = tmp_folder.path().to_path_buf();
    let app = Arc::new(App {
        models,
        api_key: o.api_key.clone(),
        reach: checks::Reach {
            // From the address bound, not the name given (`--host myhost` may be 127.0.1.1).
            loopback: socket.local_addr().is_ok_and(|a| a.ip().is_loopback()),
            hosts: o.allow_hosts.clone(),
            own: o.host.to_ascii_lowercase(),
        },
        metrics,
        inflight: Mutex::new(Vec::new()),
        shutting_down: AtomicBool::new(false),
        videos: Mutex::default(),
        tmp: tmp.clone(),
        ids: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::msg(format!("serve: {e}")))?;
    let served = rt.block_on(listen(app, socket));
    // Jobs cancelled at shutdown end within one call; their first frames go with the folder.
    drop(rt);
    drop(tmp_folder);
    served
}

/// A socket bound to `host:port` (not listening yet): the first of the host's addresses that
/// binds, as `TcpListener::bind` takes them.
fn bind(host: &str, port: u16) -> Result<tokio::net::TcpSocket> {
    use std::net::ToSocketAddrs;
    let addr = format!("{host}:{port}");
    let cannot = |e: std::io::Error| Error::msg(format!("serve: cannot listen on {addr}: {e}"));
    let fresh = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    let one = |a: std::net::SocketAddr| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = fresh(a)?;
        // Bound without SO_REUSEADDR first: on Linux two sockets that both set it may bind one
        // port while neither listens, so a second server starting beside a loading one would
        // load every model before its `listen` failed. Where that bind fails, as it does while a
        // restarted server's old connections linger in TIME_WAIT, again with it (std's and
        // tokio's listeners set it: a restarted server takes its port at once); a port another
        // server holds still refuses that bind, unless that server took the same fallback.
        if socket.bind(a).is_ok() {
            return Ok(socket);
        }
        let socket = fresh(a)?;
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(a)?;
        Ok(socket)
    };
    let mut last = None;
    for a in (host, port).to_socket_addrs().map_err(cannot)? {
        match one(a) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => cannot(e),
        None => Error::msg(format!("serve: cannot listen on {addr}: no address")),
    })
}

async fn listen(app: Arc<App>, socket: tokio::net::TcpSocket) -> Result<()> {
    let addr = socket
        .local_addr()
        .map_or_else(|_| "the address".to_string(), |a| a.to_string());
    let router = Router::new()
        .route("/v1/images/generations", post(api::images))
        .route("/v1/videos", post(videos::create).get(videos::list))
        .route(
            "/v1/videos/{id}",
            get(videos::retrieve).delete(videos::delete),
        )
        .route("/v1/videos/{id}/content", get(videos::content))
        .route("/v1/models", get(api::models))
        .route("/v1/models/{id}", get(api::model))
        // The key before a `/v1` handler reads its body.
        .route_layer(from_fn_with_state(app.clone(), checks::require_key))
        .route("/", get(api::page))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(from_fn_with_state(app.clone(), checks::same_origin))
        .with_state(app.clone());
    let listener = socket
        .listen(1024)
        .map_err(|e| Error::msg(format!("serve: cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::msg(format!("serve: {e}")))?;
    // The handlers go in before the address is printed: a SIGTERM sent as soon as it is read
    // (a test, a supervisor) shuts the server down cleanly instead of killing it.
    let signals = Signals::install();
    eprintln!("serve: listening on http://{local}");
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let cancel = app.clone();
    let shutdown = async move {
        signals.wait().await;
        eprintln!("serve: shutting down (cancelling jobs in flight)");
        cancel.cancel_all();
        let _ = signalled.send(());
    };
    // The graceful shutdown waits for every open connection; one that never completes its request
    // (a client stalled mid-upload) would hold the process forever. So once the cancelled jobs
    // have ended, the answers get `SHUTDOWN_GRACE` to go out, and whatever is still open is closed.
    let deadline = async move {
        if on_signal.await.is_err() {
            return std::future::pending().await;
        }
        let t = std::time::Instant::now();
        while app.busy() && t.elapsed() < SHUTDOWN_JOBS {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let header_timeout = conns::HEADER_READ_TIMEOUT;
    if conns::serve(listener, router, header_timeout, shutdown, deadline).await {
        eprintln!("serve: closing the connections still open");
    }
    Ok(())
}

/// SIGINT's and SIGTERM's handlers, registered when made (on Unix; elsewhere Ctrl-C's, when
/// first waited on).
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(i), Ok(t)) => Some((i, t)),
            _ => None,
        };
        Signals { streams }
    }

    #[cfg(not(unix))]
    fn install() -> Signals {
        Signals {}
    }

    /// Until one of the signals comes.
    async fn wait(self) {
        #[cfg(unix)]
        if let Some((mut i, mut t)) = self.streams {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    /// A server's port, bound and not yet listened on (its models loading), is its own: another
    /// socket cannot bind it, even one that sets SO_REUSEADDR (a second server would otherwise
    /// load every model before its `listen` failed).
    #[test]
    fn a_bound_port_is_held_while_the_models_load() {
        let held = super::bind("127.0.0.1", 0).unwrap();
        let port = held.local_addr().unwrap().port();
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.set_reuseaddr(true).unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(other.bind(addr).is_err(), "port {port} bound twice");
        assert!(super::bind("127.0.0.1", port).is_err());
    }
}
