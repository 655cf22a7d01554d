//! The HTTP side: OpenAI's request and error shapes, a request's keys laid over its model's run
//! file (checked exactly as a run file is), and the handlers.

use super::model::{seed_value, Job, Request, Served};
use super::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use magcache_core::{Error, RunConfig};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    /// The model's queue is full (429, `Retry-After`).
    pub fn busy(model: &str) -> Self {
        ApiError {
            code: Some("queue_full"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("model `{model}`: the queue is full; retry later"),
            )
        }
    }
    /// A body that is not JSON (or not an object): 400 with no `param`.
    pub fn body(e: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    }
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400 | 405 | 413 | 422 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message.replace('\n', " "),
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A run's error as a request's: the request field behind the run file key it names.
fn from_run(e: Error) -> ApiError {
    let (key, msg) = match &e {
        // The guard's refusal: the request's own knob is the size (the message says what else).
        Error::TooLarge { key, msg, .. } => return ApiError::bad("size", format!("{key}: {msg}")),
        Error::Config { key, msg, .. } => (key.clone(), msg.clone()),
        Error::Cancelled => {
            return ApiError {
                code: Some("cancelled"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the request was cancelled")
            }
        }
        _ => return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let param = if key.starts_with("cache") {
        "cache"
    } else if key.starts_with("sampling.steps") {
        "num_inference_steps"
    } else if key.starts_with("sampling.guidance") {
        "guidance_scale"
    } else if key.starts_with("inputs.height") || key.starts_with("inputs.width") {
        "size"
    } else if key == "prompt.negative" {
        "negative_prompt"
    } else if key.starts_with("prompt") {
        "prompt"
    } else if key.starts_with("inputs.seed") || key == "seed" {
        "seed"
    } else if key.starts_with("inputs.num_frames") {
        "num_frames"
    } else if key.starts_with("inputs.image") {
        "input_reference"
    } else {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    };
    // The key is the request's (laid over the run file, which was checked at start): said without
    // the run file's path and the line of the merged text, which would point into the user's file.
    ApiError::bad(param, format!("{key}: {msg}"))
}

/// Checks the `Authorization: Bearer KEY` header when the server has a key.
pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let mut words = v.split_ascii_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") => {
                    Some(token)
                }
                _ => None,
            }
        });
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer KEY)",
            )
        }),
    }
}

/// Whether a given key is the server's, in time that depends on the length only (not on where
/// the first differing byte is).
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// `WxH`, each side 1..=16384 (the size guard judges the rest).
fn parse_size(s: &str) -> Result<(u64, u64), ApiError> {
    let bad = || {
        ApiError::bad(
            "size",
            format!("`{s}` is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        )
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h): (u64, u64) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if !(1..=16384).contains(&w) || !(1..=16384).contains(&h) {
        return Err(ApiError::bad(
            "size",
            format!("`{s}`: each side must be 1..=16384 pixels"),
        ));
    }
    Ok((w, h))
}

/// The run file's table `name`, made when absent.
fn table<'a>(doc: &'a mut toml::Table, name: &str) -> Result<&'a mut toml::Table, ApiError> {
    if !doc.get(name).is_some_and(toml::Value::is_table) {
        doc.insert(name.into(), toml::Value::Table(Default::default()));
    }
    doc.get_mut(name)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("[{name}]")))
}

/// The model's run file with the request's keys: the text every picture of the request is run
/// from, checked as a run file is (errors name the request field).
pub(crate) fn request_text(
    m: &Served,
    r: &Request,
    inputs: toml::Table,
) -> Result<String, ApiError> {
    let file = m.path.display().to_string();
    let mut doc: toml::Table = toml::from_str(&m.text)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{file}: {e}")))?;
    if r.prompt.trim().is_empty() {
        return Err(ApiError::bad(
            "prompt",
            "prompt: must not be empty or blank",
        ));
    }
    let prompt = table(&mut doc, "prompt")?;
    prompt.insert("text".into(), r.prompt.clone().into());
    if let Some(n) = &r.negative_prompt {
        prompt.insert("negative".into(), n.clone().into());
    }
    if let Some(s) = &r.size {
        let (w, h) = parse_size(s)?;
        let inputs = table(&mut doc, "inputs")?;
        inputs.insert("width".into(), toml::Value::Integer(w as i64));
        inputs.insert("height".into(), toml::Value::Integer(h as i64));
    }
    if let Some(steps) = r.num_inference_steps {
        if !(1..=1000).contains(&steps) {
            return Err(ApiError::bad(
                "num_inference_steps",
                format!("num_inference_steps = {steps}: must be 1..=1000"),
            ));
        }
        table(&mut doc, "sampling")?.insert("steps".into(), toml::Value::Integer(steps as i64));
    }
    if let Some(g) = r.guidance_scale {
        if !g.is_finite() {
            return Err(ApiError::bad(
                "guidance_scale",
                "guidance_scale: must be a finite number",
            ));
        }
        table(&mut doc, "sampling")?.insert("guidance_scale".into(), g.into());
    }
    if let Some(c) = &r.cache {
        doc.insert("cache".into(), toml::Value::Table(c.clone()));
    }
    table(&mut doc, "inputs")?.extend(inputs);
    let text = toml::to_string(&doc)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let cfg = RunConfig::parse(&text, &file).map_err(from_run)?;
    cfg.validate(&file).map_err(from_run)?;
    Ok(text)
}

