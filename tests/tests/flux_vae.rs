//! Parity of FLUX.1's image VAE (diffusers `AutoencoderKL`, 16 latent channels, scale/shift, no
//! quant convs) with diffusers: `pipelines/flux_vae_forward.safetensors` (encode posterior and
//! decode) and the decode step of the `pipelines/flux_pipeline.*` runs (packed final latents ->
//! `vae_input` -> `decoded` -> `image`). Every size comes from the fixture files.

use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl::{pack_latents, unpack_latents, FluxVae, VaeLayout};
use magcache_tests::{fixture, load, load_json, max_abs, max_abs_diff};
use std::collections::HashMap;
use std::path::Path;

fn vae() -> FluxVae {
    FluxVae::load(&fixture("pipelines/flux_vae"), &Device::Cpu, DType::F32).unwrap()
}

/// Checks `got` against `want` within `rel` x max |want| (the README's VAE tolerance); returns the
/// relative error.
fn check_rel(name: &str, got: &Tensor, want: &Tensor, rel: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let err = max_abs_diff(got, want);
    let scale = max_abs(want).max(1e-12);
    eprintln!(
        "{name}: max abs err {err:.3e}, max |ref| {scale:.3e}, relative {:.3e}",
        err / scale
    );
    assert!(
        err <= rel * scale,
        "{name}: max abs err {err} > {rel} x {scale}"
    );
    err / scale
}

fn check_abs(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let err = max_abs_diff(got, want);
    eprintln!("{name}: max abs err {err:.3e}");
    assert!(err <= tol, "{name}: max abs err {err} > {tol}");
}

#[test]
fn encode_matches_diffusers() {
    let f = load("pipelines/flux_vae_forward.safetensors");
    let v = vae();
    assert_eq!(v.layout, VaeLayout::Diffusers);
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    let x = &f["encode.input"];
    let (mean, logvar) = v.encode_moments(x).unwrap();
    check_rel("encode.latent_mean", &mean, &f["encode.latent_mean"], 1e-4);
    check_rel(
        "encode.latent_logvar",
        &logvar,
        &f["encode.latent_logvar"],
        1e-4,
    );
    assert_eq!(max_abs_diff(&v.encode_mean(x).unwrap(), &mean), 0.0);
    let norm = v.encode_normalized(x).unwrap();
    check_rel(
        "encode.latent_normalized",
        &norm,
        &f["encode.latent_normalized"],
        1e-4,
    );
    // The mean's grid is the image's divided by the VAE factor read from the config.
    let (_, _, h, w) = x.dims4().unwrap();
    let s = v.vae_scale_factor();
    assert_eq!(mean.dims()[2..], [h / s, w / s]);
}

#[test]
fn decode_matches_diffusers() {
    let f = load("pipelines/flux_vae_forward.safetensors");
    let got = vae().decode(&f["decode.input"]).unwrap();
    check_rel("decode.output", &got, &f["decode.output"], 1e-4);
}

/// FluxPipeline's decode from the packed latents after the loop: unpack with the call's height and
/// width, `/ scaling_factor + shift_factor`, decode, `np` image. `dense` must be there; every other
/// run of the fixture with `final` and `decoded` is checked too.
#[test]
fn pipeline_decode_from_packed_final_latents() {
    let p = load("pipelines/flux_pipeline.safetensors");
    let meta = load_json("pipelines/flux_pipeline.json");
    let v = vae();
    let (height, width) = (
        meta["call"]["height"].as_u64().unwrap() as usize,
        meta["call"]["width"].as_u64().unwrap() as usize,
    );
    assert_eq!(
        v.vae_scale_factor() as u64,
        meta["vae_scale_factor"].as_u64().unwrap()
    );
    assert!((v.config.scaling_factor - meta["scaling_factor"].as_f64().unwrap()).abs() < 1e-12);
    assert!((v.config.shift_factor - meta["shift_factor"].as_f64().unwrap()).abs() < 1e-12);
    let mut runs: Vec<String> = p
        .keys()
        .filter_map(|k| k.strip_suffix(".final").map(String::from))
        .filter(|r| p.contains_key(&format!("{r}.decoded")))
        .collect();
    runs.sort();
    assert!(
        runs.iter().any(|r| r == "dense"),
        "fixture has no dense run"
    );
    for run in &runs {
        let packed = &p[&format!("{run}.final")];
        let lat = unpack_latents(packed, height, width, v.vae_scale_factor()).unwrap();
        assert_eq!(max_abs_diff(&pack_latents(&lat).unwrap(), packed), 0.0);
        let z = v.denormalize_latents(&lat).unwrap();
        check_abs(
            &format!("{run}.vae_input"),
            &z,
            &p[&format!("{run}.vae_input")],
            1e-3,
        );
        let decoded = v.decode(&z).unwrap();
        check_abs(
            &format!("{run}.decoded"),
            &decoded,
            &p[&format!("{run}.decoded")],
            3e-3,
        );
        let image = v.decode_packed(packed, height, width).unwrap();
        check_abs(
            &format!("{run}.image"),
            &image,
            &p[&format!("{run}.image")],
            3e-3,
        );
        let flat = image.flatten_all().unwrap();
        assert!(flat.min(0).unwrap().to_scalar::<f32>().unwrap() >= 0.0);
        assert!(flat.max(0).unwrap().to_scalar::<f32>().unwrap() <= 1.0);
        // normalize_latents inverts denormalize_latents.
        let back = v.normalize_latents(&z).unwrap();
        assert!(max_abs_diff(&back, &lat) < 1e-5);
    }
}

