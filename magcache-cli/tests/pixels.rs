//! What a person looks at: `compare` on prompted runs measures quality on the decoded pixels (checked
//! here against an independent computation from the `decoded` tensors `run --out` writes) and draws
//! dense | cached | difference side by side; `--video x.mp4` is H.264 in an MP4 written in process,
//! which decodes back (the `mp4` crate demuxes, OpenH264 decodes) to the frames within the codec's
//! loss, with no ffmpeg on PATH.

use serde_json::Value;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A PATH with nothing on it: no ffmpeg (nor anything else) can be run by the binary.
fn empty_path(dir: &Path) -> PathBuf {
    let p = dir.join("empty-bin");
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn magcache(dir: &Path, args: &[&str], extra: &[&Path]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_magcache"));
    c.args(args);
    for a in extra {
        c.arg(a);
    }
    let o = c.env("PATH", empty_path(dir)).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The example `name` copied into `dir` with its weights made absolute, as given (cached) and with
/// its `[cache]` table replaced by `strategy = "none"` (dense).
fn configs(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(examples().join(name)).unwrap();
    let text = text.replace(
        "weights = \"../",
        &format!("weights = \"{}/../", examples().display()),
    );
    let cached = dir.join("cached.toml");
    std::fs::write(&cached, &text).unwrap();
    let at = text.find("\n[cache]").unwrap();
    let dense = dir.join("dense.toml");
    std::fs::write(
        &dense,
        format!("{}\n[cache]\nstrategy = \"none\"\n", &text[..at]),
    )
    .unwrap();
    (cached, dense)
}

/// `decoded` of a `run --out` file as f64, with its shape.
fn decoded(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let d = &t["decoded"];
    let v = d
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    (d.dims().to_vec(), v)
}

/// Frames `(count, h, w, c)` of a `[B, F, H, W, C]` or `[B, H, W, C]` shape.
fn frame_dims(shape: &[usize]) -> (usize, usize, usize, usize) {
    match *shape {
        [b, f, h, w, c] => (b * f, h, w, c),
        [b, h, w, c] => (b, h, w, c),
        _ => panic!("decoded shape {shape:?}"),
    }
}

/// The evaluation scripts' PSNR (per frame, pixels in [0, 1], 100 dB for an MSE below 1e-10, mean
/// over frames), written out plainly.
fn reference_psnr(shape: &[usize], a: &[f64], b: &[f64]) -> f64 {
    let (n, h, w, c) = frame_dims(shape);
    let per = h * w * c;
    let mut total = 0.0;
    for f in 0..n {
        let mut sse = 0.0;
        for k in 0..per {
            let d = a[f * per + k].clamp(0.0, 1.0) - b[f * per + k].clamp(0.0, 1.0);
            sse += d * d;
        }
        let mse = sse / per as f64;
        total += if mse < 1e-10 {
            100.0
        } else {
            20.0 * (1.0 / mse.sqrt()).log10()
        };
    }
    total / n as f64
}

/// The scripts' SSIM: per frame and channel, the full 11x11 Gaussian window (sigma 1.5) at every
/// position wholly inside the frame (direct 2-D sums), C1 = 0.01^2, C2 = 0.03^2; the mean of the
/// map, then over channels, then over frames.
fn reference_ssim(shape: &[usize], a: &[f64], b: &[f64]) -> f64 {
    let (n, h, w, c) = frame_dims(shape);
    let g1: Vec<f64> = (0..11)
        .map(|i| (-((i as f64 - 5.0) * (i as f64 - 5.0)) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let s: f64 = g1.iter().sum();
    let mut win = [[0.0f64; 11]; 11];
    for (i, row) in win.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = g1[i] / s * g1[j] / s;
        }
    }
    let (c1, c2) = (0.0001, 0.0009);
    let px = |v: &[f64], f: usize, y: usize, x: usize, ch: usize| {
        v[((f * h + y) * w + x) * c + ch].clamp(0.0, 1.0)
    };
    let mut total = 0.0;
    for f in 0..n {
        let mut frame = 0.0;
        for ch in 0..c {
            let mut map = 0.0;
            let mut count = 0;
            for y in 0..=h - 11 {
                for x in 0..=w - 11 {
                    let (mut m1, mut m2, mut s11, mut s22, mut s12) = (0.0, 0.0, 0.0, 0.0, 0.0);
                    for (i, row) in win.iter().enumerate() {
                        for (j, &g) in row.iter().enumerate() {
                            let p = px(a, f, y + i, x + j, ch);
                            let q = px(b, f, y + i, x + j, ch);
                            m1 += g * p;
                            m2 += g * q;
                            s11 += g * p * p;
                            s22 += g * q * q;
                            s12 += g * p * q;
                        }
                    }
                    let (v1, v2, v12) = (s11 - m1 * m1, s22 - m2 * m2, s12 - m1 * m2);
                    map += ((2.0 * m1 * m2 + c1) * (2.0 * v12 + c2))
                        / ((m1 * m1 + m2 * m2 + c1) * (v1 + v2 + c2));
                    count += 1;
                }
            }
            frame += map / count as f64;
        }
        total += frame / c as f64;
    }
    total / n as f64
}

fn png_size(path: &Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let r = dec.read_info().unwrap();
    let i = r.info();
    (i.width, i.height)
}

/// `compare --json` on a tiny prompted example: pixel PSNR/SSIM as an independent computation gets
/// them from the two runs' `decoded`, the latent figures under `latent_quality`, the side-by-side
/// picture (and, given, video) written.
fn compare_on_pixels(example: &str, video: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let (cached_cfg, dense_cfg) = configs(dir.path(), example);
    let (dense_out, cached_out) = (
        dir.path().join("d.safetensors"),
        dir.path().join("c.safetensors"),
    );
    for (cfg, out) in [(&dense_cfg, &dense_out), (&cached_cfg, &cached_out)] {
        magcache(
            dir.path(),
            &["run", "--quiet", "--config"],
            &[cfg, Path::new("--out"), out],
        );
    }
    let png = dir.path().join("side.png");
    let mut extra: Vec<&Path> = vec![&cached_cfg, Path::new("--png"), &png];
    let vid = video.map(|v| dir.path().join(v));
    if let Some(v) = &vid {
        extra.extend([Path::new("--video"), v.as_path()]);
    }
    let o = magcache(dir.path(), &["compare", "--json", "--config"], &extra);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let (shape, d) = decoded(&dense_out);
    let (shape2, c) = decoded(&cached_out);
    assert_eq!(shape, shape2);
    let psnr = reference_psnr(&shape, &d, &c);
    let ssim = reference_ssim(&shape, &d, &c);
    eprintln!(
        "{example}: pixel PSNR {psnr:.4} dB, SSIM {ssim:.6}; compare: {}",
        r["quality"]
    );
    assert_eq!(r["quality_on"], "pixels");
    let q = &r["quality"];
    assert!(
        (q["psnr_db"].as_f64().unwrap() - psnr).abs() < 1e-6,
        "{q} vs {psnr}"
    );
    assert!(
        (q["ssim"].as_f64().unwrap() - ssim).abs() < 1e-6,
        "{q} vs {ssim}"
    );
    assert_eq!(q["data_range"].as_f64(), Some(1.0));
    assert!(r["latent_quality"]["psnr_db"].is_number() || r["latent_quality"]["psnr_db"].is_null());
    assert!(r["latent_quality"]["ssim"].is_number());
    // Dense | cached | difference side by side, 2-pixel gaps, a 2-pixel border; one row a frame.
    let (n, h, w, _) = frame_dims(&shape);
    let (pw, ph) = png_size(&png);
    assert_eq!(pw as usize, 3 * w + 2 * 2 + 2 * 2, "{pw}x{ph}");
    assert_eq!(ph as usize, n * (h + 2) + 2, "{pw}x{ph}");
    if let Some(v) = &vid {
        let bytes = std::fs::read(v).unwrap();
        let (vw, vh, frames) = decode_mp4(&bytes);
        assert_eq!(
            (vw, vh),
            ((3 * w + 4).next_multiple_of(2), h.next_multiple_of(2))
        );
        assert_eq!(frames.len(), n);
    }
}

#[test]
fn compare_measures_the_decoded_wan_frames() {
    compare_on_pixels("wan21_tiny_prompted.toml", Some("side.mp4"));
}

#[test]
fn compare_measures_the_decoded_flux_image() {
    compare_on_pixels("flux_tiny_prompted.toml", None);
}

/// Top-level box types of an MP4, in order.
fn top_boxes(b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= b.len() {
        let size = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        out.push(String::from_utf8_lossy(&b[at + 4..at + 8]).to_string());
        assert!(size >= 8);
        at += size;
    }
    assert_eq!(at, b.len(), "boxes cover the file");
    out
}

/// Demuxes the video track (the `mp4` crate) and decodes every sample (OpenH264): width, height,
/// RGB frames.
fn decode_mp4(bytes: &[u8]) -> (usize, usize, Vec<Vec<u8>>) {
    let mut r = mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64).unwrap();
    assert_eq!(r.tracks().len(), 1);
    let (&id, t) = r.tracks().iter().next().unwrap();
    assert_eq!(t.media_type().unwrap(), mp4::MediaType::H264);
    let (w, h) = (t.width() as usize, t.height() as usize);
    let mut stream = Vec::new();
    for ps in [
        t.sequence_parameter_set().unwrap(),
        t.picture_parameter_set().unwrap(),
    ] {
        stream.extend_from_slice(&[0, 0, 0, 1]);
        stream.extend_from_slice(ps);
    }
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut frames = Vec::new();
    let keep = |y: &openh264::decoder::DecodedYUV<'_>, frames: &mut Vec<Vec<u8>>| {
        let mut rgb = vec![0u8; w * h * 3];
        y.write_rgb8(&mut rgb);
        frames.push(rgb);
    };
    for s in 1..=r.sample_count(id).unwrap() {
        let sample = r.read_sample(id, s).unwrap().unwrap();
        let b = &sample.bytes[..];
        // Length-prefixed NAL units to Annex B.
        let mut at = 0;
        while at < b.len() {
            let n = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            stream.extend_from_slice(&[0, 0, 0, 1]);
            stream.extend_from_slice(&b[at + 4..at + 4 + n]);
            at += 4 + n;
        }
        if let Some(y) = dec.decode(&stream).unwrap() {
            keep(&y, &mut frames);
        }
        stream.clear();
    }
    for y in dec.flush_remaining().unwrap() {
        keep(&y, &mut frames);
    }
    (w, h, frames)
}

