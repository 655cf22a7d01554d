//! A walk over a JPEG's marker segments, before the decoder sees it. The `image` crate's JPEG
//! decoder (zune-jpeg) fills whatever the entropy-coded data does not cover with gray, so a file cut
//! short, or whose frame header claims more pixels than its data holds, would decode "fine" into a
//! picture that is not the user's. The walk finds:
//! - the end-of-image marker that closes the last scan (data after it is allowed: motion photos and
//!   some cameras append a video or a second image there);
//! - the frame header (SOF): its size, components and sampling factors, hence the 8x8 blocks
//!   every pixel needs;
//! - the bytes of entropy-coded data over all scans.
//!
//! A Huffman-coded block costs at least one bit in every scan that covers it (a DC code; baseline
//! adds an end-of-block code), and every block is in some DC scan, so the data of a whole picture has
//! at least `blocks / 8` bytes. Fewer means the header lies (arithmetic-coded frames are not bounded:
//! the decoder refuses them).

/// What the walk learnt of a JPEG.
#[derive(Debug, PartialEq)]
pub(crate) struct JpegWalk {
    /// Offset just past the end-of-image marker.
    pub end: usize,
    /// 8x8 blocks the frame header asks for over all components (0 without a Huffman frame header).
    pub blocks: u64,
    /// Bytes of entropy-coded data over all scans.
    pub coded: u64,
    /// Where the data of each `APP1` segment holding EXIF (`Exif\0\0`) before the first scan lies
    /// in the file, after that prefix: PIL's EXIF block is the first's with the later ones' appended
    /// (the `image` crate's decoder keeps the last alone).
    pub exif: Vec<std::ops::Range<usize>>,
    /// Where the XMP packet of the last XMP `APP1` segment (`http://ns.adobe.com/xap/1.0/\0`) before
    /// the first scan lies, if any: PIL's, for the orientation where EXIF has none.
    pub xmp: Option<std::ops::Range<usize>>,
}

/// The start of an XMP `APP1` segment, its namespace and the NUL after it.
const XMP_NS: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// Why a JPEG's structure is refused.
#[derive(Debug, PartialEq)]
pub(crate) enum JpegFault {
    /// The data ends before its end-of-image marker (cut short).
    Truncated,
    /// A marker segment is malformed (its length runs past the data, a frame header too short).
    Malformed(&'static str),
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(*b.get(at)?) << 8 | usize::from(*b.get(at + 1)?))
}

/// 8x8 blocks of a frame header's components (`seg` is the segment after its length field).
fn frame_blocks(seg: &[u8]) -> Option<u64> {
    let height = u64::from(u16::from_be_bytes([*seg.get(1)?, *seg.get(2)?]));
    let width = u64::from(u16::from_be_bytes([*seg.get(3)?, *seg.get(4)?]));
    let n = usize::from(*seg.get(5)?);
    let comps: Vec<(u64, u64)> = (0..n)
        .map(|i| {
            let f = *seg.get(6 + 3 * i + 1)?;
            Some((u64::from(f >> 4).max(1), u64::from(f & 15).max(1)))
        })
        .collect::<Option<_>>()?;
    let hmax = comps.iter().map(|c| c.0).max()?;
    let vmax = comps.iter().map(|c| c.1).max()?;
    let mut blocks = 0u64;
    for (h, v) in comps {
        let cw = (width * h).div_ceil(hmax);
        let ch = (height * v).div_ceil(vmax);
        blocks = blocks.checked_add(cw.div_ceil(8).checked_mul(ch.div_ceil(8))?)?;
    }
    Some(blocks)
}

/// Walks `b` from its start-of-image marker to the end-of-image marker that follows the scans.
pub(crate) fn walk(b: &[u8]) -> Result<JpegWalk, JpegFault> {
    if b.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(JpegFault::Malformed("no start-of-image marker"));
    }
    let (mut at, mut blocks, mut coded) = (2usize, 0u64, 0u64);
    let (mut exif, mut xmp, mut scanned) = (Vec::new(), None, false);
    loop {
        // Extraneous bytes before a marker (libjpeg warns and skips them), and fill bytes
        // (FF FF ...).
        while b.get(at).is_some_and(|&x| x != 0xFF) {
            at += 1;
        }
        while b.get(at) == Some(&0xFF) && b.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (b.get(at), b.get(at + 1)) else {
            return Err(JpegFault::Truncated);
        };
        at += 2;
        match marker {
            0xD9 => {
                return Ok(JpegWalk {
                    end: at,
                    blocks,
                    coded,
                    exif,
                    xmp,
                })
            }
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let len = be16(b, at).ok_or(JpegFault::Truncated)?;
        if len < 2 {
            return Err(JpegFault::Malformed("a segment length under 2"));
        }
        let seg = b.get(at + 2..at + len).ok_or(JpegFault::Truncated)?;
        // Huffman-coded DCT frames (baseline, extended, progressive): what the decoder reads.
        if (0xC0..=0xC2).contains(&marker) {
            blocks = frame_blocks(seg).ok_or(JpegFault::Malformed("a frame header too short"))?;
        }
        if marker == 0xE1 && !scanned && seg.starts_with(b"Exif\0\0") {
            exif.push(at + 2 + 6..at + len);
        }
        if marker == 0xE1 && !scanned && seg.starts_with(XMP_NS) {
            xmp = Some(at + 2 + XMP_NS.len()..at + len);
        }
        at += len;
        if marker == 0xDA {
            scanned = true;
            // Entropy-coded data runs to the next marker other than a stuffed zero or a restart.
            let start = at;
            loop {
                match (b.get(at), b.get(at + 1)) {
                    (None, _) | (Some(&0xFF), None) => return Err(JpegFault::Truncated),
                    (Some(&0xFF), Some(&m)) if m == 0x00 || (0xD0..=0xD7).contains(&m) => at += 2,
                    (Some(&0xFF), Some(_)) => break,
                    _ => at += 1,
                }
            }
            coded += (at - start) as u64;
        }
    }
}

