//! `/v1/videos`: video jobs in OpenAI's shapes. `POST` (multipart form as the `openai` client's
//! `videos.create` sends it, or JSON with `input_reference` as a `data:` URL) queues a job and
//! answers at once; `GET /v1/videos/{id}` follows it, `/content` returns the MP4, `DELETE` cancels
//! a job in flight (within one transformer call) or removes a finished one.

use super::api::request_text;
use super::error::{authorize, ApiError};
use super::model::{Figures, Job, Request};
use super::App;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

/// A video job as the server keeps it.
pub(crate) struct Video {
    id: String,
    model: String,
    size: String,
    created_at: u64,
    /// The order jobs were created in (lists are sorted by it).
    seq: u64,
    /// `queued`, `in_progress` (progress > 0), `completed`, `failed` or `cancelled`.
    status: &'static str,
    progress: Arc<AtomicU8>,
    cancel: Arc<AtomicBool>,
    mp4: Option<Vec<u8>>,
    figures: Option<Figures>,
    error: Option<String>,
}

impl Video {
    fn object(&self) -> Value {
        let progress = self.progress.load(Ordering::SeqCst);
        let status = match self.status {
            "queued" if progress > 0 => "in_progress",
            s => s,
        };
        json!({
            "id": self.id, "object": "video", "model": self.model, "status": status,
            "progress": progress, "created_at": self.created_at, "size": self.size,
            "error": self.error.as_ref().map(|m| json!({"message": m})),
            "magcache": self.figures,
        })
    }
}

/// The form's fields, from either body.
#[derive(Default)]
struct Fields {
    text: BTreeMap<String, String>,
    cache: Option<toml::Table>,
    reference: Option<Vec<u8>>,
}

/// The next job's [`Video::seq`].
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "size",
    "seconds",
    "num_frames",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "cache",
    "input_reference",
];

async fn fields(req: HttpRequest) -> Result<Fields, ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let mut f = Fields::default();
    if multipart {
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?
        {
            let name = field.name().unwrap_or("").to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            add(&mut f, &name, Field::Bytes(bytes))?;
        }
        return Ok(f);
    }
    let body = Bytes::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let Pairs(v) = serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?;
    for (k, v) in v {
        add(&mut f, &k, Field::Json(v))?;
    }
    Ok(f)
}

/// A JSON object's members in order, a key given twice kept twice (a map keeps the last one
/// silently; [`add`] refuses the second).
struct Pairs(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of the request's fields")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry::<String, Value>()? {
                    v.push(kv);
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(Members)
    }
}

enum Field {
    Bytes(Bytes),
    Json(Value),
}

/// The fields that are text (the others are numbers, which a form sends as text too).
const TEXT_FIELDS: &[&str] = &["model", "prompt", "size", "negative_prompt"];

fn add(f: &mut Fields, name: &str, v: Field) -> Result<(), ApiError> {
    if !FIELDS.contains(&name) {
        return Err(ApiError::bad(name, format!("unknown field `{name}`")));
    }
    let bad = |why: String| ApiError::bad(name, format!("{name}: {why}"));
    let twice = f.text.contains_key(name)
        || (name == "cache" && f.cache.is_some())
        || (name == "input_reference" && f.reference.is_some());
    if twice {
        return Err(bad("given twice".into()));
    }
    let text = |v: &Field| -> Result<String, ApiError> {
        match v {
            Field::Bytes(b) => {
                String::from_utf8(b.to_vec()).map_err(|_| bad("is not UTF-8 text".into()))
            }
            Field::Json(Value::String(s)) => Ok(s.clone()),
            Field::Json(Value::Number(n)) if !TEXT_FIELDS.contains(&name) => Ok(n.to_string()),
            Field::Json(other) if TEXT_FIELDS.contains(&name) => {
                Err(bad(format!("{other} is not a string")))
            }
            Field::Json(other) => Err(bad(format!("{other} is not a number"))),
        }
    };
    match (name, &v) {
        ("input_reference", Field::Bytes(b)) => f.reference = Some(b.to_vec()),
        ("input_reference", Field::Json(Value::String(s))) => {
            let data = s
                .split_once(";base64,")
                .filter(|(head, _)| head.starts_with("data:image/"))
                .map(|(_, d)| d)
                .ok_or_else(
                    || bad("a JSON body gives it as a data:image/...;base64, URL".into()),
                )?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| bad(format!("bad base64: {e}")))?;
            f.reference = Some(b);
        }
        ("input_reference", Field::Json(other)) => {
            return Err(bad(format!(
                "{other}: a JSON body gives it as a data:image/...;base64, URL string"
            )))
        }
        ("cache", Field::Json(Value::Object(o))) => f.cache = Some(cache_table(o)?),
        ("cache", _) => {
            let s = text(&v)?;
            let o = serde_json::from_str::<serde_json::Map<String, Value>>(&s).map_err(|e| {
                ApiError::bad(
                    name,
                    format!("cache: an object of [cache] keys as JSON: {e}"),
                )
            })?;
            f.cache = Some(cache_table(&o)?);
        }
        _ => {
            let t = text(&v)?;
            f.text.insert(name.to_string(), t);
        }
    }
    Ok(())
}