/// The runner's `--video x.mp4` of the tiny prompted Wan run, with nothing on PATH: `ftyp, moov,
/// mdat` (faststart), one avc1 track at 16 fps, and every frame decodes back to the run's own
/// `decoded` frames (as 8-bit RGB) within the codec's loss.
#[test]
fn mp4_written_in_process_decodes_back_to_the_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (cached_cfg, _) = configs(dir.path(), "wan21_tiny_prompted.toml");
    let (out, mp4_path) = (dir.path().join("o.safetensors"), dir.path().join("v.mp4"));
    magcache(
        dir.path(),
        &["run", "--quiet", "--config"],
        &[
            &cached_cfg,
            Path::new("--out"),
            &out,
            Path::new("--video"),
            &mp4_path,
        ],
    );
    let bytes = std::fs::read(&mp4_path).unwrap();
    assert_eq!(top_boxes(&bytes), ["ftyp", "moov", "mdat"]);
    {
        let r = mp4::Mp4Reader::read_header(Cursor::new(&bytes[..]), bytes.len() as u64).unwrap();
        let t = r.tracks().values().next().unwrap();
        assert_eq!(t.box_type().unwrap().to_string(), "avc1");
        assert!((t.frame_rate() - 16.0).abs() < 1e-9, "{}", t.frame_rate());
    }
    let (shape, px) = decoded(&out);
    let (n, h, w, c) = frame_dims(&shape);
    let (vw, vh, frames) = decode_mp4(&bytes);
    assert_eq!(
        (vw, vh, frames.len()),
        (w.next_multiple_of(2), h.next_multiple_of(2), n)
    );
    let mut worst = f64::INFINITY;
    for (f, got) in frames.iter().enumerate() {
        let mut sse = 0.0;
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let want = (px[((f * h + y) * w + x) * c + ch].clamp(0.0, 1.0) * 255.0).round();
                    let d = want - got[(y * vw + x) * 3 + ch] as f64;
                    sse += d * d;
                }
            }
        }
        let psnr = 10.0 * (255.0f64 * 255.0 / (sse / (h * w * c) as f64)).log10();
        eprintln!("frame {f}: {psnr:.2} dB");
        worst = worst.min(psnr);
    }
    // docs/runner.md states the figure measured here.
    assert!(worst > 20.0, "worst frame {worst:.2} dB");
}

