//! Pictures a person opens from decoded pixels: `.png` (every frame side by side in a grid), `.gif`
//! (the `gif` crate, frames quantised by its NeuQuant), `.mp4` (H.264, encoded and muxed in process:
//! [`crate::h264`]).

use candle_core::Tensor;
use magcache_core::{Error, Result};
use std::path::Path;

/// Container kinds `--video` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoKind {
    Png,
    Gif,
    Mp4,
}

/// The kind of `path` by its extension; `Err` names the flag and the kinds known.
pub fn video_kind(flag: &str, path: &Path) -> Result<VideoKind> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let kind = match ext.as_str() {
        "png" => VideoKind::Png,
        "gif" => VideoKind::Gif,
        "mp4" => VideoKind::Mp4,
        "" => {
            return Err(Error::msg(format!(
                "{flag} {}: the name has no extension to tell the format (use a name ending in .mp4, .gif, or .png for a grid of frames)",
                path.display()
            )))
        }
        _ => {
            return Err(Error::msg(format!(
                "{flag} {}: unknown picture format `.{ext}` (use .mp4, .gif, or .png for a grid of frames)",
                path.display()
            )))
        }
    };
    Ok(kind)
}

/// The fastest frame rate a GIF plays at: its delays are whole hundredths of a second, and players
/// show a delay under 2/100 s as 1/10 s (so a shorter one would play slower, not faster).
pub const GIF_MAX_FPS: u32 = 50;

/// A GIF frame's delay in hundredths of a second for `fps`: the nearest, at least 2
/// ([`GIF_MAX_FPS`]).
pub fn gif_delay(fps: u32) -> u16 {
    let d = (100.0 / f64::from(fps.max(1))).round();
    (d as u16).max(2)
}

/// Frames of one sample as 8-bit RGB: `pixels` is `[F, H, W, 3]` (or `[H, W, 3]`) in [0, 1].
pub struct Frames {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<Vec<u8>>,
}

