//! Pictures a person opens from decoded pixels: `.png` (every frame side by side in a grid), `.gif`
//! (the `gif` crate, frames quantised by its NeuQuant), `.mp4` (H.264 through `ffmpeg` on PATH).

use candle_core::Tensor;
use magcache_core::{Error, Result};
use std::path::{Path, PathBuf};

/// Container kinds `--video` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoKind {
    Png,
    Gif,
    Mp4,
}

/// The kind of `path` by its extension; `Err` names the flag and the kinds known. `.mp4` also needs
/// `ffmpeg` on PATH, checked here so the run fails before any work.
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
        _ => {
            return Err(Error::msg(format!(
                "{flag} {}: unknown picture format `.{ext}` (use .mp4 (needs ffmpeg), .gif, or .png for a grid of frames)",
                path.display()
            )))
        }
    };
    if kind == VideoKind::Mp4 && find_on_path("ffmpeg").is_none() {
        return Err(Error::msg(format!(
            "{flag} {}: writing .mp4 needs `ffmpeg` on PATH, which was not found (install ffmpeg, or write .gif or .png)",
            path.display()
        )));
    }
    Ok(kind)
}

fn find_on_path(exe: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
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

    /// Several sets of frames one above the other (dense, cached, difference), each set a row.
    pub fn stack_rows(sets: &[Frames]) -> Result<Frames> {
        let first = sets.first().ok_or_else(|| Error::msg("nothing to draw"))?;
        let (w, h, n) = (first.width, first.height, first.rgb.len());
        if sets
            .iter()
            .any(|s| (s.width, s.height, s.rgb.len()) != (w, h, n))
        {
            return Err(Error::msg("pictures side by side need one size"));
        }
        let rows = sets.len();
        let rgb = (0..n)
            .map(|f| {
                let mut out = Vec::with_capacity(w * h * 3 * rows);
                for s in sets {
                    out.extend_from_slice(&s.rgb[f]);
                }
                out
            })
            .collect();
        Ok(Frames {
            width: w,
            height: h * rows,
            rgb,
        })
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
            let delay = (100 / fps.max(1)).max(1) as u16;
            for f in &self.rgb {
                let mut frame = gif::Frame::from_rgb_speed(w, h, f, 10);
                frame.delay = delay;
                enc.write_frame(&frame)
                    .map_err(|e| Error::msg(format!("gif: {e}")))?;
            }
        }
        Ok(out)
    }

    /// H.264 MP4 written by `ffmpeg` into `dest` (raw RGB frames on its stdin).
    pub fn mp4(&self, fps: u32, dest: &Path) -> Result<()> {
        use std::io::Write;
        let shown = dest.display().to_string();
        let mut child = std::process::Command::new("ffmpeg")
            .args([
                "-y",
                "-loglevel",
                "error",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
            ])
            .args(["-s", &format!("{}x{}", self.width, self.height)])
            .args(["-r", &fps.to_string(), "-i", "-"])
            // yuv420p needs even sizes: pad by one pixel where odd.
            .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4"])
            .arg(dest)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(&shown, format!("cannot start ffmpeg: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            for f in &self.rgb {
                stdin
                    .write_all(f)
                    .map_err(|e| Error::io(&shown, format!("ffmpeg: {e}")))?;
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(&shown, format!("ffmpeg: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            return Err(Error::io(
                &shown,
                format!(
                    "ffmpeg failed: {}",
                    msg.lines().next().unwrap_or("no message")
                ),
            ));
        }
        // An encoder that exits 0 without writing a video (or writes something else) must not
        // leave an empty or broken .mp4: an MP4 file starts with its `ftyp` box.
        let mut head = [0u8; 8];
        let n = std::fs::File::open(dest)
            .and_then(|mut f| {
                use std::io::Read;
                f.read(&mut head)
            })
            .unwrap_or(0);
        if n < 8 || &head[4..8] != b"ftyp" {
            return Err(Error::io(
                &shown,
                if n == 0 {
                    "ffmpeg exited successfully but wrote an empty video; nothing written"
                } else {
                    "ffmpeg exited successfully but wrote no MP4 video (no `ftyp` box at the start); nothing written"
                },
            ));
        }
        Ok(())
    }
}
