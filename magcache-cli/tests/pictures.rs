//! Pictures and comparisons on the trained digits model.

use candle_core::Device;
use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

#[test]
fn run_png_shows_digits_not_noise() {
    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("digits.png");
    let out = dir.path().join("o.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--quiet", "--config"])
        .arg(example("digits_dense.toml"))
        .arg("--png")
        .arg(&png_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Size: 10 digits of 16x16 drawn 4x with 2-pixel gaps.
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    assert_eq!(
        (info.width, info.height),
        (10 * (16 * 4 + 2) + 2, 16 * 4 + 2 + 2)
    );
    // The picture is digits, not the initial noise: the result is far from its starting latents, has
    // the model's pixel range, and a mostly dark background with bright strokes.
    let fin = &candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["final"];
    // The seeded initial noise of the example (`[inputs] seed = 0`: latents drawn with seed 0 + 1).
    let noise = magcache_layers::random::randn(1, &[10, 1, 1, 16, 16]).unwrap();
    let diff = (fin - &noise)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.5, "mean |final - noise| = {diff}");
    let v = fin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dark = v.iter().filter(|x| **x < -0.5).count() as f32 / v.len() as f32;
    let bright = v.iter().filter(|x| **x > 0.5).count() as f32 / v.len() as f32;
    assert!(dark > 0.4 && bright > 0.05, "dark {dark}, bright {bright}");
    assert!(v.iter().all(|x| (-1.6..=1.6).contains(x)));
}

#[test]
fn compare_reports_quality_and_writes_plot_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let (svg, png_path) = (dir.path().join("p.svg"), dir.path().join("c.png"));
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["compare", "--json", "--data-range", "2", "--config"])
        .arg(example("digits_magcache.toml"))
        .arg("--plot")
        .arg(&svg)
        .arg("--png")
        .arg(&png_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["total_calls"], 40);
    assert_eq!(r["dense_computed_calls"], 40);
    assert_eq!(r["cached_computed_calls"], 26);
    let psnr = r["quality"]["psnr_db"].as_f64().unwrap();
    let ssim = r["quality"]["ssim"].as_f64().unwrap();
    // The digits model has no decoder: its latents are the pixels, measured as such.
    assert_eq!(r["quality_on"], "latents");
    assert!(r.get("latent_quality").is_none());
    assert!((35.0..60.0).contains(&psnr), "PSNR {psnr}");
    assert!((0.9..1.0).contains(&ssim), "SSIM {ssim}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("threshold 0.06"));
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let info = dec.read_info().unwrap().info().clone();
    assert_eq!(
        info.height,
        3 * (16 * 4 + 2) + 2,
        "three rows: dense, cached, difference"
    );
}

/// `--plot` writes SVG: a `.png` name is refused before any work, as `--png`'s other names are.
#[test]
fn a_plot_named_as_another_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("p.png");
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["compare", "--quiet", "--config"])
        .arg(example("digits_magcache.toml"))
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--plot") && err.contains(".svg"),
        "{err}"
    );
    assert!(!plot.exists());
}
