//! Pictures a run conditions on (`[inputs] image`): read as 8-bit RGB with the EXIF orientation (or,
//! where EXIF has none, the XMP one) applied (what diffusers' `load_image` does:
//! `ImageOps.exif_transpose`, then `convert("RGB")`:
//! alpha dropped, gray and palettes expanded, 16-bit values cut to their high byte; a 16-bit
//! grayscale PNG, which PIL clips to white, is refused), and resampled as PIL resamples 8-bit
//! images. JPEG decoding is the `image` crate's, not libjpeg's: its pixels may differ from PIL's
//! by 1 or 2 levels (IDCT and chroma upsampling).
//!
//! Decoding is the `image` crate's (PNG, JPEG). Resampling is not: `image::imageops::resize` computes
//! in f32, not with PIL's fixed-point rounding, while the pipelines resize with PIL (`Image.resize`,
//! LANCZOS for the VAE input, BICUBIC in CLIP's image processor). [`resize`] follows PIL's
//! `ImagingResample` for 8-bit images: separable passes (horizontal, then vertical) with the filter
//! support widened by the downscale factor, coefficients normalised in f64 then rounded to 22-bit
//! fixed point, accumulation in integers from a half-unit bias, shifted and clipped to 0..255. It
//! gives Pillow 13's bytes exactly on the test pictures (`tests/fixtures/picture/`).

use candle_core::{Device, Tensor};
use magcache_core::{Error, Result};
use std::path::Path;

/// An 8-bit RGB picture, rows top to bottom, `[h][w][3]` flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// The largest picture read: its file, each side and its pixels (8192 x 8192; a conditioning
/// picture is resized to the run's size, at most a few megapixels, anyway). The decoders' own
/// allocations are limited to twice the pixels' RGBA bytes.
const MAX_PICTURE_BYTES: u64 = 512 << 20;
const MAX_PICTURE_SIDE: u32 = 1 << 15;
/// The most pixels a picture read, or resized for an image encoder, may have (8192 x 8192).
pub const MAX_PICTURE_PIXELS: u64 = 1 << 26;

/// The orientation PIL finds for a picture's file `bytes` ([`crate::exif`]; `jpeg`: its walk,
/// where it is a JPEG). An error where a PNG's text chunks are more than PIL reads.
fn orientation_of(
    bytes: &[u8],
    jpeg: Option<&crate::jpeg_walk::JpegWalk>,
) -> std::result::Result<image::metadata::Orientation, String> {
    let meta = match jpeg {
        Some(walk) => crate::exif::jpeg_meta(bytes, walk),
        None => crate::exif::png_meta(bytes)?,
    };
    Ok(meta
        .orientation()
        .and_then(image::metadata::Orientation::from_exif)
        .unwrap_or(image::metadata::Orientation::NoTransforms))
}

