//! What a request is refused on before any work: a missing key before its body is read, a
//! request from another site's page, and what the model's worker would refuse (the family's
//! resolution of the request's run, the cache over the plan; the size guard stays the worker's),
//! so that a bad request is a 400 at once rather than a failed job after the queue. Messages never
//! carry the server's paths.

use super::error::{authorize, from_run, ApiError};
use super::model::Served;
use super::App;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use magcache_core::BuildEnv;
use std::sync::Arc;

/// The key, checked before a keyed route's handler reads the body (a client without the key
/// cannot make the server buffer a 16 MB body).
pub(crate) async fn require_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Err(e) = authorize(&app, req.headers()) {
        app.metrics
            .request(route_of(req.uri().path()), e.status.as_u16());
        return e.into_response();
    }
    next.run(req).await
}

/// A keyed path's route, as the handlers count it in the metrics (ids as `{id}`).
fn route_of(path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "v1", "images", "generations"] => "/v1/images/generations",
        ["", "v1", "videos"] => "/v1/videos",
        ["", "v1", "videos", _] => "/v1/videos/{id}",
        ["", "v1", "videos", _, "content"] => "/v1/videos/{id}/content",
        ["", "v1", "models"] => "/v1/models",
        ["", "v1", "models", _] => "/v1/models/{id}",
        _ => "(other)",
    }
}

/// The host of a `Host` header or of an `Origin`'s authority (`127.0.0.1`, `[::1]`, `localhost`),
/// lowercased, and its port where it names one.
fn split_authority(authority: &str) -> (String, Option<u16>) {
    let a = authority.trim().to_ascii_lowercase();
    let (host, rest) = match a.strip_prefix('[').and_then(|r| r.find(']')) {
        Some(end) => (a[..end + 2].to_string(), &a[end + 2..]),
        None => match a.split_once(':') {
            Some((h, _)) => (h.to_string(), &a[h.len()..]),
            None => (a.clone(), ""),
        },
    };
    (host, rest.strip_prefix(':').and_then(|p| p.parse().ok()))
}

/// Whether `host` (from [`split_authority`]) names this machine's loopback interface.
fn loopback_name(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the server may be reached from: whether it listens on loopback only, and the host names
/// it answers besides loopback names (`--host`'s name, `--allow-host`'s).
pub(crate) struct Reach {
    pub loopback: bool,
    /// `--allow-host`: answered as `Host` and accepted as a page's `Origin`.
    pub hosts: Vec<String>,
    /// The name the server was told to listen on (`--host`): answered as `Host` only. A page's
    /// `Origin` must match the `Host` it sent to, port and scheme's port included: another page
    /// on 127.0.0.1 is another site.
    pub own: String,
}

/// Why a request is refused as another site's, if it is: a browser page of another origin (its
/// `Origin`, scheme's port included, is not the `Host` it sent to and not an allowed host: a
/// cross-site form or fetch, which needs no CORS to be sent), or, on a server bound to loopback,
/// a `Host` that is neither a loopback name nor an allowed one (a page whose own name was made to
/// resolve to 127.0.0.1: DNS rebinding). Clients that are not browsers send no `Origin`.
pub(crate) fn foreign(headers: &HeaderMap, reach: &Reach) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let (host_name, host_port) = split_authority(host);
    let allowed = |h: &str| reach.hosts.iter().any(|a| a == h);
    if reach.loopback
        && !loopback_name(&host_name)
        && !allowed(&host_name)
        && host_name != reach.own
    {
        return Some(format!(
            "Host `{host}`: this server listens on loopback and answers loopback names and its allowed hosts only (--allow-host)"
        ));
    }
    let o = headers.get(header::ORIGIN)?.to_str().unwrap_or_default();
    let refused = || {
        Some(format!(
            "Origin `{o}`: requests from another site's page are refused (--allow-host names the sites a server answers)"
        ))
    };
    let Some((scheme, authority)) = o.split_once("://") else {
        return refused();
    };
    let (name, port) = split_authority(authority);
    let default = match scheme {
        "https" => 443,
        _ => 80,
    };
    let same = name == host_name && port.unwrap_or(default) == host_port.unwrap_or(default);
    match same || (!name.is_empty() && allowed(&name)) {
        true => None,
        false => refused(),
    }
}

