//! `magcache serve` through the real binary and plain HTTP on loopback (issue 43): a picture equal
//! to `magcache run --png`'s for the same seed, the prompt cache, bad requests each answered in
//! OpenAI's error shape while the server stays healthy, the API key, the bounded queue, the
//! metrics adding up, and SIGTERM ending it with exit 0.

mod common;

use common::{bin, s};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn fixture_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pipelines/flux_tiny_folder")
        .canonicalize()
        .unwrap()
}

/// A prompted FLUX.1 run file on the tiny folder, in `dir`, named `name.toml`.
fn run_file(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[model]\nfamily = \"flux\"\nweights = {:?}\n\n[prompt]\ntext = \"a photo of a tiny cat\"\nmax_sequence_length = 16\n\n[inputs]\nheight = 64\nwidth = 48\nseed = {seed}\n\n[sampling]\nsteps = 8\nguidance_scale = 3.5\n\n[cache]\nstrategy = \"fbcache\"\nthreshold = 0.5\n",
            s(&fixture_folder())
        ),
    )
    .unwrap();
    p
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        Server::start_with(args, &[])
    }

    /// As [`Server::start`], with environment variables set.
    fn start_with(args: &[&str], env: &[(&str, &Path)]) -> Server {
        let mut child = bin()
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("MAGCACHE_API_KEY")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the server printed its address")
                .unwrap();
            if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                break rest.trim().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, port }
    }

    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        http(self.port, method, path, headers, body)
    }

    fn json(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &str,
    ) -> (u16, serde_json::Value) {
        json(self.port, method, path, headers, body)
    }

    /// Sends SIGTERM and waits: the exit code.
    fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the server took over 10 s to stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One request on loopback; `(status, head, body)`.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    // A server refusing a body over its limit answers and closes before reading it all.
    let _ = c.write_all(body);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

/// One JSON request; `(status, JSON body)`.
fn json(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut h = vec!["Content-Type: application/json"];
    h.extend(headers);
    let (status, head, body) = http(port, method, path, &h, body.as_bytes());
    let body = dechunk(&head, &body);
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A body sent with `Transfer-Encoding: chunked`, joined.
fn dechunk(head: &str, body: &[u8]) -> Vec<u8> {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_vec();
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let n =
            usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend(&rest[eol + 2..eol + 2 + n]);
        rest = &rest[eol + 4 + n..];
    }
}

fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn b64(s: &str) -> Vec<u8> {
    // The standard alphabet with padding, as the server writes it.
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | table.iter().position(|&t| t == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn a_served_picture_is_the_run_s_picture_and_bad_requests_leave_it_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    let srv = Server::start(&["--config", s(&model)]);
    let (st, v) = srv.json("GET", "/health", &[], "");
    assert_eq!(st, 200, "{v}");
    let (st, v) = srv.json("GET", "/v1/models", &[], "");
    assert_eq!(
        (st, v["data"][0]["id"].as_str()),
        (200, Some("tiny")),
        "{v}"
    );

    // Two pictures, seeds 3 and 4: each equals `magcache run --png` with that seed.
    let req = r#"{"model": "tiny", "prompt": "a photo of a tiny cat", "n": 2, "size": "48x64", "seed": 3, "response_format": "b64_json"}"#;
    let (st, v) = srv.json("POST", "/v1/images/generations", &[], req);
    assert_eq!(st, 200, "{v}");
    let figs = v["magcache"].as_array().unwrap();
    assert_eq!(figs.len(), 2);
    for (i, seed) in [3u64, 4].into_iter().enumerate() {
        assert_eq!(figs[i]["seed"], seed);
        assert_eq!(figs[i]["strategy"], "fbcache");
        assert_eq!(figs[i]["calls"], 8);
        let computed = figs[i]["computed"].as_u64().unwrap();
        assert!((1..=8).contains(&computed), "{v}");
        let (w, h, served) = decode_png(&b64(v["data"][i]["b64_json"].as_str().unwrap()));
        assert_eq!((w, h), (48, 64));
        let own = run_file(dir.path(), &format!("seed{seed}"), seed);
        let png = dir.path().join(format!("run{seed}.png"));
        let o = bin()
            .args(["run", "--config", s(&own), "--png", s(&png), "--quiet"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (fw, _, framed) = decode_png(&std::fs::read(&png).unwrap());
        // `run --png` draws the picture inside a 2-pixel frame.
        for y in 0..h as usize {
            let row = ((2 + y) * fw as usize + 2) * 3;
            assert_eq!(
                &framed[row..row + 48 * 3],
                &served[y * 48 * 3..(y + 1) * 48 * 3],
                "seed {seed}, row {y}: the served picture differs from run --png's"
            );
        }
    }
    // The first picture encoded the prompt (or the warm-up did); the repeat is cached.
    let (st, v) = srv.json(
        "POST",
        "/v1/images/generations",
        &[],
        r#"{"model": "tiny", "prompt": "a photo of a tiny cat", "size": "48x64"}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["magcache"][0]["prompt_cached"], true, "{v}");

    let bad = |body: &str, status: u16, param: Option<&str>| {
        let (st, v) = srv.json("POST", "/v1/images/generations", &[], body);
        assert_eq!(st, status, "{body}: {v}");
        let e = &v["error"];
        let msg = e["message"].as_str().unwrap();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{v}");
        if let Some(p) = param {
            assert_eq!(e["param"].as_str(), Some(p), "{body}: {v}");
        }
    };
    bad("{not json", 400, None);
    bad(
        r#"{"model": "tiny", "prompt": "x", "colour": "red"}"#,
        400,
        None,
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "size": "0x0"}"#,
        400,
        Some("size"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "size": "100000x100000"}"#,
        400,
        Some("size"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "size": "16000x16000"}"#,
        400,
        Some("size"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "n": 1000}"#,
        400,
        Some("n"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "guidance_scale": NaN}"#,
        400,
        None,
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "cache": {"strategy": "bogus"}}"#,
        400,
        Some("cache"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "cache": {"strategy": "fbcache", "threshold": -1}}"#,
        400,
        Some("cache"),
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "seed": 18446744073709551615}"#,
        400,
        Some("seed"),
    );
    bad(r#"{"model": "nope", "prompt": "x"}"#, 404, Some("model"));
    let huge = format!(
        r#"{{"model": "tiny", "prompt": "{}"}}"#,
        "a".repeat(20 << 20)
    );
    bad(&huge, 413, None);
    let (st, _) = srv.json("GET", "/health", &[], "");
    assert_eq!(st, 200, "healthy after the bad requests");

    // /metrics adds up: 2 + 1 pictures generated (8 calls each), the requests by status.
    let (st, head, body) = srv.http("GET", "/metrics", &[], b"");
    assert_eq!(st, 200);
    let text = String::from_utf8(dechunk(&head, &body)).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .parse()
            .unwrap()
    };
    let calls = value("magcache_transformer_calls_total{kind=\"computed\"}")
        + value("magcache_transformer_calls_total{kind=\"reused\"}");
    assert_eq!(calls, 24.0, "{text}");
    assert_eq!(value("magcache_generation_seconds_count"), 3.0, "{text}");
    assert_eq!(
        value("magcache_requests_total{route=\"/v1/images/generations\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        value("magcache_requests_total{route=\"/v1/images/generations\",status=\"400\"}"),
        10.0
    );
    assert!(value("magcache_prompt_cache_hits_total") >= 1.0);
    assert_eq!(srv.stop(), Some(0));
}

#[test]
fn a_key_is_required_when_set_and_a_full_queue_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    // The options from the run file's `[serve]` table; `magcache run` takes the same file.
    let model = run_file(dir.path(), "tiny", 0);
    let text = std::fs::read_to_string(&model).unwrap();
    std::fs::write(
        &model,
        format!("{text}\n[serve]\nid = \"tiny\"\napi_key = \"sekrit\"\nmax_queue = 1\n"),
    )
    .unwrap();
    let o = bin()
        .args(["run", "--config", s(&model), "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let srv = Server::start(&["--config", s(&model)]);
    let (st, v) = srv.json("GET", "/v1/models", &[], "");
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    let (st, _) = srv.json("GET", "/v1/models", &["Authorization: Bearer wrong"], "");
    assert_eq!(st, 401);
    let (st, _) = srv.json("GET", "/v1/models", &["Authorization: Bearer sekrit"], "");
    assert_eq!(st, 200);

    // Long jobs from six clients at once: one runs, one waits, the rest are told to retry; every
    // answer is a picture or a 429.
    let port = srv.port;
    let clients: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                json(
                    port,
                    "POST",
                    "/v1/images/generations",
                    &["Authorization: Bearer sekrit"],
                    r#"{"model": "tiny", "prompt": "a cat", "size": "48x64", "n": 8, "num_inference_steps": 100}"#,
                )
            })
        })
        .collect();
    let answers: Vec<(u16, serde_json::Value)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = answers.iter().filter(|(st, _)| *st == 200).count();
    let busy = answers.iter().filter(|(st, _)| *st == 429).count();
    assert_eq!(ok + busy, 6, "{answers:?}");
    assert!(ok >= 1 && busy >= 1, "{answers:?}");
    for (st, v) in &answers {
        if *st == 200 {
            assert_eq!(v["data"].as_array().unwrap().len(), 8);
        }
    }
    assert_eq!(srv.stop(), Some(0));
}