/// Reads a PNG or JPEG file as 8-bit RGB, EXIF orientation applied; errors name the file and `key`
/// (the run-file key that gave it).
pub fn load_rgb8(path: &Path, file: &str, key: &str) -> Result<Rgb8> {
    use image::ImageDecoder;
    let shown = path.display().to_string();
    let bad = |why: String| Error::config(file, key, format!("{shown}: {why}"));
    if let Some(why) = magcache_core::error::not_a_file(path) {
        return Err(bad(why));
    }
    let bytes = magcache_core::error::read_regular(path, MAX_PICTURE_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    // The decoders allocate what the header claims: bounded before anything is decoded.
    // What the run may use (`MAGCACHE_MEMORY_LIMIT`, else most of the free memory) bounds the
    // decoders' allocations too, ancillary chunks (an ICC profile that inflates) included.
    let available = magcache_core::runtime::guard::available_memory()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_PICTURE_SIDE);
    limits.max_image_height = Some(MAX_PICTURE_SIDE);
    limits.max_alloc = Some(available.bytes.map_or(MAX_PICTURE_PIXELS * 4 * 2, |a| {
        a.min(MAX_PICTURE_PIXELS * 4 * 2)
    }));
    reader.limits(limits);
    match reader.format() {
        Some(image::ImageFormat::Png) | Some(image::ImageFormat::Jpeg) => {}
        Some(f) => {
            return Err(bad(format!(
                "{f:?} pictures are not supported (PNG or JPEG)"
            )))
        }
        None => return Err(bad("not a PNG or JPEG picture".into())),
    }
    // IHDR, the first chunk: bit depth at byte 24, colour type at 25. A 16-bit grayscale PNG
    // with a transparent colour (tRNS) decodes as gray and alpha here, but PIL still opens it as
    // 32-bit integers: refused as the plain one is ([`as_pil_rgb8`]).
    if reader.format() == Some(image::ImageFormat::Png) && bytes.get(24..26) == Some(&[16, 0]) {
        return Err(bad(GRAY16.into()));
    }
    // The JPEG decoder fills what is missing with gray: a cut file, or a header claiming more
    // than the data holds, would condition the run on a picture that is not the user's. The walk
    // also finds the EXIF and XMP segments PIL reads (a PNG's chunks are looked at below).
    let jpeg = match reader.format() == Some(image::ImageFormat::Jpeg) {
        true => Some(crate::jpeg_walk::whole(&bytes).map_err(bad)?),
        false => None,
    };
    let too_large = || {
        bad(format!(
            "the picture is larger than a run reads (at most {MAX_PICTURE_SIDE} pixels a side and {MAX_PICTURE_PIXELS} pixels in all; resize it first)"
        ))
    };
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(),
        e => bad(format!("cannot decode: {e}")),
    })?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > MAX_PICTURE_PIXELS {
        return Err(bad(format!(
            "{w}x{h} pixels, more than the {MAX_PICTURE_PIXELS} a picture may have (resize it first)"
        )));
    }
    // The decoded picture, a turned copy of it and its 8-bit RGB form live at once.
    let need = decoder
        .total_bytes()
        .checked_mul(2)
        .and_then(|b| b.checked_add(u64::from(w) * u64::from(h) * 3));
    if let Some(avail) = available.bytes {
        if need.is_none_or(|n| n > avail) {
            return Err(bad(format!(
                "decoding its {w}x{h} pixels takes about {} MB, more than the {} MB available ({}): resize it first",
                need.map_or(u64::MAX, |n| n >> 20),
                avail >> 20,
                available.source
            )));
        }
    }
    let orientation = orientation_of(&bytes, jpeg.as_ref()).map_err(bad)?;
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(_) => bad(format!(
            "decoding it needs more memory than the run may use ({}) or a picture may take",
            available.source
        )),
        e => bad(format!("cannot decode: {e}")),
    })?;
    img.apply_orientation(orientation);
    let rgb = as_pil_rgb8(&img).map_err(bad)?;
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(bad("the picture is empty".into()));
    }
    Ok(Rgb8 {
        width: w as usize,
        height: h as usize,
        data: rgb.into_raw(),
    })
}

/// Why a 16-bit grayscale PNG is refused.
const GRAY16: &str = "a 16-bit grayscale PNG: diffusers' load_image (PIL) clips its values at 255, which gives a nearly white picture; save it as 8-bit (or as RGB)";

/// A decoded picture as PIL's `convert("RGB")` gives it: 16-bit values cut to their high byte
/// (PIL keeps it, where the `image` crate rounds, `v / 257`), alpha dropped, gray expanded; a
/// 16-bit grayscale picture is refused (why, as the error): PIL opens it as 32-bit integers and
/// clips them at 255, so diffusers' `load_image` gives a nearly white picture, which no run should
/// condition on.
fn as_pil_rgb8(img: &image::DynamicImage) -> std::result::Result<image::RgbImage, String> {
    match img {
        image::DynamicImage::ImageLuma16(_) => Err(GRAY16.into()),
        image::DynamicImage::ImageLumaA16(_)
        | image::DynamicImage::ImageRgb16(_)
        | image::DynamicImage::ImageRgba16(_) => {
            let wide = img.to_rgb16();
            let (w, h) = wide.dimensions();
            let bytes = wide
                .into_raw()
                .into_iter()
                .map(|v| (v >> 8) as u8)
                .collect();
            image::RgbImage::from_raw(w, h, bytes)
                .ok_or_else(|| "cannot convert its 16-bit values".into())
        }
        _ => Ok(img.to_rgb8()),
    }
}

/// PIL's resampling filters used by the pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.LANCZOS` (a = 3).
    Lanczos,
    /// `Image.BICUBIC` (a = -0.5).
    Bicubic,
}