/// Refuses another site's requests ([`foreign`]) with 403 before anything else.
pub(crate) async fn same_origin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(why) = foreign(req.headers(), &app.reach) {
        app.metrics.request("(other)", 403);
        return ApiError {
            code: Some("forbidden"),
            ..ApiError::new(StatusCode::FORBIDDEN, why)
        }
        .into_response();
    }
    // A body announced past the limit is refused before any of it is read (and before a client
    // that sent `Expect: 100-continue` is told to send it).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > super::BODY_LIMIT as u64) {
        app.metrics.request("(other)", 413);
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body's Content-Length {n} is past the server's limit of {} bytes",
                super::BODY_LIMIT
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// `msg` without the server's paths ([`scrub_paths`] for model `m`).
pub(crate) fn scrub(msg: &str, m: &Served) -> String {
    scrub_paths(msg, &m.path, &m.id)
}

/// [`scrub`] of the model `id` served from the run file `path`: the run file (as given and
/// absolute) is the model, and any absolute path is cut to its file name (the run file's folder,
/// a checkpoint's, the hub cache, the server's folder of first frames).
pub(crate) fn scrub_paths(msg: &str, path: &std::path::Path, id: &str) -> String {
    let mut out = msg.to_string();
    let mut files = vec![std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())];
    files.extend(path.canonicalize().ok());
    if path.components().count() > 1 {
        files.push(path.to_path_buf());
    }
    for f in files {
        out = out.replace(&f.display().to_string(), &format!("model `{id}`"));
    }
    // An absolute path: a `/` at the start or after a space, quote or parenthesis, up to the next
    // such; kept as its last component.
    let mut cut = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find('/') {
        let starts = i == 0 || rest[..i].ends_with([' ', '`', '"', '\'', '(', '=']);
        if !starts {
            cut.push_str(&rest[..=i]);
            rest = &rest[i + 1..];
            continue;
        }
        cut.push_str(&rest[..i]);
        let end = rest[i..]
            .find([' ', '`', '"', '\'', ')', ',', ';'])
            .map_or(rest.len(), |e| i + e);
        let p = rest[i..end].trim_end_matches([':', '.']);
        let name = p.rsplit('/').find(|s| !s.is_empty()).unwrap_or("");
        cut.push_str(&format!("…/{name}"));
        rest = &rest[i + p.len()..];
    }
    cut.push_str(rest);
    cut
}

/// What the worker would refuse for the request's run `text`, checked now: the family's
/// resolution (its keys, sizes, frames, first frame) and the cache built and begun over the plan.
/// The size guard stays the worker's: it judges the memory free when the job's turn comes, not
/// while the model's current job holds its own. An error naming no request field stays a 500.
pub(crate) fn precheck(m: &Served, text: &str) -> Result<(), ApiError> {
    let run = || -> magcache_core::Result<()> {
        let (cfg, file, base, fam) = crate::prepare::resolve_text(text, &m.path)?;
        let magcache_core::RunPlan { plan, info, .. } = (fam.plan)(&cfg, &file, &base)?;
        let env = BuildEnv {
            file: &file,
            base_dir: &base,
            model: &info,
        };
        if let Some(mut cache) = cfg.strategy().build(&env)? {
            cache.begin_generation(&plan)?;
        }
        Ok(())
    };
    run().map_err(|e| {
        let mut e = from_run(e);
        e.message = scrub(&e.message, m);
        e
    })
}