/// The `[cache]` keys of a request (a JSON object) as TOML; a value TOML has no form for (a
/// `null`) is named by its key.
fn cache_table(o: &serde_json::Map<String, Value>) -> Result<toml::Table, ApiError> {
    fn null_at(v: &Value, at: &str) -> Option<String> {
        match v {
            Value::Null => Some(at.to_string()),
            Value::Object(o) => o.iter().find_map(|(k, v)| null_at(v, &format!("{at}.{k}"))),
            Value::Array(a) => a.iter().find_map(|v| null_at(v, at)),
            _ => None,
        }
    }
    if let Some(at) = o
        .iter()
        .find_map(|(k, v)| null_at(v, &format!("cache.{k}")))
    {
        return Err(ApiError::bad(
            "cache",
            format!("{at}: null is not a value (leave the key out for its default)"),
        ));
    }
    toml::Table::try_from(o).map_err(|e| ApiError::bad("cache", format!("cache: {e}")))
}

fn number<T: std::str::FromStr>(f: &Fields, name: &str) -> Result<Option<T>, ApiError> {
    let kind = match std::any::type_name::<T>() {
        "f64" | "f32" => "a number",
        "i64" | "i32" => "a whole number",
        _ => "a whole number, 0 or more",
    };
    f.text
        .get(name)
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| ApiError::bad(name, format!("{name}: `{s}` is not {kind}")))
        })
        .transpose()
}

/// The request's run file text: the shared keys, then the frames and the first frame.
fn video_text(
    app: &App,
    f: &Fields,
    reference: Option<&std::path::Path>,
) -> Result<(String, String, u64), ApiError> {
    let model = f
        .text
        .get("model")
        .cloned()
        .ok_or_else(|| ApiError::bad("model", "model: missing (the id of a served model)"))?;
    let m = app.model(&model)?;
    let fps = m.fps.ok_or_else(|| {
        ApiError::bad(
            "model",
            format!("model `{model}` makes pictures (POST /v1/images/generations)"),
        )
    })?;
    let r = Request {
        model: model.clone(),
        prompt: f.text.get("prompt").cloned().unwrap_or_default(),
        negative_prompt: f.text.get("negative_prompt").cloned(),
        size: f.text.get("size").cloned(),
        seed: number(f, "seed")?,
        num_inference_steps: number(f, "num_inference_steps")?,
        guidance_scale: number(f, "guidance_scale")?,
        cache: f.cache.clone(),
        ..Default::default()
    };
    let frames: Option<u64> = match (
        number::<u64>(f, "num_frames")?,
        number::<f64>(f, "seconds")?,
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "seconds",
                "seconds: give num_frames or seconds, not both",
            ))
        }
        (Some(n), None) if !(1..=1001).contains(&n) => {
            return Err(ApiError::bad("num_frames", "num_frames: must be 1..=1001"))
        }
        (Some(n), None) => Some(n),
        (None, Some(s)) if s.is_finite() && s > 0.0 && s <= 60.0 => {
            // Wan takes 4k + 1 frames.
            let n = ((s * fps as f64 / 4.0).round() as u64).max(1) * 4 + 1;
            if n > 1001 {
                return Err(ApiError::bad(
                    "seconds",
                    format!("seconds: {s} s at this model's {fps} fps is {n} frames, past the 1001 a request may ask for"),
                ));
            }
            Some(n)
        }
        (None, Some(_)) => return Err(ApiError::bad("seconds", "seconds: must be in (0, 60]")),
        (None, None) => None,
    };
    let mut extra = toml::Table::new();
    if let Some(n) = frames {
        extra.insert("num_frames".into(), toml::Value::Integer(n as i64));
    }
    if let Some(p) = reference {
        extra.insert("image".into(), p.display().to_string().into());
    }
    let text = request_text(m, &r, extra)?;
    let seed = r.seed.unwrap_or(m.seed);
    super::model::seed_value(seed).map_err(super::error::from_run)?;
    let size = r.size.unwrap_or_else(|| run_size(&text));
    Ok((text, size, seed))
}