/// Odd sizes are padded to even (the last column and row repeated), small ones to 16, and a smooth
/// picture keeps its detail; a picture past OpenH264's 3840x2160 is halved until it fits.
#[test]
fn mp4_pads_odd_sizes_and_halves_oversized_pictures() {
    let (w, h, n) = (63usize, 47usize, 4usize);
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|f| {
            let mut v = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    v.extend_from_slice(&[(x * 3 + f) as u8, (y * 4) as u8, ((x + y) * 2) as u8]);
                }
            }
            v
        })
        .collect();
    let bytes = magcache_cli::h264::encode_mp4(&frames, w, h, 24).unwrap();
    assert_eq!(top_boxes(&bytes), ["ftyp", "moov", "mdat"]);
    let (vw, vh, got) = decode_mp4(&bytes);
    assert_eq!((vw, vh, got.len()), (64, 48, n));
    for (f, g) in got.iter().enumerate() {
        let mut sse = 0.0;
        for y in 0..vh {
            for x in 0..vw {
                for c in 0..3 {
                    // The padding repeats the last column and row.
                    let want = frames[f][(y.min(h - 1) * w + x.min(w - 1)) * 3 + c] as f64;
                    let d = want - g[(y * vw + x) * 3 + c] as f64;
                    sse += d * d;
                }
            }
        }
        let psnr = 10.0 * (255.0f64 * 255.0 / (sse / (vw * vh * 3) as f64)).log10();
        eprintln!("gradient frame {f}: {psnr:.2} dB");
        assert!(psnr > 35.0, "frame {f}: {psnr:.2} dB");
    }
    let wide = vec![vec![90u8; 3850 * 20 * 3]; 2];
    let bytes = magcache_cli::h264::encode_mp4(&wide, 3850, 20, 16).unwrap();
    let (vw, vh, got) = decode_mp4(&bytes);
    assert_eq!((vw, vh, got.len()), (1926, 16, 2));
    assert!(magcache_cli::h264::encode_mp4(&wide, 3851, 20, 16).is_err());
    // Under 16 pixels: padded up to 16.
    let tiny = vec![vec![200u8; 5 * 3 * 3]; 1];
    let (vw, vh, got) = decode_mp4(&magcache_cli::h264::encode_mp4(&tiny, 5, 3, 16).unwrap());
    assert_eq!((vw, vh, got.len()), (16, 16, 1));
    assert!(magcache_cli::h264::encode_mp4(&[], 4, 4, 16).is_err());
    assert!(magcache_cli::h264::encode_mp4(&tiny, 5, 3, 0).is_err());
    assert!(magcache_cli::h264::encode_mp4(&tiny, 5, 3, u32::MAX).is_err());
}