/// A request body as JSON (malformed JSON, unknown fields and bodies over the limit in OpenAI's
/// shape).
pub(crate) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Request, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        ApiError::new(status, e.body_text())
    })?;
    // The path of a field of the wrong type (`n`, `cache.threshold`) is its `param`; a body that
    // is not JSON, or not an object, has none.
    let mut de = serde_json::Deserializer::from_slice(&body);
    let r: Request = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." | "" => ApiError::body(&inner),
            // `param` is the request's field (`cache`), the message the whole path.
            p => ApiError::bad(
                p.split(['.', '[']).next().unwrap_or(p),
                format!("{p}: {inner}"),
            ),
        }
    })?;
    de.end().map_err(|e| ApiError::body(&e))?;
    Ok(r)
}

/// Sets the job's cancel flag when the request goes away (a client that disconnects).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `POST /v1/images/generations`.
pub(crate) async fn images(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate_images(&app, &headers, body).await;
    let status = match &r {
        Ok(_) => 200,
        Err(e) => e.status.as_u16(),
    };
    app.metrics.request("/v1/images/generations", status);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn generate_images(
    app: &App,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    authorize(app, headers)?;
    let r = parse_body(body)?;
    let m = app.model(&r.model)?;
    let n = r.n.unwrap_or(1);
    if !(1..=8).contains(&n) {
        return Err(ApiError::bad("n", format!("n = {n}: must be 1..=8")));
    }
    if r.response_format
        .as_deref()
        .is_some_and(|f| f != "b64_json")
    {
        return Err(ApiError::bad(
            "response_format",
            "only `b64_json` is served (no URLs)",
        ));
    }
    let text = request_text(m, &r, toml::Table::new())?;
    let seed = r.seed.unwrap_or(m.seed);
    seed_value(seed).map_err(from_run)?;
    let seeds: Vec<u64> = (0..n).map(|i| seed.wrapping_add(i)).collect();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    app.track(&cancel);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        text,
        seeds,
        cancel,
        video: None,
        reply: tx,
    };
    if !m.submit(job) {
        return Err(ApiError::busy(&m.id));
    }
    let pictures = rx
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model's worker stopped",
            )
        })?
        .map_err(from_run)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = pictures
        .iter()
        .map(|p| json!({"b64_json": b64.encode(&p.bytes)}))
        .collect();
    let figures: Vec<_> = pictures.iter().map(|p| &p.figures).collect();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(json!({"created": created, "data": data, "magcache": figures}))
}

/// `GET /v1/models`.
pub(crate) async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        app.metrics.request("/v1/models", e.status.as_u16());
        return e.into_response();
    }
    app.metrics.request("/v1/models", 200);
    let data: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            json!({"id": m.id, "object": "model", "created": 0, "owned_by": "magcache",
                   "family": m.family, "video": m.fps.is_some()})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /health`: 200 once every model is loaded (they are before the server listens).
pub(crate) async fn health(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/health", 200);
    Json(json!({"status": "ok", "models": app.models.len()})).into_response()
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let queue = app
        .models
        .iter()
        .map(|m| m.depth.load(Ordering::SeqCst))
        .sum();
    let text = app.metrics.text(queue);
    app.metrics.request("/metrics", 200);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /`: the page (served by the binary itself: no CDN, no build step).
pub(crate) async fn page(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/", 200);
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

/// Any other path.
pub(crate) async fn not_found(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("(other)", 404);
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").into_response()
}

/// A known path with a method it does not take (405; the router adds the `Allow` header).
pub(crate) async fn method_not_allowed(
    State(app): State<Arc<App>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    app.metrics.request("(other)", 405);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
    .into_response()
}