/// `WIDTHxHEIGHT` of a run's `[inputs]`, or empty where the run file leaves the size to the
/// model's default.
fn run_size(text: &str) -> String {
    let doc: toml::Table = text.parse().unwrap_or_default();
    let side = |k: &str| doc.get("inputs")?.get(k)?.as_integer();
    match (side("width"), side("height")) {
        (Some(w), Some(h)) => format!("{w}x{h}"),
        _ => String::new(),
    }
}

/// A request's first frame, written where the run file can name it (removed when the job ends),
/// and checked as a picture.
fn first_frame(app: &App, id: &str, bytes: &[u8]) -> Result<std::path::PathBuf, ApiError> {
    let p = app.tmp.join(format!("{id}.img"));
    std::fs::write(&p, bytes)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Err(e) = magcache_layers::picture::load_rgb8(&p, "request", "input_reference") {
        let _ = std::fs::remove_file(&p);
        // Said without the server's file the picture was written to.
        let msg = e.to_string().replace(&format!("{}: ", p.display()), "");
        return Err(ApiError::bad("input_reference", msg));
    }
    Ok(p)
}

/// `POST /v1/videos`.
pub(crate) async fn create(State(app): State<Arc<App>>, req: HttpRequest) -> Response {
    let r = create_job(&app, req).await;
    let status = r.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
    app.metrics.request("/v1/videos", status);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_job(app: &Arc<App>, req: HttpRequest) -> Result<Value, ApiError> {
    authorize(app, req.headers())?;
    let f = fields(req).await?;
    let id = format!("video_{:016x}", app.next_id());
    let reference = match &f.reference {
        Some(b) => Some(first_frame(app, &id, b)?),
        None => None,
    };
    let made = match video_text(app, &f, reference.as_deref()) {
        Ok((text, size, seed)) => {
            let model = f.text.get("model").cloned().unwrap_or_default();
            super::checks::precheck_off_thread(app, &model, &text)
                .await
                .map(|()| (text, size, seed))
        }
        Err(e) => Err(e),
    };
    let (text, size, seed) = match made {
        Ok(v) => v,
        Err(e) => {
            if let Some(p) = &reference {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    // `video_text` found the model.
    let model = f.text.get("model").cloned().unwrap_or_default();
    let m = app.model(&model)?;
    let video = Video {
        id: id.clone(),
        model,
        size,
        created_at: now(),
        seq: SEQ.fetch_add(1, Ordering::SeqCst),
        status: "queued",
        progress: Arc::new(AtomicU8::new(0)),
        cancel: Arc::new(AtomicBool::new(false)),
        mp4: None,
        figures: None,
        error: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        text,
        seeds: vec![seed],
        cancel: video.cancel.clone(),
        video: Some((video.progress.clone(), m.fps.unwrap_or(16))),
        reply: tx,
    };
    app.track(&video.cancel);
    let object = video.object();
    if let Ok(mut v) = app.videos.lock() {
        v.insert(id.clone(), video);
    }
    if !m.submit(job) {
        if let Ok(mut v) = app.videos.lock() {
            v.remove(&id);
        }
        if let Some(p) = &reference {
            let _ = std::fs::remove_file(p);
        }
        return Err(ApiError::busy(&m.id));
    }
    let app2 = app.clone();
    let (served_path, served_id) = (m.path.clone(), m.id.clone());
    tokio::spawn(async move {
        let out = rx.await;
        if let Some(p) = &reference {
            let _ = std::fs::remove_file(p);
        }
        let Ok(mut all) = app2.videos.lock() else {
            return;
        };
        let Some(v) = all.get_mut(&id) else {
            return;
        };
        match out {
            Ok(Ok(mut pics)) if !pics.is_empty() => {
                let p = pics.remove(0);
                v.status = "completed";
                v.progress.store(100, Ordering::SeqCst);
                v.mp4 = Some(p.bytes);
                v.figures = Some(p.figures);
            }
            Ok(Err(magcache_core::Error::Cancelled)) => v.status = "cancelled",
            Ok(Err(e)) => {
                v.status = "failed";
                let msg = super::checks::scrub_paths(&e.to_string(), &served_path, &served_id);
                v.error = Some(msg.replace('\n', " "));
            }
            _ => {
                v.status = "failed";
                v.error = Some("the model's worker stopped".into());
            }
        }
    });
    Ok(object)
}

/// Runs `f` on the job table once the key is checked; a job `f` does not find is a 404.
fn with_jobs(
    app: &App,
    headers: &HeaderMap,
    (route, id): (&str, &str),
    f: impl FnOnce(&mut BTreeMap<String, Video>) -> Option<Result<Response, ApiError>>,
) -> Response {
    let r = authorize(app, headers).and_then(|_| {
        let mut all = app.videos.lock().map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "video table poisoned")
        })?;
        f(&mut all).unwrap_or_else(|| {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no video `{id}`"),
            ))
        })
    });
    let r = r.unwrap_or_else(IntoResponse::into_response);
    app.metrics.request(route, r.status().as_u16());
    r
}