/// [`precheck`] of model `id` on a blocking thread (it reads configs, and a first frame, from
/// disk): the async threads keep answering meanwhile.
pub(crate) async fn precheck_off_thread(
    app: &Arc<App>,
    id: &str,
    text: &str,
) -> Result<(), ApiError> {
    let (app, id, text) = (app.clone(), id.to_string(), text.to_string());
    tokio::task::spawn_blocking(move || precheck(app.model(&id)?, &text))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    fn reach(loopback: bool, hosts: &[&str]) -> Reach {
        Reach {
            loopback,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            own: "127.0.0.1".into(),
        }
    }

    #[test]
    fn another_sites_pages_are_told_apart_from_clients_and_the_own_page() {
        let lo = reach(true, &[]);
        // Clients (no Origin) and the server's own page, on loopback names.
        for host in [
            "127.0.0.1:8000",
            "localhost:8000",
            "[::1]:8000",
            "127.0.0.1",
        ] {
            assert_eq!(foreign(&headers(host, None), &lo), None, "{host}");
        }
        let own = headers("127.0.0.1:8000", Some("http://127.0.0.1:8000"));
        assert_eq!(foreign(&own, &lo), None);
        let v6 = headers("[::1]:8000", Some("http://[::1]:8000"));
        assert_eq!(foreign(&v6, &lo), None);
        // Another page on this machine (another port), and a cross-site page.
        let other_port = headers("localhost:8000", Some("http://localhost:3000"));
        assert!(foreign(&other_port, &lo).unwrap().contains("another site"));
        // The same on the server's own `--host` name (127.0.0.1): another port, or the scheme's
        // default one.
        for page in [
            "http://127.0.0.1:3000",
            "http://127.0.0.1",
            "https://127.0.0.1",
        ] {
            let h = headers("127.0.0.1:8000", Some(page));
            assert!(foreign(&h, &lo).unwrap().contains("another site"), "{page}");
        }
        let cross = headers("127.0.0.1:8000", Some("http://attacker.example"));
        assert!(foreign(&cross, &lo).unwrap().contains("another site"));
        assert!(foreign(&headers("h:1", Some("null")), &reach(false, &[])).is_some());
        // Default ports: `Host: h` is `http://h:80`.
        let default = headers("h", Some("http://h:80"));
        assert_eq!(foreign(&default, &reach(false, &[])), None);
        // DNS rebinding: the page's own name resolved to loopback (Origin and Host agree).
        let rebound = headers(
            "attacker.example:8000",
            Some("http://attacker.example:8000"),
        );
        assert!(foreign(&rebound, &lo).unwrap().contains("Host"));
        // Bound elsewhere (`--host 0.0.0.0`), any Host; another site's page still refused.
        let open = reach(false, &[]);
        assert_eq!(foreign(&headers("gpu-box:8000", None), &open), None);
        assert_eq!(foreign(&rebound, &open), None);
        assert!(foreign(&cross, &open).is_some());
        // Behind a reverse proxy: the public name allowed as Host and as the page's origin.
        let proxied = reach(true, &["images.example.com"]);
        let via_caddy = headers("images.example.com", Some("https://images.example.com"));
        assert_eq!(foreign(&via_caddy, &proxied), None);
        let via_nginx = headers("127.0.0.1:8000", Some("https://images.example.com"));
        assert_eq!(foreign(&via_nginx, &proxied), None);
        assert!(foreign(&cross, &proxied).is_some());
    }

    #[test]
    fn server_paths_are_cut_from_messages() {
        let p = std::path::Path::new("/srv/runs/wan.toml");
        let m = scrub_paths(
            "/srv/runs/wan.toml:3: inputs.image: /tmp/magcache-serve-1/video_1.img: not a picture; num_frames 1..=1001 (\"/data/ckpt/model.safetensors\")",
            p,
            "wan",
        );
        assert_eq!(
            m,
            "model `wan`:3: inputs.image: …/video_1.img: not a picture; num_frames 1..=1001 (\"…/model.safetensors\")"
        );
        // A relative run file given with its folder, and words that hold the folder's name.
        let m = scrub_paths(
            "wan/run.toml: wan2.1 needs 1..=4",
            std::path::Path::new("wan/run.toml"),
            "r",
        );
        assert_eq!(m, "model `r`: wan2.1 needs 1..=4");
    }
}
