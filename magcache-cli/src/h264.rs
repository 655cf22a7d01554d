//! H.264 MP4 in process: OpenH264 (the `openh264` crate, its bundled C++ source built by cargo, no
//! system library) encodes the frames, the `mp4` crate muxes them, and the movie box is then moved
//! in front of the media data ("faststart") so a browser plays the file as it arrives.
//!
//! - Colour: RGB to BT.601 limited-range YUV 4:2:0 (the chroma of each 2x2 block from its mean
//!   colour), signalled in the stream's VUI (SMPTE 170M), as browsers assume for this size.
//! - Sizes: 4:2:0 needs even width and height, and OpenH264 at least 16 pixels each way; a picture
//!   is padded up to that (its last column and row repeated). Pictures past OpenH264's largest
//!   (3840x2160, either orientation) are halved (2x2 means) until they fit.
//! - Stream: constrained baseline (no B-frames, so decode order is display order), one slice a
//!   frame, no frame skipped, OpenH264's rate control off (its fixed quantiser: the buffer-based
//!   mode failed on noisy frames);
//!   IDR frames are the sync samples. Track timescale `fps * 1000`, each frame 1000 ticks.

use magcache_core::{Error, Result};
use std::io::Cursor;

type Res<T> = std::result::Result<T, String>;

/// The BT.601 limited-range ("TV") YUV 4:2:0 planes of one RGB frame of even size, chroma of each
/// 2x2 block from its mean colour; values rounded.
fn rgb_to_i420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let (cw, ch) = (w / 2, h / 2);
    let mut out = vec![0u8; w * h + 2 * cw * ch];
    let (y_plane, chroma) = out.split_at_mut(w * h);
    let (u_plane, v_plane) = chroma.split_at_mut(cw * ch);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        (
            rgb[i] as f32 / 255.0,
            rgb[i + 1] as f32 / 255.0,
            rgb[i + 2] as f32 / 255.0,
        )
    };
    let to_u8 = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            y_plane[y * w + x] = to_u8(16.0 + 65.481 * r + 128.553 * g + 24.966 * b);
        }
    }
    for j in 0..ch {
        for i in 0..cw {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px(2 * i + dx, 2 * j + dy);
                r += p.0 / 4.0;
                g += p.1 / 4.0;
                b += p.2 / 4.0;
            }
            u_plane[j * cw + i] = to_u8(128.0 - 37.797 * r - 74.203 * g + 112.0 * b);
            v_plane[j * cw + i] = to_u8(128.0 + 112.0 * r - 93.786 * g - 18.214 * b);
        }
    }
    out
}

/// The encoded size of a `w x h` picture: even (4:2:0), and at least 16 pixels each way (OpenH264
/// refuses smaller pictures).
fn coded_size(w: usize, h: usize) -> (usize, usize) {
    ((w + w % 2).max(16), (h + h % 2).max(16))
}

/// `rgb` (`w x h`, 3 bytes a pixel, both at least 1) padded to `pw x ph` by repeating its last
/// column and row.
fn pad_to(rgb: &[u8], w: usize, h: usize, pw: usize, ph: usize) -> Vec<u8> {
    if (pw, ph) == (w, h) {
        return rgb.to_vec();
    }
    let mut out = Vec::with_capacity(pw * ph * 3);
    for y in 0..ph {
        let row = &rgb[y.min(h - 1) * w * 3..(y.min(h - 1) + 1) * w * 3];
        out.extend_from_slice(row);
        for _ in w..pw {
            out.extend_from_slice(&row[(w - 1) * 3..]);
        }
    }
    out
}

/// Splits an Annex B stream (`00 00 01` / `00 00 00 01` start codes) into its NAL units.
fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::new();
    for (k, &(_, body)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(stream.len(), |&(s, _)| s);
        // A four-byte start code's leading zero belongs to no NAL.
        while end > body && stream[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        if end > body {
            out.push(&stream[body..end]);
        }
    }
    out
}

/// The largest picture OpenH264 encodes: 3840x2160 either way round.
fn fits(w: usize, h: usize) -> bool {
    w.max(h) <= 3840 && w.min(h) <= 2160
}

/// `rgb` (`w x h`) halved: each pixel the mean of a 2x2 block (the last odd row or column dropped).
fn halve(rgb: &[u8], w: usize, h: usize) -> (Vec<u8>, usize, usize) {
    let (hw, hh) = (w / 2, h / 2);
    let mut out = Vec::with_capacity(hw * hh * 3);
    for y in 0..hh {
        for x in 0..hw {
            for c in 0..3 {
                let at = |dx: usize, dy: usize| rgb[((2 * y + dy) * w + 2 * x + dx) * 3 + c] as u32;
                out.push(((at(0, 0) + at(1, 0) + at(0, 1) + at(1, 1) + 2) / 4) as u8);
            }
        }
    }
    (out, hw, hh)
}