fn copy_config(to: &Path) {
    std::fs::copy(
        fixture("pipelines/flux_vae/config.json"),
        to.join("config.json"),
    )
    .unwrap();
}

/// A sharded checkpoint (`*.safetensors.index.json`) inside a pipeline folder's `vae/` loads and
/// decodes the same as the single file.
#[test]
fn sharded_vae_in_pipeline_folder() {
    let dir = tempfile::tempdir().unwrap();
    let vae_dir = dir.path().join("vae");
    std::fs::create_dir(&vae_dir).unwrap();
    copy_config(&vae_dir);
    let all = load("pipelines/flux_vae/diffusion_pytorch_model.safetensors");
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, t) in all {
        let (shard, name) = if k.starts_with("encoder.") {
            (&mut a, "diffusion_pytorch_model-00001-of-00002.safetensors")
        } else {
            (&mut b, "diffusion_pytorch_model-00002-of-00002.safetensors")
        };
        weight_map.insert(k.clone(), name.into());
        shard.insert(k, t);
    }
    for (shard, name) in [
        (&a, "diffusion_pytorch_model-00001-of-00002.safetensors"),
        (&b, "diffusion_pytorch_model-00002-of-00002.safetensors"),
    ] {
        candle_core::safetensors::save(shard, vae_dir.join(name)).unwrap();
    }
    std::fs::write(
        vae_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let sharded = FluxVae::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let f = load("pipelines/flux_vae_forward.safetensors");
    let z = &f["decode.input"];
    assert_eq!(
        max_abs_diff(&sharded.decode(z).unwrap(), &vae().decode(z).unwrap()),
        0.0
    );
}

