//! The orientation of a picture, as PIL's `ImageOps.exif_transpose` (which diffusers' `load_image`
//! applies) finds it: tag 0x0112 of the EXIF block's first IFD, stored as any one-value integer
//! type (the `image` crate reads only SHORT, a PNG's `eXIf` chunk only before the pixel data, and a
//! JPEG's last EXIF segment; PIL reads LONG too, a PNG's chunks after the pixel data where none came
//! before it, and a JPEG's first segment, which [`crate::jpeg_walk`] finds). Where the EXIF block
//! has no such tag (or there is none), PIL falls back on the XMP packet's `tiff:Orientation`: the
//! first `tiff:Orientation="D` or `tiff:Orientation>D` in it (a JPEG's last XMP `APP1` segment, a
//! PNG's last `XML:com.adobe.xmp` text chunk). Not read: EXIF carried in ImageMagick's
//! `Raw profile type exif` text chunks.

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

/// Tag 0x0112 as PIL's EXIF reader keeps it: `None` where the first IFD has no entry PIL keeps for
/// it (none, or only ones of a type it does not read or whose data lies outside the block: then
/// PIL looks at the XMP packet), else `Some` of its orientation where it is one integer in 1..=8.
pub(crate) fn orientation_entry(tiff: &[u8]) -> Option<Option<u8>> {
    let big = match tiff.get(0..4)? {
        [0x49, 0x49, 42, 0] => false,
        [0x4d, 0x4d, 0, 42] => true,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(o..o.checked_add(2)?)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(o..o.checked_add(4)?)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = usize::try_from(u32_at(4)?).ok()?;
    let entries = usize::from(u16_at(ifd)?);
    for k in 0..entries {
        let e = ifd + 2 + 12 * k;
        if u16_at(e)? != 0x0112 {
            continue;
        }
        let (kind, count) = (u16_at(e + 2)?, u32_at(e + 4)?);
        // An entry PIL skips: a type it does not read, no data, or data outside the block.
        let Some(size) = unit_bytes(kind).map(|u| u * u64::from(count)) else {
            continue;
        };
        let outside = size > 4 && {
            let at = u64::from(u32_at(e + 8)?);
            at + size > tiff.len() as u64
        };
        if size == 0 || outside {
            continue;
        }
        let value = match (kind, count) {
            // BYTE, SBYTE, SHORT, LONG, SSHORT, SLONG: one value in the entry's value field.
            (1 | 6, 1) => u32::from(*tiff.get(e + 8)?),
            (3 | 8, 1) => u32::from(u16_at(e + 8)?),
            (4 | 9, 1) => u32_at(e + 8)?,
            _ => return Some(None),
        };
        return Some(u8::try_from(value).ok().filter(|v| (1..=8).contains(v)));
    }
    None
}

/// The digit PIL's fallback reads from an XMP packet: the first `tiff:Orientation` followed by
/// `="` or `>` and an ASCII digit (its regular expression `tiff:Orientation(="|>)([0-9])`). Only
/// 2..=8 turn the picture.
pub(crate) fn xmp_orientation(xmp: &[u8]) -> Option<u8> {
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

/// What PIL reads of a PNG's metadata for the orientation: its EXIF block and its XMP packet.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PngMeta<'a> {
    /// The data of the last `eXIf` chunk PIL reads.
    pub exif: Option<&'a [u8]>,
    /// The XMP packet: the last `XML:com.adobe.xmp` text chunk (`tEXt`, `zTXt`, or an `iTXt` whose
    /// texts are UTF-8), else, where that is empty or none, the last such `iTXt` whatever its text.
    pub xmp: Option<Vec<u8>>,
}

/// The chunks PIL reads for [`PngMeta`]: all before `IEND`, a later one replacing an earlier one
/// (`exif_transpose` loads the picture first, which reads the chunks after the pixel data too).
pub(crate) fn png_meta(png: &[u8]) -> PngMeta<'_> {
    let mut at = 8usize;
    let mut meta = PngMeta::default();
    let (mut text, mut itxt) = (None, None);
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
            Some(b"eXIf") => meta.exif = Some(data),
            Some(b"IEND") | None => break,
            Some(b"tEXt") => {
                if let Some(v) = data.strip_prefix(XMP_KEY) {
                    text = Some(v.to_vec());
                }
            }
            Some(b"zTXt") => {
                // Compression method 0 (zlib); PIL refuses the picture on any other.
                if let Some([0, z @ ..]) = data.strip_prefix(XMP_KEY) {
                    text = inflate(z);
                }
            }
            Some(b"iTXt") => {
                if let Some((v, utf8)) = data.strip_prefix(XMP_KEY).and_then(itxt_text) {
                    if utf8 {
                        text = Some(v.clone());
                    }
                    itxt = Some(v);
                }
            }
            _ => {}
        }
        at = at + 12 + len;
    }
    meta.xmp = text.filter(|t| !t.is_empty()).or(itxt);
    meta
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

/// A zlib stream's data, at most 1 MB of it (PIL's limit on a text chunk, beyond which it drops
/// or refuses it): `None` where it is broken or larger.
fn inflate(z: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    const MAX_TEXT: u64 = 1 << 20;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(z)
        .take(MAX_TEXT + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() as u64 <= MAX_TEXT).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(orientation(&tiff(big, 1, 8)), Some(8));
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
        assert_eq!(png_meta(&png).exif, Some(&t[..]));
        let cut = &png[..png.len() - 20];
        assert_eq!(png_meta(cut).exif, None);
        // A later chunk replaces an earlier one, as in PIL.
        let t3 = tiff(false, 3, 3);
        let mut two = png[..png.len() - 12].to_vec();
        two.extend(chunk(b"eXIf", &t3));
        two.extend(chunk(b"IEND", &[]));
        assert_eq!(png_meta(&two).exif, Some(&t3[..]));
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
        // Two LONGs (8 bytes): at offset 400, outside the block; at 4, inside.
        let mut t = tiff(false, 4, 6);
        t[14..18].copy_from_slice(&2u32.to_le_bytes());
        t[18..22].copy_from_slice(&400u32.to_le_bytes());
        assert_eq!(orientation_entry(&t), None);
        t[18..22].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(orientation_entry(&t), Some(None));
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
        let xmp = |p: &[Vec<u8>]| png_meta(&png(p)).xmp;
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
        // An eXIf chunk before the pixel data: the chunks after it are read all the same.
        let exif = chunk(b"eXIf", &tiff(false, 3, 1));
        let late = png(&[exif.clone(), idat.clone(), text(b"late")]);
        let meta = png_meta(&late);
        let want = (Some(&tiff(false, 3, 1)[..]), Some(b"late".to_vec()));
        assert_eq!((meta.exif, meta.xmp), want);
        let two = png(&[exif, idat, chunk(b"eXIf", b"II*\0second")]);
        assert_eq!(png_meta(&two).exif, Some(&b"II*\0second"[..]));
    }
}