/// An H.264 MP4 of `frames` (RGB, `w x h`, 3 bytes a pixel) at `fps` frames per second (see the
/// module's notes); `Err` in one line.
pub fn encode_mp4(frames: &[Vec<u8>], w: usize, h: usize, fps: u32) -> Result<Vec<u8>> {
    let mut frames = std::borrow::Cow::Borrowed(frames);
    let (mut w, mut h) = (w, h);
    if frames.iter().any(|f| f.len() != w * h * 3) {
        return Err(Error::msg(format!(
            "H.264: frames of {w}x{h} pixels need {} bytes each",
            w * h * 3
        )));
    }
    while !fits(w + w % 2, h + h % 2) && w >= 2 && h >= 2 {
        let mut next = Vec::with_capacity(frames.len());
        let (mut nw, mut nh) = (w, h);
        for f in frames.iter() {
            let (v, a, b) = halve(f, w, h);
            (nw, nh) = (a, b);
            next.push(v);
        }
        frames = std::borrow::Cow::Owned(next);
        (w, h) = (nw, nh);
    }
    encode(&frames, w, h, fps).map_err(|e| Error::msg(format!("H.264 MP4: {e}")))
}

/// The MP4 sample of one encoded frame: its NAL units, each behind its 4-byte length, less the
/// parameter sets (the first SPS and PPS are kept for the track's header).
fn frame_sample(
    stream: &[u8],
    sps: &mut Option<Vec<u8>>,
    pps: &mut Option<Vec<u8>>,
) -> Res<Vec<u8>> {
    let mut sample = Vec::with_capacity(stream.len() + 16);
    for nal in nal_units(stream) {
        match nal[0] & 0x1f {
            7 => {
                sps.get_or_insert_with(|| nal.to_vec());
            }
            8 => {
                pps.get_or_insert_with(|| nal.to_vec());
            }
            _ => {
                let n = u32::try_from(nal.len()).map_err(|_| "NAL unit over 4 GB".to_string())?;
                sample.extend_from_slice(&n.to_be_bytes());
                sample.extend_from_slice(nal);
            }
        }
    }
    Ok(sample)
}

/// The file's brands (ISO base media with AVC) and its 1 ms movie timescale.
fn mp4_config() -> Res<mp4::Mp4Config> {
    let brand = |s: &str| -> Res<mp4::FourCC> { s.parse().map_err(|e| format!("mp4: {e:?}")) };
    Ok(mp4::Mp4Config {
        major_brand: brand("isom")?,
        minor_version: 512,
        compatible_brands: vec![
            brand("isom")?,
            brand("iso2")?,
            brand("avc1")?,
            brand("mp41")?,
        ],
        timescale: 1000,
    })
}

fn encode(frames: &[Vec<u8>], w: usize, h: usize, fps: u32) -> Res<Vec<u8>> {
    use openh264::encoder::{
        BitRate, Encoder, EncoderConfig, FrameRate, FrameType, RateControlMode, UsageType,
        VuiConfig,
    };
    use openh264::formats::YUVBuffer;
    if frames.is_empty() || w == 0 || h == 0 {
        return Err("no frames to encode".into());
    }
    if fps == 0 || fps > 1000 {
        return Err(format!("{fps} frames per second: give 1 to 1000"));
    }
    let (pw, ph) = coded_size(w, h);
    let width = u16::try_from(pw).map_err(|_| format!("{pw} pixels wide: too wide for MP4"))?;
    let height = u16::try_from(ph).map_err(|_| format!("{ph} pixels tall: too tall for MP4"))?;
    // The target the encoder is given, about 1 bit a pixel a frame (with rate control off, below,
    // its fixed quantiser decides what a frame spends).
    let bps = ((pw * ph) as u64 * fps as u64).clamp(500_000, 200_000_000) as u32;
    let config = EncoderConfig::new()
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .bitrate(BitRate::from_bps(bps))
        // Rate control off (the encoder's fixed quantiser): no frame skipped and no warning
        // printed (the quality, bitrate and timestamp modes print one on stderr when frame
        // skipping is off), and a noisy frame is coded whole: the buffer-based mode failed on
        // one (OpenH264's error 3 at 256x256, `mp4_of_noise_is_written_and_decodes`).
        .rate_control_mode(RateControlMode::Off)
        .usage_type(UsageType::CameraVideoRealTime)
        .vui(VuiConfig::bt601());
    let api = openh264::OpenH264API::from_source();
    let mut enc = Encoder::with_api_config(api, config).map_err(|e| format!("the encoder: {e}"))?;
    let timescale = fps * 1000;
    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        if f.len() != w * h * 3 {
            return Err(format!(
                "frame {i}: {} bytes, expected {}",
                f.len(),
                w * h * 3
            ));
        }
        let padded = pad_to(f, w, h, pw, ph);
        let yuv = YUVBuffer::from_vec(rgb_to_i420(&padded, pw, ph), pw, ph);
        let bs = enc
            .encode(&yuv)
            .map_err(|e| format!("the encoder, frame {i}: {e}"))?;
        let sync = bs.frame_type() == FrameType::IDR;
        let stream = bs.to_vec();
        let sample = frame_sample(&stream, &mut sps, &mut pps)?;
        if sample.is_empty() {
            return Err(format!("the encoder gave no picture for frame {i}"));
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err("the encoder wrote no SPS or PPS".into());
    };
    if sps.len() < 4 {
        return Err("the encoder wrote an SPS shorter than 4 bytes".into());
    }
    let cfg = mp4_config()?;
    let mut w4 = mp4::Mp4Writer::write_start(Cursor::new(Vec::new()), &cfg)
        .map_err(|e| format!("mp4: {e}"))?;
    w4.add_track(&mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width,
            height,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    })
    .map_err(|e| format!("mp4: {e}"))?;
    for (i, (bytes, sync)) in samples.into_iter().enumerate() {
        w4.write_sample(
            1,
            &mp4::Mp4Sample {
                start_time: i as u64 * 1000,
                duration: 1000,
                rendering_offset: 0,
                is_sync: sync,
                bytes: bytes.into(),
            },
        )
        .map_err(|e| format!("mp4: {e}"))?;
    }
    w4.write_end().map_err(|e| format!("mp4: {e}"))?;
    faststart(&w4.into_writer().into_inner())
}