impl Filter {
    /// PIL's `resample` code (`1` LANCZOS, `3` BICUBIC), as image processor configs store it.
    pub fn from_pil_code(code: u64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of PIL's 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// One output sample's input window and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size -> out_size` over the whole axis.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let weights = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * f64::from(1u32 << PRECISION_BITS);
                    (if v < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB picture to `width x height` as PIL's `Image.resize(size, filter)` does for 8-bit
/// RGB (a copy when the size is unchanged).
pub fn resize(img: &Rgb8, width: usize, height: usize, filter: Filter) -> Result<Rgb8> {
    img.check()?;
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return Err(Error::msg(format!(
            "picture: cannot resize {}x{} to {width}x{height}",
            img.width, img.height
        )));
    }
    if img.width == width && img.height == height {
        return Ok(img.clone());
    }
    let mut cur = img.clone();
    if cur.width != width {
        let taps = coefficients(cur.width, width, filter);
        let mut out = vec![0u8; width * cur.height * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (x, t) in taps.iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (k, &w) in t.weights.iter().enumerate() {
                        acc += i64::from(row[(t.start + k) * 3 + c]) * i64::from(w);
                    }
                    out[(y * width + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = Rgb8 {
            width,
            height: cur.height,
            data: out,
        };
    }
    if cur.height != height {
        let taps = coefficients(cur.height, height, filter);
        let w = cur.width;
        let mut out = vec![0u8; w * height * 3];
        for (y, t) in taps.iter().enumerate() {
            for x in 0..w * 3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, &wt) in t.weights.iter().enumerate() {
                    acc += i64::from(cur.data[(t.start + k) * w * 3 + x]) * i64::from(wt);
                }
                out[y * w * 3 + x] = clip8(acc);
            }
        }
        cur = Rgb8 {
            width: w,
            height,
            data: out,
        };
    }
    Ok(cur)
}

impl Rgb8 {
    /// An error unless the pixels hold exactly `width x height` RGB triples.
    pub fn check(&self) -> Result<()> {
        let need = self
            .width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3));
        if need != Some(self.data.len()) {
            return Err(Error::msg(format!(
                "picture: {} bytes do not hold {}x{} RGB pixels",
                self.data.len(),
                self.width,
                self.height
            )));
        }
        Ok(())
    }

    /// The pixels as `[1, 3, H, W]` f32 in [-1, 1] (`uint8 / 255`, then `2x - 1`), as diffusers'
    /// `VaeImageProcessor` hands them to the VAE.
    pub fn to_vae_tensor(&self, dev: &Device) -> Result<Tensor> {
        self.check()?;
        let (h, w) = (self.height, self.width);
        let mut v = vec![0f32; 3 * h * w];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                v[c * h * w + i] = 2.0 * (f32::from(px[c]) / 255.0) - 1.0;
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, h, w), dev)?)
    }

    /// The `width x height` window at (`left`, `top`); an error unless it lies inside the picture.
    pub fn crop(&self, left: usize, top: usize, width: usize, height: usize) -> Result<Rgb8> {
        self.check()?;
        if left.saturating_add(width) > self.width || top.saturating_add(height) > self.height {
            return Err(Error::msg(format!(
                "picture: the {width}x{height} window at ({left}, {top}) is outside the {}x{} picture",
                self.width, self.height
            )));
        }
        let mut data = Vec::with_capacity(width * height * 3);
        for y in top..top + height {
            let row = (y * self.width + left) * 3;
            data.extend_from_slice(&self.data[row..row + width * 3]);
        }
        Ok(Rgb8 {
            width,
            height,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Rgb8 {
        let data = (0..w * h * 3).map(|i| ((i * 37) % 256) as u8).collect();
        Rgb8 {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn same_size_is_a_copy_and_constants_stay_constant() {
        let img = ramp(7, 5);
        assert_eq!(resize(&img, 7, 5, Filter::Lanczos).unwrap(), img);
        let flat = Rgb8 {
            width: 9,
            height: 6,
            data: vec![200; 9 * 6 * 3],
        };
        for f in [Filter::Lanczos, Filter::Bicubic] {
            for (w, h) in [(4, 3), (13, 11), (9, 2)] {
                let r = resize(&flat, w, h, f).unwrap();
                assert_eq!((r.width, r.height), (w, h));
                assert!(r.data.iter().all(|&v| v == 200), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(10, 4), (4, 10), (640, 224), (7, 7)] {
            for f in [Filter::Lanczos, Filter::Bicubic] {
                for t in coefficients(i, o, f) {
                    let s: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64);
                    assert!(t.start + t.weights.len() <= i);
                }
            }
        }
    }
}
