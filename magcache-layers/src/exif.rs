//! The orientation of a picture, as PIL's `ImageOps.exif_transpose` (which diffusers' `load_image`
//! applies) finds it. The EXIF block (a JPEG's EXIF `APP1` segments, the first with the later ones'
//! data appended, which [`crate::jpeg_walk`] finds; a PNG's last `eXIf` chunk, or `tEXt` chunk named
//! `exif`, anywhere before `IEND`) is read as PIL's `ImageFileDirectory_v2.load` reads its first
//! IFD: entries of a type it does not read, or of no data, are skipped; one whose data lies past the
//! block ends the reading (PIL's read fails there); the first entry kept for a tag is its value. The
//! orientation turns the picture where its first value (PIL keeps the first of several) equals
//! 2..=8: an integer type (SBYTE, SHORT, LONG and their signed forms, IFD, LONG8), a whole RATIONAL,
//! or a whole FLOAT or DOUBLE (PIL's lookup compares by value); BYTE (PIL keeps bytes), ASCII and
//! UNDEFINED never do. Where the block has no orientation entry (or there is none), PIL falls back
//! on the XMP packet's `tiff:Orientation`: the first `tiff:Orientation="D` or `tiff:Orientation>D`
//! in it (a JPEG's last XMP `APP1` segment, a PNG's last `XML:com.adobe.xmp` text chunk). Not read:
//! EXIF carried in ImageMagick's `Raw profile type exif` text chunks.

/// Bytes of one value of each TIFF type PIL reads (its others it skips as if the entry were not
/// there): BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT, SLONG, SRATIONAL, FLOAT,
/// DOUBLE, IFD, and 16, LONG8.
fn unit_bytes(kind: u16) -> Option<u64> {
    match kind {
        1 | 2 | 6 | 7 => Some(1),
        3 | 8 => Some(2),
        4 | 9 | 11 | 13 => Some(4),
        5 | 10 | 12 | 16 => Some(8),
        _ => None,
    }
}

/// Tag 0x0112 of an EXIF block as PIL holds it (`block` with or without its `Exif\0\0` prefix,
/// PIL strips one or two): `None` where its first IFD has no entry PIL keeps for the tag (then PIL
/// looks at the XMP packet), else `Some` of the orientation where the entry's value turns the
/// picture or is 1. A non-empty block that is not TIFF gives `Some(None)`: PIL reads no XMP
/// orientation then either (it keeps an empty EXIF, or refuses the picture).
fn orientation_entry(block: &[u8]) -> Option<Option<u8>> {
    let mut tiff = block;
    for _ in 0..2 {
        tiff = tiff.strip_prefix(b"Exif\0\0").unwrap_or(tiff);
    }
    if tiff.is_empty() {
        return None;
    }
    let big = match tiff.get(0..4) {
        Some([0x49, 0x49, 42, 0]) => false,
        Some([0x4d, 0x4d, 0, 42]) => true,
        _ => return Some(None),
    };
    let bytes = |o: usize, n: usize| tiff.get(o..o.checked_add(n)?);
    let uint = |b: &[u8]| -> u64 {
        let step = |v: u64, x: &u8| v << 8 | u64::from(*x);
        match big {
            true => b.iter().fold(0, step),
            false => b.iter().rev().fold(0, step),
        }
    };
    // A cut header: PIL refuses the block.
    let Some(ifd) = bytes(4, 4) else {
        return Some(None);
    };
    let ifd = usize::try_from(uint(ifd)).ok()?;
    let entries = uint(bytes(ifd, 2)?);
    let limit = tiff.len() as u64;
    let (mut total, mut kept) = (0u64, vec![false; 1 << 16]);
    for k in 0..entries as usize {
        // A short entry ends the reading.
        let e = bytes(ifd + 2 + 12 * k, 12)?;
        let (tag, kind, count) = (
            uint(&e[0..2]) as usize,
            uint(&e[2..4]) as u16,
            uint(&e[4..8]),
        );
        let Some(size) = unit_bytes(kind).map(|u| u * count) else {
            continue;
        };
        if kept[tag] {
            continue;
        }
        let data = match size > 4 {
            true => {
                total += size;
                if total > limit {
                    continue;
                }
                // Past the block, PIL's read fails and its reading of the IFD ends.
                bytes(usize::try_from(uint(&e[8..12])).ok()?, size as usize)?
            }
            false => &e[8..8 + size as usize],
        };
        if data.is_empty() {
            continue;
        }
        kept[tag] = true;
        if tag == 0x0112 {
            return Some(orientation_value(kind, data, &uint));
        }
    }
    None
}