/// Top-level boxes of `data`: (type, start, end).
fn boxes(data: &[u8], from: usize, to: usize) -> Res<Vec<([u8; 4], usize, usize)>> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        if at + 8 > to {
            return Err("mp4: truncated box header".into());
        }
        let size32 = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let kind = [data[at + 4], data[at + 5], data[at + 6], data[at + 7]];
        let size = match size32 {
            0 => to - at,
            1 => {
                if at + 16 > to {
                    return Err("mp4: truncated box header".into());
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[at + 8..at + 16]);
                usize::try_from(u64::from_be_bytes(b))
                    .map_err(|_| "mp4: box too large".to_string())?
            }
            n => n as usize,
        };
        if size < 8 || at + size > to {
            return Err(format!(
                "mp4: box `{}` of bad size",
                String::from_utf8_lossy(&kind)
            ));
        }
        out.push((kind, at, at + size));
        at += size;
    }
    Ok(out)
}

/// Adds `delta` to every chunk offset (`stco`) under the boxes `data[from..to]`.
fn shift_chunk_offsets(data: &mut [u8], from: usize, to: usize, delta: u64) -> Res<()> {
    for (kind, start, end) in boxes(data, from, to)? {
        match &kind {
            b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" => {
                shift_chunk_offsets(data, start + 8, end, delta)?
            }
            b"stco" => {
                let body = start + 8;
                if body + 8 > end {
                    return Err("mp4: truncated stco".into());
                }
                let n = u32::from_be_bytes([
                    data[body + 4],
                    data[body + 5],
                    data[body + 6],
                    data[body + 7],
                ]) as usize;
                if body + 8 + 4 * n > end {
                    return Err("mp4: truncated stco".into());
                }
                for k in 0..n {
                    let p = body + 8 + 4 * k;
                    let v = u32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]])
                        as u64
                        + delta;
                    let v =
                        u32::try_from(v).map_err(|_| "mp4: chunk offset past 4 GB".to_string())?;
                    data[p..p + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            b"co64" => return Err("mp4: 64-bit chunk offsets are not moved".into()),
            _ => {}
        }
    }
    Ok(())
}

/// `ftyp, mdat, moov` reordered as `ftyp, moov, mdat` (the chunk offsets moved with the data), so
/// that a browser can start playing before the whole file has arrived.
fn faststart(data: &[u8]) -> Res<Vec<u8>> {
    let top = boxes(data, 0, data.len())?;
    let find = |k: &[u8; 4]| top.iter().find(|b| &b.0 == k).copied();
    let (Some(ftyp), Some(mdat), Some(moov)) = (find(b"ftyp"), find(b"mdat"), find(b"moov")) else {
        return Err("mp4: the muxer wrote no ftyp, mdat or moov box".into());
    };
    if moov.1 < mdat.1 {
        return Ok(data.to_vec());
    }
    let mut moov_bytes = data[moov.1..moov.2].to_vec();
    let len = moov_bytes.len();
    shift_chunk_offsets(&mut moov_bytes, 0, len, len as u64)?;
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&data[ftyp.1..ftyp.2]);
    out.extend_from_slice(&moov_bytes);
    // Everything between ftyp and moov (the mdat) follows, moved by the moov's length.
    out.extend_from_slice(&data[ftyp.2..moov.1]);
    out.extend_from_slice(&data[moov.2..]);
    Ok(out)
}