#[test]
fn a_running_video_job_is_cancelled_by_delete_within_a_call() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let wan = examples.join("wan21_tiny_prompted.toml");
    let srv = Server::start(&["--config", s(&wan)]);
    // A size or frame count the VAE's grid refuses is a 400 naming it, before queueing.
    for (body, param, says) in [
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "size": "32x32", "num_frames": 6}"#,
            "num_frames",
            "must be 1 + 4k",
        ),
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "size": "50x50", "num_frames": 5}"#,
            "size",
            "must be a multiple of",
        ),
        // Fields of the wrong type, given twice, missing or contradicting each other.
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "input_reference": 123}"#,
            "input_reference",
            "data:image",
        ),
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": 1}"#,
            "prompt",
            "prompt: 1 is not a string",
        ),
        (
            r#"{"model": "wan21_tiny_prompted", "model": "other", "prompt": "a lake"}"#,
            "model",
            "given twice",
        ),
        (r#"{"prompt": "a lake"}"#, "model", "model: missing"),
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "num_frames": 5, "seconds": "2"}"#,
            "seconds",
            "not both",
        ),
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "seed": "-1"}"#,
            "seed",
            "seed: `-1` is not a whole number, 0 or more",
        ),
        (
            r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "cache": {"strategy": "fbcache", "threshold": null}}"#,
            "cache",
            "cache.threshold: null",
        ),
    ] {
        let (st, v) = srv.json("POST", "/v1/videos", &[], body);
        let e = &v["error"];
        assert_eq!((st, e["param"].as_str()), (400, Some(param)), "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    let (_, v) = srv.json("GET", "/v1/videos", &[], "");
    assert_eq!(
        v["data"].as_array().map(Vec::len),
        Some(0),
        "nothing queued: {v}"
    );
    let body = r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "size": "32x32", "num_frames": 5, "num_inference_steps": 400}"#;
    let (st, v) = srv.json("POST", "/v1/videos", &[], body);
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/videos/{id}");
    let t = Instant::now();
    loop {
        let (_, v) = srv.json("GET", &path, &[], "");
        if v["status"] == "in_progress" {
            break;
        }
        assert_eq!(v["status"], "queued", "{v}");
        assert!(t.elapsed() < Duration::from_secs(60), "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its content is asked for while it runs: the answer says so.
    let (st, v) = srv.json("GET", &format!("{path}/content"), &[], "");
    let says = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(st == 400 && says.contains("in_progress"), "{v}");
    let (st, v) = srv.json("DELETE", &path, &[], "");
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // The worker stops within one transformer call: the next job runs at once.
    let quick = r#"{"model": "wan21_tiny_prompted", "prompt": "a lake", "size": "32x32", "num_frames": 5, "num_inference_steps": 2}"#;
    let (_, v) = srv.json("POST", "/v1/videos", &[], quick);
    let next = format!("/v1/videos/{}", v["id"].as_str().unwrap());
    let t = Instant::now();
    loop {
        let (_, v) = srv.json("GET", &next, &[], "");
        if v["status"] == "completed" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the cancelled job kept the worker: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, _) = srv.json("GET", &path, &[], "");
    assert_eq!(st, 200);
    let (st, v) = srv.json("DELETE", &path, &[], "");
    assert_eq!((st, v["deleted"].as_bool()), (200, Some(true)), "{v}");
    let (st, v) = srv.json("GET", &path, &[], "");
    assert_eq!(st, 404, "{v}");
    let (st, v) = srv.json("GET", &format!("{path}/content"), &[], "");
    assert_eq!(st, 404, "{v}");
    assert_eq!(srv.stop(), Some(0));
}

#[test]
fn a_client_that_hangs_up_cancels_its_picture_and_no_temporary_file_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    let tmps = dir.path().join("tmp");
    std::fs::create_dir(&tmps).unwrap();
    let srv = Server::start_with(&["--config", s(&model)], &[("TMPDIR", &tmps)]);
    let made: Vec<PathBuf> = std::fs::read_dir(&tmps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let [tmp] = made.as_slice() else {
        panic!("the server's own folder for first frames: {made:?}")
    };
    let tmp = tmp.clone();
    assert!(tmp.is_dir(), "{}", tmp.display());
    // A long request, abandoned once it runs.
    let body = r#"{"model": "tiny", "prompt": "a cat", "size": "48x64", "n": 8, "num_inference_steps": 1000}"#;
    let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    let t = Instant::now();
    loop {
        let (_, head, body) = srv.http("GET", "/metrics", &[], b"");
        let text = String::from_utf8(dechunk(&head, &body)).unwrap();
        if text.contains("magcache_queue_depth 1") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(c);
    // The worker is free within a call: a short request is answered at once.
    let t = Instant::now();
    let (st, v) = srv.json(
        "POST",
        "/v1/images/generations",
        &[],
        r#"{"model": "tiny", "prompt": "a cat", "size": "48x64", "num_inference_steps": 2}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the abandoned request kept the worker for {:?}",
        t.elapsed()
    );
    // Counted, as nginx counts a client that closed its request.
    let (_, head, body) = srv.http("GET", "/metrics", &[], b"");
    let text = String::from_utf8(dechunk(&head, &body)).unwrap();
    assert!(
        text.contains("route=\"/v1/images/generations\",status=\"499\"} 1"),
        "{text}"
    );
    assert_eq!(srv.stop(), Some(0));
    assert!(!tmp.exists(), "{} left behind", tmp.display());
}

/// `magcache serve ARGS` that must end by itself within 60 s: whether it succeeded, its stderr.
fn ended(args: &[&str]) -> (bool, String) {
    let mut child = bin()
        .arg("serve")
        .args(args)
        .env_remove("MAGCACHE_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = common::wait_within(
        &mut child,
        Duration::from_secs(60),
        &format!("serve {args:?} did not end"),
    );
    (status.success(), reader.join().unwrap())
}

#[test]
fn shutdown_closes_a_stalled_upload_and_errors_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    // A run the request's prompt cannot apply to is refused at start, not by every request.
    let digits = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/digits_fbcache.toml");
    let (ok, err) = ended(&["--port", "0", "--config", s(&digits)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("digits_fbcache.toml cannot be served"),
        "{err}"
    );
    // An id a client could not name is refused at start, naming `serve.id`, before loading.
    for id in ["", "a/b", " tiny"] {
        let text = std::fs::read_to_string(&model).unwrap();
        let named = dir.path().join("named.toml");
        std::fs::write(&named, format!("{text}\n[serve]\nid = {id:?}\n")).unwrap();
        let (ok, err) = ended(&["--port", "0", "--config", s(&named)]);
        assert!(!ok, "{err}");
        assert!(
            err.contains("serve.id") && !err.contains("serve: loading"),
            "{id:?}: {err}"
        );
    }
    // Two files that would be one model id, in two folders: said before any model loads.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let twin = other.join(model.file_name().unwrap());
    std::fs::copy(&model, &twin).unwrap();
    let (ok, err) = ended(&["--port", "0", "--config", s(&model), "--config", s(&twin)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("would both be model") && !err.contains("serve: loading"),
        "{err}"
    );
    // The API key from the environment is not shown by --help.
    let help = bin()
        .args(["serve", "--help"])
        .env("MAGCACHE_API_KEY", "sekrit")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("MAGCACHE_API_KEY") && !help.contains("sekrit"),
        "{help}"
    );
    // A port in use is said before any model loads.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (ok, err) = ended(&["--port", &port, "--config", s(&model)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("cannot listen") && !err.contains("serve: loading"),
        "{err}"
    );
    drop(taken);
    // So is one bound and not yet listened on, as another server still loading holds its port
    // (without SO_REUSEADDR, which it sets only where a bind without it fails: on Linux two
    // sockets that both set it may share a port until one listens).
    let loading = tokio::net::TcpSocket::new_v4().unwrap();
    loading.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = loading.local_addr().unwrap().port().to_string();
    let (ok, err) = ended(&["--port", &port, "--config", s(&model)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("cannot listen") && err.contains(&port) && !err.contains("serve: loading"),
        "{err}"
    );

    let srv = Server::start(&["--config", s(&model), "--api-key", "k"]);
    // The scheme of the Authorization header is case-insensitive.
    let auth = ["Authorization: bearer k"];
    let (st, v) = srv.json("GET", "/v1/models", &auth, "");
    assert_eq!(st, 200, "{v}");
    // A known path with another method: 405 in the error shape.
    let (st, v) = srv.json("GET", "/v1/images/generations", &auth, "");
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (405, Some("invalid_request_error")),
        "{v}"
    );
    let bad = |body: &str, param: &str, starts: &str| {
        let (st, v) = srv.json("POST", "/v1/images/generations", &auth, body);
        let e = &v["error"];
        assert_eq!((st, e["param"].as_str()), (400, Some(param)), "{body}: {v}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.starts_with(starts), "{body}: {v}");
        // A request's error does not show the server's files.
        assert!(!msg.contains(s(dir.path())), "{body}: {v}");
    };
    bad(
        r#"{"model": "tiny", "prompt": "x", "n": "2"}"#,
        "n",
        "n: invalid type",
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "n": 9}"#,
        "n",
        "n = 9: must be",
    );
    bad(r#"{"model": "tiny", "prompt": "   "}"#, "prompt", "prompt:");
    bad(
        r#"{"model": "tiny", "prompt": "x", "cache": {"threshold": null}}"#,
        "cache",
        "cache.threshold: ",
    );
    bad(
        r#"{"model": "tiny", "prompt": "x", "cache": {"strategy": "fbcache", "threshold": -1}}"#,
        "cache",
        "cache",
    );

    // A client stalled mid-upload does not hold the shutdown.
    let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    c.write_all(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(srv.stop(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(c);
}

/// Requests refused before any work, each in OpenAI's shape with its field, and none naming a
/// server path: a missing key before the body is read, another site's page, a file named in
/// `cache`, and what the model's worker would refuse (a size the model cannot take, a guidance
/// that overflows, seeds past the last, a prompt far past the encoder).
#[test]
fn bad_requests_are_refused_before_any_work_without_server_paths() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    let key = "Authorization: Bearer sekrit";
    let srv = Server::start(&["--config", s(&model), "--api-key", "sekrit"]);
    // No key and a 15 MB body announced but never sent: 401 at once, the body unread.
    let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 15000000\r\n\r\n{\"model\"")
        .unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401", "{}", String::from_utf8_lossy(&head));
    // A body announced past the limit: 413 at once, not `100 Continue`, nothing read.
    let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(format!("POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n{key}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 99999999999\r\n\r\n").as_bytes())
        .unwrap();
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    // Another site's page (its Origin), and a page whose name was made to resolve to loopback.
    let (st, _, _) = srv.http(
        "GET",
        "/v1/models",
        &[key, "Origin: http://attacker.example"],
        b"",
    );
    assert_eq!(st, 403);
    let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A page on the server's own --host name (127.0.0.1) but another port or scheme is another
    // site.
    for page in ["http://127.0.0.1:3000", "https://127.0.0.1"] {
        let (st, _, _) = srv.http("GET", "/v1/models", &[key, &format!("Origin: {page}")], b"");
        assert_eq!(st, 403, "{page}");
    }
    let own = format!("Origin: http://localhost:{}", srv.port);
    let (st, v) = srv.json("GET", "/v1/models/tiny", &[key, &own], "");
    assert_eq!((st, v["id"].as_str()), (200, Some("tiny")), "{v}");
    let (st, v) = srv.json("GET", "/v1/models/nope", &[key], "");
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    // Each refused with its field before any work, and no server path in the message.
    let secret = dir.path().join("secret.toml");
    std::fs::write(&secret, "password = \"hunter2\"\n").unwrap();
    let long = "cat ".repeat(5000);
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            format!(
                r#"{{"model":"tiny","prompt":"x","cache":{{"strategy":"schedule","profile":{:?},"budget":2}}}}"#,
                s(&secret)
            ),
            Some("cache"),
        ),
        (
            r#"{"model":"tiny","prompt":"x","size":"50x48"}"#.into(),
            Some("size"),
        ),
        (
            r#"{"model":"tiny","prompt":"x","guidance_scale":1e30}"#.into(),
            Some("guidance_scale"),
        ),
        (
            r#"{"model":"tiny","prompt":"x","seed":9223372036854775807,"n":2}"#.into(),
            Some("seed"),
        ),
        (
            format!(r#"{{"model":"tiny","prompt":"{long}"}}"#),
            Some("prompt"),
        ),
        (r#"{bad"#.into(), None),
        (r#"{"model":"tiny","prompt":"x","#.into(), None),
        // An array is no request (serde would read it as the fields in order); a missing
        // field is named; a size is digits on either side of the `x`.
        (r#"["tiny", "a cat"]"#.into(), None),
        (r#"{"model":"tiny"}"#.into(), Some("prompt")),
        (
            r#"{"model":"tiny","prompt":"x","size":"+48x64"}"#.into(),
            Some("size"),
        ),
    ];
    // A long job holds the worker meanwhile: answers that waited behind it would come after it.
    let port = srv.port;
    let long_job = std::thread::spawn(move || {
        let t = Instant::now();
        let body = r#"{"model":"tiny","prompt":"a cat","n":8,"num_inference_steps":1000}"#;
        let (st, _) = json(port, "POST", "/v1/images/generations", &[key], body);
        (st, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    for (body, param) in &cases {
        let (st, v) = srv.json("POST", "/v1/images/generations", &[key], body);
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"].as_str(), *param, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains(s(dir.path())) && !msg.contains("hunter2") && !msg.contains("password"),
            "{msg}"
        );
    }
    let refused = t.elapsed();
    let (st, long) = long_job.join().unwrap();
    assert_eq!(st, 200);
    assert!(
        refused * 2 < long,
        "refused in {refused:?}, the long job took {long:?}"
    );
    // Front and back blocks that leave none to cache are known once the model's chain runs: the
    // job fails then, still a 400 naming `cache`.
    let body = r#"{"model":"tiny","prompt":"x","cache":{"strategy":"dbcache","front_blocks":100}}"#;
    let (st, v) = srv.json("POST", "/v1/images/generations", &[key], body);
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("cache")),
        "{v}"
    );
    let (st, _) = srv.json("GET", "/health", &[], "");
    assert_eq!(st, 200);
    assert_eq!(srv.stop(), Some(0));
    // Behind a proxy that keeps the client's Host: the public name allowed, others still not.
    let srv = Server::start(&["--config", s(&model), "--allow-host", "Images.Example.com"]);
    for (host, status) in [("images.example.com", "200"), ("attacker.example", "403")] {
        let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        let req = format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {out}"
        );
    }
    assert_eq!(srv.stop(), Some(0));
    // A key no request could send (empty, with a space, not ASCII) stops the server at start.
    for k in ["", "two words", "clé"] {
        let (ok, err) = ended(&["--config", s(&model), "--port", "0", "--api-key", k]);
        assert!(!ok && err.contains("API key"), "{err}");
    }
}

/// A SIGTERM sent the moment the address is printed stops the server cleanly (exit 0, its
/// temporary folder removed): the handlers are in before the address goes out (a supervisor or a
/// test may signal at once; before, such a signal could kill it outright, under load).
#[test]
fn a_sigterm_right_after_the_address_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    for round in 0..5 {
        let srv = Server::start_with(&["--config", s(&model)], &[("TMPDIR", &tmp)]);
        assert_eq!(srv.stop(), Some(0), "round {round}");
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
}

/// The folder for request pictures is the server's own: made fresh (a folder of the name pattern
/// that is there already is not used) and the only one removed at exit.
#[test]
fn the_server_makes_its_own_temporary_folder_and_removes_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = run_file(dir.path(), "tiny", 0);
    let tmp = dir.path().join("tmp");
    let theirs = tmp.join("magcache-serve-1");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("precious.txt"), "mine").unwrap();
    let ours = || -> Vec<PathBuf> {
        std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| *p != theirs)
            .collect()
    };
    let srv = Server::start_with(&["--config", s(&model)], &[("TMPDIR", &tmp)]);
    let made = ours();
    assert_eq!(made.len(), 1, "{made:?}");
    // Private: the pictures users send are theirs.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&made[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }
    assert_eq!(srv.stop(), Some(0));
    assert_eq!(ours(), Vec::<PathBuf>::new());
    assert_eq!(
        std::fs::read_to_string(theirs.join("precious.txt")).unwrap(),
        "mine"
    );
}