/// The orientation an entry's first value gives (see the module's doc), or `None`: PIL's tag
/// table gives the orientation one value, so it keeps the first of several (with a warning).
fn orientation_value(kind: u16, data: &[u8], uint: &dyn Fn(&[u8]) -> u64) -> Option<u8> {
    let first = &data[..unit_bytes(kind)? as usize];
    let signed = |b: &[u8]| -> i64 {
        let bits = 8 * b.len() as u32;
        ((uint(b) << (64 - bits)) as i64) >> (64 - bits)
    };
    let whole = |v: f64| (v.fract() == 0.0).then_some(v as i64);
    let value = match kind {
        3 | 4 | 13 | 16 => i64::try_from(uint(first)).ok(),
        6 | 8 | 9 => Some(signed(first)),
        5 => {
            let (n, d) = (uint(&first[..4]), uint(&first[4..]));
            (d != 0 && n % d == 0).then(|| (n / d) as i64)
        }
        10 => {
            let (n, d) = (signed(&first[..4]), signed(&first[4..]));
            (d != 0 && n % d == 0).then(|| n / d)
        }
        11 => whole(f64::from(f32::from_bits(uint(first) as u32))),
        12 => whole(f64::from_bits(uint(first))),
        // BYTE (PIL keeps bytes), ASCII, UNDEFINED.
        _ => None,
    };
    value
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| (1..=8).contains(v))
}

/// The digit PIL's fallback reads from an XMP packet: the first `tiff:Orientation` followed by
/// `="` or `>` and an ASCII digit (its regular expression `tiff:Orientation(="|>)([0-9])`). Only
/// 2..=8 turn the picture.
fn xmp_orientation(xmp: &[u8]) -> Option<u8> {
    const TAG: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(i) = xmp[from..].windows(TAG.len()).position(|w| w == TAG) {
        let rest = &xmp[from + i + TAG.len()..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] => Some(*d),
            _ => None,
        };
        if let Some(d) = digit.filter(u8::is_ascii_digit) {
            return Some(d - b'0');
        }
        from += i + 1;
    }
    None
}

/// What PIL reads of a picture's metadata for the orientation: its EXIF block and its XMP packet.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Metadata {
    /// The EXIF block as PIL holds it ([`png_meta`], [`jpeg_meta`]).
    pub exif: Option<Vec<u8>>,
    /// The XMP packet ([`png_meta`], [`jpeg_meta`]).
    pub xmp: Option<Vec<u8>>,
}

impl Metadata {
    /// The orientation PIL finds: the EXIF block's entry, else, where it has none, the XMP
    /// packet's digit.
    pub(crate) fn orientation(&self) -> Option<u8> {
        match self.exif.as_deref().and_then(orientation_entry) {
            Some(entry) => entry,
            None => self.xmp.as_deref().and_then(xmp_orientation),
        }
    }
}

/// A JPEG's metadata from its walk over `bytes`: the EXIF block is the first EXIF segment with the
/// later ones' data appended (PIL's), the XMP packet the last XMP segment's.
pub(crate) fn jpeg_meta(bytes: &[u8], walk: &crate::jpeg_walk::JpegWalk) -> Metadata {
    let exif = (!walk.exif.is_empty()).then(|| {
        let mut block = b"Exif\0\0".to_vec();
        for r in &walk.exif {
            block.extend_from_slice(bytes.get(r.clone()).unwrap_or_default());
        }
        block
    });
    let xmp = walk
        .xmp
        .clone()
        .and_then(|r| bytes.get(r))
        .map(<[u8]>::to_vec);
    Metadata { exif, xmp }
}