/// diffusers name -> BFL `ae.safetensors` name (the inverse of the loader's renaming), for `levels`
/// resolution levels.
fn to_bfl(name: &str, levels: usize) -> String {
    let p: Vec<&str> = name.split('.').collect();
    let tail = |rest: &[&str]| {
        rest.iter()
            .map(|s| {
                if *s == "conv_shortcut" {
                    "nin_shortcut"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    match p.as_slice() {
        [side, "down_blocks", i, "resnets", j, rest @ ..] => {
            format!("{side}.down.{i}.block.{j}.{}", tail(rest))
        }
        [side, "down_blocks", i, "downsamplers", "0", rest @ ..] => {
            format!("{side}.down.{i}.downsample.{}", rest.join("."))
        }
        [side, "up_blocks", i, kind, rest @ ..] => {
            let lvl = levels - 1 - i.parse::<usize>().unwrap();
            match (*kind, rest) {
                ("resnets", [j, rest @ ..]) => format!("{side}.up.{lvl}.block.{j}.{}", tail(rest)),
                ("upsamplers", ["0", rest @ ..]) => {
                    format!("{side}.up.{lvl}.upsample.{}", rest.join("."))
                }
                _ => panic!("{name}"),
            }
        }
        [side, "mid_block", "resnets", j, rest @ ..] => {
            let b = if *j == "0" { "block_1" } else { "block_2" };
            format!("{side}.mid.{b}.{}", tail(rest))
        }
        [side, "mid_block", "attentions", "0", m, rest @ ..] => {
            let (m, rest) = match (*m, rest) {
                ("group_norm", r) => ("norm", r),
                ("to_q", r) => ("q", r),
                ("to_k", r) => ("k", r),
                ("to_v", r) => ("v", r),
                ("to_out", ["0", r @ ..]) => ("proj_out", r),
                _ => panic!("{name}"),
            };
            format!("{side}.mid.attn_1.{m}.{}", rest.join("."))
        }
        [side, "conv_norm_out", rest @ ..] => format!("{side}.norm_out.{}", rest.join(".")),
        _ => name.to_string(),
    }
}

/// BFL's single-file `ae.safetensors` layout (as candle-transformers' flux autoencoder reads it:
/// `encoder.down.{i}.block.{j}`, `mid.attn_1.q` as 1x1 convs, `decoder.up.{level}`) gives the same
/// encode and decode as the diffusers folder. Without a config beside it, the sizes come from the
/// tensors and BFL's FLUX.1 constants (32 groups, which these tiny widths cannot take: refused
/// with one line naming the file and the key).
#[test]
fn bfl_single_file_layout() {
    let cfg = load_json("pipelines/flux_vae/config.json");
    let levels = cfg["block_out_channels"].as_array().unwrap().len();
    let all = load("pipelines/flux_vae/diffusion_pytorch_model.safetensors");
    let bfl: HashMap<String, Tensor> = all
        .into_iter()
        .map(|(k, t)| {
            let n = to_bfl(&k, levels);
            let t = if n.contains(".attn_1.") && n.ends_with(".weight") && t.rank() == 2 {
                let (o, i) = t.dims2().unwrap();
                t.reshape((o, i, 1, 1)).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    assert!(bfl.contains_key("decoder.up.0.block.0.conv1.weight"));
    assert!(bfl.contains_key("encoder.mid.attn_1.q.weight"));

    let dir = tempfile::tempdir().unwrap();
    let ae = dir.path().join("ae.safetensors");
    candle_core::safetensors::save(&bfl, &ae).unwrap();
    // No config beside it: sizes inferred, BFL's 32 groups refused for these widths.
    let e = FluxVae::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .expect("32 groups cannot divide the tiny widths")
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.starts_with(&ae.display().to_string()) && e.contains("norm_num_groups"),
        "{e}"
    );
    // With the AutoencoderKL config beside it: identical to the diffusers folder.
    copy_config(dir.path());
    let v = FluxVae::load(&ae, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(v.layout, VaeLayout::Bfl);
    let want = vae();
    let f = load("pipelines/flux_vae_forward.safetensors");
    assert_eq!(
        max_abs_diff(
            &v.decode(&f["decode.input"]).unwrap(),
            &want.decode(&f["decode.input"]).unwrap()
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &v.encode_mean(&f["encode.input"]).unwrap(),
            &want.encode_mean(&f["encode.input"]).unwrap()
        ),
        0.0
    );
}

/// bf16 weights on the CPU (no bf16 conv2d kernel there: the bf16-rounded weights run in f32).
#[test]
fn bf16_weights_on_cpu() {
    let f = load("pipelines/flux_vae_forward.safetensors");
    let v = FluxVae::load(&fixture("pipelines/flux_vae"), &Device::Cpu, DType::BF16).unwrap();
    let got = v.decode(&f["decode.input"]).unwrap();
    check_rel(
        "decode.output (bf16 weights)",
        &got,
        &f["decode.output"],
        5e-2,
    );
}

fn one_line_err<T>(r: magcache_core::Result<T>) -> String {
    let e = r.err().expect("expected an error").to_string();
    eprintln!("error: {e}");
    assert!(!e.contains('\n'), "multi-line error: {e}");
    e
}

/// User errors are one-line errors naming the file and the key or tensor, never panics.
#[test]
fn errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::copy(
        fixture("pipelines/flux_vae/diffusion_pytorch_model.safetensors"),
        &weights,
    )
    .unwrap();
    let mut cfg = load_json("pipelines/flux_vae/config.json");
    let cfg_path = dir.path().join("config.json");
    let write = |c: &serde_json::Value| std::fs::write(&cfg_path, c.to_string()).unwrap();

    // No config.json beside diffusers weights.
    let e = one_line_err(FluxVae::load(&weights, &Device::Cpu, DType::F32));
    assert!(e.contains("config.json"), "{e}");

    // A shallower config than the checkpoint: the left-over resnets are named (where the
    // checkpoint has more than one a block; none at all is a bad config value).
    let lpb = cfg["layers_per_block"].as_u64().unwrap();
    cfg["layers_per_block"] = (lpb - 1).into();
    write(&cfg);
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    let (file, key) = match lpb {
        1 => (
            cfg_path.display().to_string(),
            "layers_per_block: must be positive",
        ),
        _ => (weights.display().to_string(), "layers_per_block"),
    };
    assert!(e.starts_with(&file) && e.contains(key), "{e}");
    // A deeper one: the first missing tensor is named.
    cfg["layers_per_block"] = (lpb + 1).into();
    write(&cfg);
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    assert!(
        e.contains(&format!("encoder.down_blocks.0.resnets.{lpb}.")) && e.contains("missing"),
        "{e}"
    );
    // Wrong widths: the tensor and both shapes.
    cfg["layers_per_block"] = lpb.into();
    let first = cfg["block_out_channels"][0].as_u64().unwrap();
    cfg["block_out_channels"][0] = (2 * first).into();
    write(&cfg);
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    assert!(e.contains("encoder.conv_in.weight"), "{e}");
    // Bad config values name the key.
    cfg = load_json("pipelines/flux_vae/config.json");
    cfg["norm_num_groups"] = 3.into();
    write(&cfg);
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    assert!(
        e.starts_with(&format!("{}: norm_num_groups:", cfg_path.display())),
        "{e}"
    );
    cfg = load_json("pipelines/flux_vae/config.json");
    cfg["_class_name"] = "AutoencoderKLWan".into();
    write(&cfg);
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    assert!(e.contains("_class_name"), "{e}");
    // A file that is not safetensors.
    std::fs::write(&weights, b"not a checkpoint").unwrap();
    copy_config(dir.path());
    let e = one_line_err(FluxVae::load(dir.path(), &Device::Cpu, DType::F32));
    assert!(e.starts_with(&weights.display().to_string()), "{e}");
    // A folder with neither config nor ae.safetensors.
    let empty = tempfile::tempdir().unwrap();
    one_line_err(FluxVae::load(empty.path(), &Device::Cpu, DType::F32));

    // Inputs of the wrong layout, too small or non-finite.
    let v = vae();
    let c = v.config.latent_channels;
    let bad = Tensor::zeros((1, c + 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(one_line_err(v.decode(&bad)).contains("latents"));
    let bad = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    one_line_err(v.encode_mean(&bad));
    let tiny = Tensor::zeros((1, v.config.in_channels, 1, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(one_line_err(v.encode_mean(&tiny)).contains("at least"));
    let nan = (Tensor::zeros((1, c, 2, 2), DType::F32, &Device::Cpu).unwrap() / 0.0).unwrap();
    assert!(one_line_err(v.decode(&nan)).contains("non-finite"));
    let packed = Tensor::zeros((1, 5, 4 * c), DType::F32, &Device::Cpu).unwrap();
    let e = one_line_err(v.decode_packed(&packed, 64, 48));
    assert!(e.contains("64x48"), "{e}");
    one_line_err(v.decode_packed(&packed.squeeze(0).unwrap(), 64, 48));
}

/// FLUX.1's and FLUX.2's VAEs behind one face, for the tiling test.
enum AnyVae {
    One(FluxVae),
    Two(magcache_models::flux2::vae::Flux2Vae),
}

impl AnyVae {
    fn set_tiling(&mut self, t: Option<magcache_layers::autoencoder_kl::FluxTiling>) {
        match self {
            AnyVae::One(v) => v.set_tiling(t).unwrap(),
            AnyVae::Two(v) => v.set_tiling(t).unwrap(),
        }
        let now = match self {
            AnyVae::One(v) => v.tiling(),
            AnyVae::Two(v) => v.tiling(),
        };
        assert_eq!(now, t);
    }

    fn decode(&self, z: &Tensor) -> Tensor {
        match self {
            AnyVae::One(v) => v.decode(z).unwrap(),
            AnyVae::Two(v) => v.decode(z).unwrap(),
        }
    }

    fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        match self {
            AnyVae::One(v) => v.encode_moments(x).unwrap(),
            AnyVae::Two(v) => v.encode_moments(x).unwrap(),
        }
    }
}

/// Spatial tiling against diffusers' own `AutoencoderKL.tiled_decode` / `_tiled_encode` and
/// `AutoencoderKLFlux2`'s (`pipelines/flux_vae_tiling.*`,
/// `tests/fixtures/tools/make_flux_vae_tiling_fixtures.py`): the tiny FLUX.1 VAE with its config's
/// tile size (`sample_size`), the tiny FLUX.2 VAE with the tile size set as a run file sets it,
/// narrow last rows and columns included; tiling moves the output as far as it does in diffusers,
/// and an input within one tile is untouched.
#[test]
fn tiled_decode_and_encode_match_diffusers() {
    use magcache_layers::autoencoder_kl::FluxTiling;
    let f = load("pipelines/flux_vae_tiling.safetensors");
    let meta = load_json("pipelines/flux_vae_tiling.json");
    assert_eq!(meta["cases"].as_object().unwrap().len(), 2);
    for (name, case) in meta["cases"].as_object().unwrap() {
        let dir = fixture(case["vae"].as_str().unwrap());
        let tile = FluxTiling {
            tile_sample_min_size: case["tile_sample_min_size"].as_u64().unwrap() as usize,
        };
        let mut v = if case["class"] == "AutoencoderKL" {
            let v = FluxVae::load(&dir, &Device::Cpu, DType::F32).unwrap();
            assert_eq!(
                FluxTiling::of_config(&v.config),
                tile,
                "{name}: the config's size"
            );
            AnyVae::One(v)
        } else {
            AnyVae::Two(
                magcache_models::flux2::vae::Flux2Vae::load(&dir, &Device::Cpu, DType::F32)
                    .unwrap(),
            )
        };
        let z = &f[&format!("{name}.latents")];
        let image = &f[&format!("{name}.image")];
        let untiled = v.decode(z);
        let (untiled_mean, _) = v.encode(image);
        v.set_tiling(Some(tile));
        let tiled = v.decode(z);
        check_rel(
            &format!("{name} tiled decode"),
            &tiled,
            &f[&format!("{name}.decode.tiled")],
            1e-4,
        );
        let (mean, logvar) = v.encode(image);
        check_rel(
            &format!("{name} tiled encode mean"),
            &mean,
            &f[&format!("{name}.encode.tiled.mean")],
            1e-4,
        );
        check_rel(
            &format!("{name} tiled encode logvar"),
            &logvar,
            &f[&format!("{name}.encode.tiled.logvar")],
            1e-4,
        );
        // Tiling moved the outputs as far as it did in diffusers (the inputs span several tiles) ...
        for (what, got, other, key) in [
            (
                "decode",
                &tiled,
                &untiled,
                "decode_max_abs_tiled_vs_untiled",
            ),
            (
                "encode",
                &mean,
                &untiled_mean,
                "encode_max_abs_tiled_vs_untiled",
            ),
        ] {
            let want = case[key].as_f64().unwrap() as f32;
            let moved = max_abs_diff(got, other);
            eprintln!(
                "{name}: tiled vs untiled {what}: max abs {moved:.3e} (diffusers {want:.3e})"
            );
            assert!(
                want > 1e-3 && (moved - want).abs() < 1e-3 * want.max(1.0),
                "{name}: tiled vs untiled {what} {moved} against diffusers' {want}"
            );
        }
        // ... and an input within one tile decodes and encodes exactly as untiled.
        let m = tile.tile_sample_min_size / 8;
        let small = z.narrow(2, 0, m).unwrap().narrow(3, 0, m).unwrap();
        let small_image = image
            .narrow(2, 0, 8 * m)
            .unwrap()
            .narrow(3, 0, 8 * m)
            .unwrap();
        let (tiled_small, tiled_small_mean) = (v.decode(&small), v.encode(&small_image).0);
        v.set_tiling(None);
        assert_eq!(max_abs_diff(&tiled_small, &v.decode(&small)), 0.0);
        assert_eq!(
            max_abs_diff(&tiled_small_mean, &v.encode(&small_image).0),
            0.0
        );
    }
}