type Id = Path<String>;

/// `GET /v1/videos/{id}`.
pub(crate) async fn retrieve(State(app): State<Arc<App>>, Path(id): Id, h: HeaderMap) -> Response {
    with_jobs(&app, &h, ("/v1/videos/{id}", &id), |all| {
        all.get(&id).map(|v| Ok(Json(v.object()).into_response()))
    })
}

/// `GET /v1/videos/{id}/content`: the MP4 of a completed job.
pub(crate) async fn content(State(app): State<Arc<App>>, Path(id): Id, h: HeaderMap) -> Response {
    with_jobs(&app, &h, ("/v1/videos/{id}/content", &id), |all| {
        let v = all.get(&id)?;
        Some(match &v.mp4 {
            Some(mp4) => Ok(([(header::CONTENT_TYPE, "video/mp4")], mp4.clone()).into_response()),
            None => Err(ApiError::bad(
                "video_id",
                format!(
                    "video `{id}` is {}, not completed",
                    v.object()["status"].as_str().unwrap_or(v.status)
                ),
            )),
        })
    })
}

/// `DELETE /v1/videos/{id}`: cancels a job in flight, removes a finished one.
pub(crate) async fn delete(State(app): State<Arc<App>>, Path(id): Id, h: HeaderMap) -> Response {
    with_jobs(&app, &h, ("/v1/videos/{id}", &id), |all| {
        let v = all.get_mut(&id)?;
        if v.status == "queued" {
            v.cancel.store(true, Ordering::SeqCst);
            v.status = "cancelled";
            return Some(Ok(Json(v.object()).into_response()));
        }
        all.remove(&id)?;
        let gone = json!({"id": id, "object": "video.deleted", "deleted": true});
        Some(Ok(Json(gone).into_response()))
    })
}

/// `GET /v1/videos`'s query, as OpenAI's list endpoints take it.
#[derive(serde::Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/videos`: newest first (`order=asc`: oldest first), at most `limit` (1..=100, default
/// 20) after the job `after`, with `has_more` and the page's first and last ids.
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    with_jobs(&app, &h, ("/v1/videos", ""), |all| {
        let q = match &q {
            Ok(q) => q,
            Err(e) => {
                // Name the parameter serde's message is about (`limit=abc`, `limit=-1`).
                let text = e.body_text();
                let param = ["limit", "after", "order"]
                    .into_iter()
                    .find(|p| text.contains(&format!("`{p}`")))
                    .unwrap_or("query");
                let why = match param {
                    "limit" => "limit: must be a whole number 1..=100".to_string(),
                    _ => text,
                };
                return Some(Err(ApiError::bad(param, why)));
            }
        };
        Some(page(all, Some(q)).map(|v| Json(v).into_response()))
    })
}

fn page(all: &BTreeMap<String, Video>, q: Option<&ListQuery>) -> Result<Value, ApiError> {
    let limit = q.and_then(|q| q.limit).unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad("limit", "limit: must be 1..=100"));
    }
    let mut jobs: Vec<&Video> = all.values().collect();
    jobs.sort_by_key(|v| v.seq);
    match q.and_then(|q| q.order.as_deref()) {
        None | Some("desc") => jobs.reverse(),
        Some("asc") => {}
        Some(o) => return Err(ApiError::bad("order", format!("order `{o}`: asc or desc"))),
    }
    if let Some(after) = q.and_then(|q| q.after.as_deref()) {
        let at = jobs
            .iter()
            .position(|v| v.id == after)
            .ok_or_else(|| ApiError::bad("after", format!("no video `{after}`")))?;
        jobs.drain(..=at);
    }
    let has_more = jobs.len() > limit;
    jobs.truncate(limit);
    let data: Vec<Value> = jobs.iter().map(|v| v.object()).collect();
    Ok(json!({"object": "list", "data": data, "has_more": has_more,
              "first_id": jobs.first().map(|v| &v.id), "last_id": jobs.last().map(|v| &v.id)}))
}