/// The most text PIL reads from a PNG's text chunks, in all (it refuses the picture past it).
const MAX_TEXT_MEMORY: u64 = 64 << 20;

/// A PNG's metadata: the EXIF block is the last `eXIf` chunk's data or `tEXt` chunk named
/// `exif`'s text; the XMP packet the last `XML:com.adobe.xmp` text chunk (`tEXt`, `zTXt`, or an
/// `iTXt` whose texts are UTF-8), else, where that is empty or none, the last such `iTXt` whatever
/// its text. The chunks PIL reads: all before `IEND`, a later one replacing an earlier one
/// (`exif_transpose` loads the picture first, which reads the chunks after the pixel data too; in
/// an animated PNG, up to the second frame's `fcTL`). An error where the text chunks it inflates
/// or reads hold more than 64 MB (PIL refuses such a picture too).
pub(crate) fn png_meta(png: &[u8]) -> Result<Metadata, String> {
    let mut at = 8usize;
    let mut meta = Metadata::default();
    let (mut text, mut itxt) = (None, None);
    let (mut animated, mut pixels, mut memory) = (false, false, 0u64);
    let mut count = |v: &Option<Vec<u8>>| {
        memory += v.as_ref().map_or(0, |v| v.len() as u64);
        match memory > MAX_TEXT_MEMORY {
            true => Err(format!(
                "its text chunks hold more than {} MB (PIL refuses it too)",
                MAX_TEXT_MEMORY >> 20
            )),
            false => Ok(()),
        }
    };
    while let Some(len) = png
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .and_then(|b| usize::try_from(u32::from_be_bytes(b)).ok())
    {
        let Some(data) = (at + 8)
            .checked_add(len)
            .and_then(|end| png.get(at + 8..end))
        else {
            break;
        };
        match png.get(at + 4..at + 8) {
            Some(b"eXIf") => meta.exif = Some([&b"Exif\0\0"[..], data].concat()),
            Some(b"IEND") | None => break,
            Some(b"acTL") => animated = data.get(0..4).is_some_and(|n| n > &[0, 0, 0, 1][..]),
            Some(b"IDAT") => pixels = true,
            Some(b"fcTL") if animated && pixels => break,
            Some(b"tEXt") => {
                if let Some(v) = data.strip_prefix(b"exif\0") {
                    meta.exif = Some(v.to_vec());
                } else if let Some(v) = data.strip_prefix(XMP_KEY) {
                    text = Some(v.to_vec());
                    count(&text)?;
                }
            }
            Some(b"zTXt") => {
                // Compression method 0 (zlib); PIL refuses the picture on any other.
                if let Some([0, z @ ..]) = data.strip_prefix(XMP_KEY) {
                    text = inflate(z);
                    count(&text)?;
                }
            }
            Some(b"iTXt") => {
                if let Some((v, utf8)) = data.strip_prefix(XMP_KEY).and_then(itxt_text) {
                    if utf8 {
                        text = Some(v.clone());
                    }
                    itxt = Some(v);
                    count(&itxt)?;
                }
            }
            _ => {}
        }
        at = at + 12 + len;
    }
    meta.xmp = text.filter(|t| !t.is_empty()).or(itxt);
    Ok(meta)
}

/// A text chunk's keyword for the XMP packet, with the NUL that ends it.
const XMP_KEY: &[u8] = b"XML:com.adobe.xmp\0";