impl Frames {
    /// The frames of sample 0 of decoded pixels `[B, F, H, W, 3]` (video) or `[B, H, W, 3]` (image).
    pub fn from_decoded(decoded: &Tensor) -> Result<Frames> {
        let t = decoded.to_dtype(candle_core::DType::F32)?;
        let t = match t.rank() {
            5 => t.get(0)?,
            4 => t.get(0)?.unsqueeze(0)?,
            r => {
                return Err(Error::msg(format!(
                    "decoded pixels of rank {r}: expected [B, F, H, W, 3] or [B, H, W, 3]"
                )))
            }
        };
        let (f, h, w, c) = t.dims4()?;
        if c != 3 {
            return Err(Error::msg(format!(
                "decoded pixels have {c} channels, expected 3 (RGB)"
            )));
        }
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let per = h * w * 3;
        let rgb = (0..f)
            .map(|i| {
                v[i * per..(i + 1) * per]
                    .iter()
                    .map(|&x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect()
            })
            .collect();
        Ok(Frames {
            width: w,
            height: h,
            rgb,
        })
    }

    /// Several sets of frames side by side (dense | cached | difference), left to right, 2-pixel
    /// dark gaps between them: frame `i` of the result holds frame `i` of every set.
    pub fn side_by_side(sets: &[Frames]) -> Result<Frames> {
        let first = sets.first().ok_or_else(|| Error::msg("nothing to draw"))?;
        let (w, h, n) = (first.width, first.height, first.rgb.len());
        if sets
            .iter()
            .any(|s| (s.width, s.height, s.rgb.len()) != (w, h, n))
        {
            return Err(Error::msg("pictures side by side need one size"));
        }
        let gap = 2;
        let width = sets.len() * w + (sets.len() - 1) * gap;
        let rgb = (0..n)
            .map(|f| {
                let mut out = vec![40u8; width * h * 3];
                for (k, s) in sets.iter().enumerate() {
                    let x0 = k * (w + gap);
                    for y in 0..h {
                        let dst = (y * width + x0) * 3;
                        out[dst..dst + w * 3]
                            .copy_from_slice(&s.rgb[f][y * w * 3..(y + 1) * w * 3]);
                    }
                }
                out
            })
            .collect();
        Ok(Frames {
            width,
            height: h,
            rgb,
        })
    }

    /// Dense | cached | |dense - cached| x `gain` side by side, from two decoded outputs
    /// (`[B, F, H, W, 3]` or `[B, H, W, 3]`, sample 0).
    pub fn comparison(dense: &Tensor, cached: &Tensor, gain: f64) -> Result<Frames> {
        let diff = ((dense - cached)?.abs()? * gain)?;
        Frames::side_by_side(&[
            Frames::from_decoded(dense)?,
            Frames::from_decoded(cached)?,
            Frames::from_decoded(&diff)?,
        ])
    }

    /// At most `n` of the frames, evenly spaced from the first to the last (all when there are no
    /// more than `n`).
    pub fn evenly(&self, n: usize) -> Frames {
        let total = self.rgb.len();
        let rgb = if total <= n || n < 2 {
            self.rgb.iter().take(n.max(1)).cloned().collect()
        } else {
            (0..n)
                .map(|i| self.rgb[(i * (total - 1) + (n - 1) / 2) / (n - 1)].clone())
                .collect()
        };
        Frames {
            width: self.width,
            height: self.height,
            rgb,
        }
    }

    /// Every frame side by side, wrapping after `per_row`, 2-pixel dark gaps: one RGB PNG.
    pub fn grid_png(&self, per_row: usize) -> Result<Vec<u8>> {
        let n = self.rgb.len().max(1);
        let per_row = per_row.clamp(1, n);
        let gap = 2;
        let (w, h) = (self.width, self.height);
        let lines = n.div_ceil(per_row);
        let (cw, ch) = (w + gap, h + gap);
        let (width, height) = (per_row * cw + gap, lines * ch + gap);
        let mut img = vec![40u8; width * height * 3];
        for (i, frame) in self.rgb.iter().enumerate() {
            let (r, c) = (i / per_row, i % per_row);
            for y in 0..h {
                let dst = ((gap + r * ch + y) * width + gap + c * cw) * 3;
                img[dst..dst + w * 3].copy_from_slice(&frame[y * w * 3..(y + 1) * w * 3]);
            }
        }
        crate::image::encode_png(width, height, png::ColorType::Rgb, &img)
    }

    /// The first frame alone as a PNG: the pixels `grid_png` draws inside its frame.
    pub fn first_png(&self) -> Result<Vec<u8>> {
        let first = self
            .rgb
            .first()
            .ok_or_else(|| Error::msg("no decoded frame"))?;
        crate::image::encode_png(self.width, self.height, png::ColorType::Rgb, first)
    }

    /// An animated GIF at `fps`, looping forever.
    pub fn gif(&self, fps: u32) -> Result<Vec<u8>> {
        let (w, h) = (
            u16::try_from(self.width).map_err(|_| Error::msg("gif: frame wider than 65535"))?,
            u16::try_from(self.height).map_err(|_| Error::msg("gif: frame taller than 65535"))?,
        );
        let mut out = Vec::new();
        {
            let mut enc = gif::Encoder::new(&mut out, w, h, &[])
                .map_err(|e| Error::msg(format!("gif: {e}")))?;
            enc.set_repeat(gif::Repeat::Infinite)
                .map_err(|e| Error::msg(format!("gif: {e}")))?;
            let delay = gif_delay(fps);
            for f in &self.rgb {
                let mut frame = gif::Frame::from_rgb_speed(w, h, f, 10);
                frame.delay = delay;
                enc.write_frame(&frame)
                    .map_err(|e| Error::msg(format!("gif: {e}")))?;
            }
        }
        Ok(out)
    }

    /// An H.264 MP4 at `fps`, encoded and muxed in process ([`crate::h264`]).
    pub fn mp4(&self, fps: u32) -> Result<Vec<u8>> {
        crate::h264::encode_mp4(&self.rgb, self.width, self.height, fps)
    }
}