/// The walk of a whole JPEG, or its fault in words: a whole JPEG's data ends at its end marker (what
/// follows it is ignored) and covers the blocks its header asks for.
pub(crate) fn whole(b: &[u8]) -> Result<JpegWalk, String> {
    match walk(b) {
        Err(JpegFault::Truncated) => Err(
            "the JPEG is truncated (its data ends before the end-of-image marker): cannot decode it whole"
                .into(),
        ),
        Err(JpegFault::Malformed(why)) => Err(format!("not a well-formed JPEG ({why})")),
        Ok(w) if w.coded < w.blocks / 8 => Err(format!(
            "the JPEG's header claims {} 8x8 blocks but its data ({} bytes) cannot hold them: the decoder would fill the rest with gray",
            w.blocks, w.coded
        )),
        Ok(w) => Ok(w),
    }
}

/// [`whole`]'s fault alone.
#[cfg(test)]
fn fault(b: &[u8]) -> Option<String> {
    whole(b).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut out),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        out
    }

    #[test]
    fn a_whole_jpeg_walks_to_its_end_and_its_blocks() {
        let b = jpeg(40, 24);
        let w = walk(&b).unwrap();
        assert_eq!(w.end, b.len());
        // The `image` encoder writes 4:4:4: 5x3 blocks for each of the three components.
        assert_eq!(w.blocks, 3 * 15);
        assert!(w.coded > 0 && w.coded < b.len() as u64);
        assert_eq!(fault(&b), None);
        // A motion photo's trailer after the end marker is not the picture's.
        let mut t = b.clone();
        t.extend(std::iter::repeat_n(0xFFu8, 10_000));
        t.extend(b"ftypmp42");
        assert_eq!(walk(&t).unwrap().end, b.len());
        assert_eq!(fault(&t), None);
    }

    /// The EXIF segments before the scans, in order (PIL appends the later ones' data to the
    /// first's), not an XMP `APP1`; the XMP packet is the last XMP segment's.
    #[test]
    fn the_first_exif_segment_is_found() {
        let b = jpeg(16, 8);
        assert!(walk(&b).unwrap().exif.is_empty());
        let seg = |body: &[u8]| -> Vec<u8> {
            let mut s = vec![0xFF, 0xE1];
            s.extend(((body.len() + 2) as u16).to_be_bytes());
            s.extend(body);
            s
        };
        let mut with = b[..2].to_vec();
        with.extend(seg(b"http://ns.adobe.com/xap/1.0/\0<x/>"));
        with.extend(seg(b"Exif\0\0first"));
        with.extend(seg(b"Exif\0\0second"));
        with.extend(seg(b"http://ns.adobe.com/xap/1.0/\0<last/>"));
        with.extend(&b[2..]);
        let w = walk(&with).unwrap();
        let exif: Vec<&[u8]> = w.exif.iter().map(|r| &with[r.clone()]).collect();
        assert_eq!(exif, [&b"first"[..], b"second"]);
        // The last XMP segment before the scans, its packet after the namespace's NUL.
        assert_eq!(&with[w.xmp.unwrap()], b"<last/>");
        assert_eq!(walk(&b).unwrap().xmp, None);
    }

    #[test]
    fn cut_lying_or_broken_jpegs_are_named() {
        let b = jpeg(64, 64);
        for cut in [b.len() - 2, b.len() / 2, 300, 3] {
            assert_eq!(walk(&b[..cut]), Err(JpegFault::Truncated), "cut at {cut}");
        }
        // The frame header claims 8000x8000 pixels over 64x64 pixels' data.
        let mut lie = b.clone();
        let sof = lie.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        lie[sof + 5..sof + 9].copy_from_slice(&[0x1F, 0x40, 0x1F, 0x40]);
        let why = fault(&lie).unwrap();
        assert!(why.contains("claims") && why.contains("gray"), "{why}");
        let mut bad = b.clone();
        bad[sof + 2..sof + 4].copy_from_slice(&[0xFF, 0xF0]);
        assert!(fault(&bad).is_some());
        assert!(fault(b"\x89PNG").is_some());
    }
}