/// A frame rate of 0 (or past 1000) and `--video` on a run without a decoder are one-line errors
/// before any work.
#[test]
fn video_flags_are_checked_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (cached_cfg, _) = configs(dir.path(), "wan21_tiny_prompted.toml");
    let v = dir.path().join("v.mp4");
    for (cmd, fps) in [("run", "0"), ("compare", "1001")] {
        let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
            .args([cmd, "--fps", fps, "--config"])
            .arg(&cached_cfg)
            .arg("--video")
            .arg(&v)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--fps"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!v.exists());
    }
    let digits = examples().join("digits_magcache.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["compare", "--config"])
        .arg(&digits)
        .arg("--video")
        .arg(&v)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--video") && err.contains("[prompt]"),
        "{err}"
    );
    assert!(!v.exists());
}

/// How long the pixel metrics take at Wan's 480x832 (21 frames; time grows with the frames):
/// `cargo test -p magcache-cli --test pixels -- --ignored --nocapture`.
#[test]
#[ignore]
fn pixel_quality_time_at_480x832() {
    let shape = (1usize, 21usize, 480usize, 832usize, 3usize);
    let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
    let a: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let b: Vec<f32> = a
        .iter()
        .enumerate()
        .map(|(i, v)| (v + (i % 13) as f32 / 500.0).min(1.0))
        .collect();
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::from_vec(a, shape, &dev).unwrap();
    let b = candle_core::Tensor::from_vec(b, shape, &dev).unwrap();
    let t0 = std::time::Instant::now();
    let q = magcache_core::runtime::metrics::pixel_quality(&a, &b).unwrap();
    eprintln!(
        "21 frames 480x832: {:.2} s ({q:?})",
        t0.elapsed().as_secs_f64()
    );
}

/// Noise (what a model with random weights, or a diverging run, decodes to) is the hardest picture
/// to code: at 1 bit a pixel the encoder's frames outgrow its bitstream buffer unless its quantiser
/// is bounded. Every frame must still be written, and decode back.
#[test]
fn mp4_of_noise_is_written_and_decodes() {
    for (w, h, n) in [(256usize, 256usize, 21usize), (480, 272, 9), (128, 128, 5)] {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                (0..w * h * 3)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 56) as u8
                    })
                    .collect()
            })
            .collect();
        let bytes = magcache_cli::h264::encode_mp4(&frames, w, h, 16)
            .unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        let (vw, vh, got) = decode_mp4(&bytes);
        assert_eq!((vw, vh, got.len()), (w, h, n));
    }
}