/// An `iTXt` chunk's text after its keyword (`flag, method, language\0, translated\0, text`),
/// inflated where compressed, and whether PIL keeps it as text too (language, translated keyword
/// and text UTF-8). `None` where PIL drops it: too short, an unknown compression, bad data.
fn itxt_text(r: &[u8]) -> Option<(Vec<u8>, bool)> {
    let [flag, method, r @ ..] = r else {
        return None;
    };
    let mut parts = r.splitn(3, |&b| b == 0);
    let (lang, tk, v) = (parts.next()?, parts.next()?, parts.next()?);
    let v = match (flag, method) {
        (0, _) => v.to_vec(),
        (_, 0) => inflate(v)?,
        _ => return None,
    };
    let utf8 = [lang, tk, &v[..]]
        .iter()
        .all(|b| std::str::from_utf8(b).is_ok());
    Some((v, utf8))
}

/// A zlib stream's data, at most 1 MB of it (PIL's limit on a text chunk, beyond which it refuses
/// the picture): `None` where it is broken or larger. A stream cut short gives what it holds, as
/// Python's `decompressobj` does.
fn inflate(z: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    const MAX_TEXT: u64 = 1 << 20;
    let mut out = Vec::new();
    let read = flate2::read::ZlibDecoder::new(z)
        .take(MAX_TEXT + 1)
        .read_to_end(&mut out);
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(_) => return None,
    }
    (out.len() as u64 <= MAX_TEXT).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG's `eXIf` data as PIL holds it.
    fn exif_of(t: &[u8]) -> Vec<u8> {
        [&b"Exif\0\0"[..], t].concat()
    }

    /// The orientation (1..=8) in a TIFF-structured EXIF block, if any.
    fn orientation(tiff: &[u8]) -> Option<u8> {
        orientation_entry(tiff).flatten()
    }

    /// A little- or big-endian TIFF block with one IFD entry for tag 0x0112.
    fn tiff(big: bool, kind: u16, value: u32) -> Vec<u8> {
        let mut v: Vec<u8> = if big {
            vec![0x4d, 0x4d, 0, 42, 0, 0, 0, 8]
        } else {
            vec![0x49, 0x49, 42, 0, 8, 0, 0, 0]
        };
        let w16 = |v: &mut Vec<u8>, x: u16| {
            v.extend(if big {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            })
        };
        let w32 = |v: &mut Vec<u8>, x: u32| {
            v.extend(if big {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            })
        };
        w16(&mut v, 1);
        w16(&mut v, 0x0112);
        w16(&mut v, kind);
        w32(&mut v, 1);
        match kind {
            3 => {
                w16(&mut v, value as u16);
                w16(&mut v, 0);
            }
            1 => v.extend([value as u8, 0, 0, 0]),
            _ => w32(&mut v, value),
        }
        w32(&mut v, 0);
        v
    }

    #[test]
    fn orientation_of_any_integer_type_and_either_order() {
        for big in [false, true] {
            assert_eq!(orientation(&tiff(big, 3, 6)), Some(6));
            assert_eq!(orientation(&tiff(big, 4, 6)), Some(6));
            // BYTE: PIL keeps bytes, which turn nothing.
            assert_eq!(orientation(&tiff(big, 1, 8)), None);
            assert_eq!(orientation(&tiff(big, 4, 9)), None);
            assert_eq!(orientation(&tiff(big, 2, 6)), None);
        }
        assert_eq!(orientation(b"II*\0"), None);
        assert_eq!(orientation(&[]), None);
        // A truncated block.
        let t = tiff(false, 3, 6);
        assert_eq!(orientation(&t[..t.len() - 10]), None);
    }

    #[test]
    fn the_exif_chunk_is_found_after_the_pixel_data() {
        let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend(kind);
            c.extend(data);
            c.extend([0; 4]);
            c
        };
        let t = tiff(false, 3, 6);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"IDAT", &[1, 2, 3]));
        png.extend(chunk(b"eXIf", &t));
        png.extend(chunk(b"IEND", &[]));
        assert_eq!(png_meta(&png).unwrap().exif, Some(exif_of(&t)));
        let cut = &png[..png.len() - 20];
        assert_eq!(png_meta(cut).unwrap().exif, None);
        // A later chunk replaces an earlier one, as in PIL.
        let t3 = tiff(false, 3, 3);
        let mut two = png[..png.len() - 12].to_vec();
        two.extend(chunk(b"eXIf", &t3));
        two.extend(chunk(b"IEND", &[]));
        assert_eq!(png_meta(&two).unwrap().exif, Some(exif_of(&t3)));
    }

    #[test]
    fn sbyte_values_are_read() {
        assert_eq!(orientation(&tiff(false, 6, 6)), Some(6));
    }

    /// An entry PIL keeps hides the XMP packet even where it is no orientation; one PIL skips
    /// does not.
    #[test]
    fn an_orientation_entry_is_there_or_not_as_pil_keeps_it() {
        assert_eq!(orientation_entry(&tiff(false, 3, 6)), Some(Some(6)));
        assert_eq!(orientation_entry(&tiff(false, 2, 6)), Some(None));
        assert_eq!(orientation_entry(&tiff(true, 4, 9)), Some(None));
        assert_eq!(orientation_entry(&tiff(false, 99, 6)), None);
        assert_eq!(orientation_entry(&tiff(false, 0, 6)), None);
        // Two LONGs (8 bytes): at offset 400, past the block (the reading ends); at 4, inside:
        // the first (the IFD's offset, 8) is the orientation.
        let mut t = tiff(false, 4, 6);
        t[14..18].copy_from_slice(&2u32.to_le_bytes());
        t[18..22].copy_from_slice(&400u32.to_le_bytes());
        assert_eq!(orientation_entry(&t), None);
        t[18..22].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(orientation_entry(&t), Some(Some(8)));
        // No values at all.
        let mut t = tiff(false, 3, 6);
        t[14..18].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(orientation_entry(&t), None);
    }

    #[test]
    fn the_xmp_orientation_is_the_first_attribute_or_element_with_a_digit() {
        let x = |s: &str| xmp_orientation(s.as_bytes());
        assert_eq!(x(r#"<rdf:Description tiff:Orientation="6"/>"#), Some(6));
        assert_eq!(x("<tiff:Orientation>8</tiff:Orientation>"), Some(8));
        assert_eq!(x(r#"tiff:Orientation='6' tiff:Orientation="3""#), Some(3));
        assert_eq!(x(r#"tiff:Orientation = "6""#), None);
        assert_eq!(x(r#"tiff:Orientation="x" tiff:Orientation>9"#), Some(9));
        assert_eq!(x("tiff:Orientation>"), None);
        assert_eq!(x(""), None);
    }

    /// A PNG chunk (its CRC left zero: not checked here).
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend(kind);
        c.extend(data);
        c.extend([0; 4]);
        c
    }

    fn png(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
        p.extend(chunk(b"IHDR", &[0; 13]));
        for c in parts {
            p.extend(c);
        }
        p.extend(chunk(b"IEND", &[]));
        p
    }

    fn deflate(b: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_xmp_packet_of_a_png_is_read_as_pil_reads_it() {
        let key = XMP_KEY;
        let idat = chunk(b"IDAT", &[1, 2, 3]);
        let text = |v: &[u8]| chunk(b"tEXt", &[key, v].concat());
        let ztxt = |v: &[u8]| chunk(b"zTXt", &[key, &[0], &deflate(v)].concat());
        let itxt = |flag: u8, v: &[u8]| {
            let v = if flag == 1 { deflate(v) } else { v.to_vec() };
            chunk(b"iTXt", &[key, &[flag, 0], b"\0\0", &v].concat())
        };
        let xmp = |p: &[Vec<u8>]| png_meta(&png(p)).unwrap().xmp;
        assert_eq!(xmp(&[text(b"a"), idat.clone()]), Some(b"a".to_vec()));
        assert_eq!(xmp(&[ztxt(b"z"), idat.clone()]), Some(b"z".to_vec()));
        assert_eq!(xmp(&[itxt(1, b"i"), idat.clone()]), Some(b"i".to_vec()));
        // The last one, after the pixel data too.
        assert_eq!(
            xmp(&[itxt(0, b"i"), idat.clone(), text(b"late")]),
            Some(b"late".to_vec())
        );
        // An iTXt whose text is not UTF-8 counts only where no text is there.
        assert_eq!(xmp(&[text(b"t"), itxt(0, b"\xff")]), Some(b"t".to_vec()));
        assert_eq!(xmp(&[itxt(0, b"\xff")]), Some(b"\xff".to_vec()));
        // An empty text gives way to the iTXt's.
        assert_eq!(xmp(&[itxt(0, b"i"), text(b"")]), Some(b"i".to_vec()));
        // Other keys, a broken stream, an unknown compression: none.
        assert_eq!(
            xmp(&[chunk(b"tEXt", b"Comment\0tiff:Orientation=\"6\"")]),
            None
        );
        assert_eq!(
            xmp(&[chunk(b"zTXt", &[key, &[0], b"not zlib"].concat())]),
            None
        );
        assert_eq!(
            xmp(&[chunk(b"iTXt", &[key, &[1, 1], b"\0\0x"].concat())]),
            None
        );
        // A zlib stream cut before its checksum gives its text, as Python's `decompressobj` does.
        let z = deflate(b"cut");
        let cut = chunk(b"zTXt", &[key, &[0], &z[..z.len() - 4]].concat());
        assert_eq!(xmp(&[cut]), Some(b"cut".to_vec()));
        // A `tEXt` chunk named `exif` is the EXIF block too.
        let named = png(&[chunk(b"tEXt", &[&b"exif\0"[..], b"II*\0named"].concat())]);
        assert_eq!(png_meta(&named).unwrap().exif, Some(b"II*\0named".to_vec()));
        // An animated PNG: nothing after the second frame's control chunk.
        let actl = chunk(b"acTL", &[0, 0, 0, 2, 0, 0, 0, 0]);
        let fctl = chunk(b"fcTL", &[0; 26]);
        let frames = [
            actl,
            fctl.clone(),
            idat.clone(),
            text(b"a"),
            fctl,
            text(b"b"),
        ];
        assert_eq!(xmp(&frames), Some(b"a".to_vec()));
        // More text than PIL reads: refused.
        let big = vec![b' '; 33 << 20];
        let e = png_meta(&png(&[text(&big), text(&big)])).unwrap_err();
        assert!(e.contains("64 MB"), "{e}");
        // An eXIf chunk before the pixel data: the chunks after it are read all the same.
        let exif = chunk(b"eXIf", &tiff(false, 3, 1));
        let late = png(&[exif.clone(), idat.clone(), text(b"late")]);
        let meta = png_meta(&late).unwrap();
        let want = (Some(exif_of(&tiff(false, 3, 1))), Some(b"late".to_vec()));
        assert_eq!((meta.exif, meta.xmp), want);
        let two = png(&[exif, idat, chunk(b"eXIf", b"II*\0second")]);
        assert_eq!(png_meta(&two).unwrap().exif, Some(exif_of(b"II*\0second")));
    }

    /// 600 random EXIF blocks (`tests/fixtures/picture/exif_entries.json`, from
    /// `make_picture_fixtures.py`) with what Pillow 13's `Exif` holds for the orientation: absent,
    /// the orientation its lookup finds, or 0 where the entry is there and turns nothing.
    #[test]
    fn random_exif_blocks_give_pils_orientation_entries() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/picture/exif_entries.json"
        );
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(cases.len(), 600);
        let mut turned = 0;
        for (i, c) in cases.iter().enumerate() {
            let hex = c["block"].as_str().unwrap();
            let block: Vec<u8> = (0..hex.len() / 2)
                .map(|k| u8::from_str_radix(&hex[2 * k..2 * k + 2], 16).unwrap())
                .collect();
            let want = c["orientation"]
                .as_u64()
                .map(|v| (v > 0).then_some(v as u8));
            assert_eq!(orientation_entry(&block), want, "case {i}: {hex}");
            turned += usize::from(matches!(want, Some(Some(2..=8))));
        }
        assert!(turned >= 15, "{turned}");
    }
}
