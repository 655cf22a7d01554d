//! The EXIF orientation of a picture, as PIL's `ImageOps.exif_transpose` (which diffusers'
//! `load_image` applies) finds it: tag 0x0112 of the first IFD, stored as any one-value integer type
//! (the `image` crate reads only SHORT, a PNG's `eXIf` chunk only before the pixel data, and a
//! JPEG's last EXIF segment; PIL reads LONG too, a PNG's last chunk anywhere in the file, and a
//! JPEG's first segment, which [`crate::jpeg_walk`] finds). Not read: XMP's `tiff:Orientation`,
//! which PIL falls back on where EXIF has none.

/// The orientation (1..=8) in a TIFF-structured EXIF block (`II*\0` or `MM\0*`), if any.
pub(crate) fn orientation(tiff: &[u8]) -> Option<u8> {
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
        let value = match (u16_at(e + 2)?, u32_at(e + 4)?) {
            // BYTE, SBYTE, SHORT, LONG, SSHORT, SLONG: one value in the entry's value field.
            (1 | 6, 1) => u32::from(*tiff.get(e + 8)?),
            (3 | 8, 1) => u32::from(u16_at(e + 8)?),
            (4 | 9, 1) => u32_at(e + 8)?,
            _ => return None,
        };
        return u8::try_from(value).ok().filter(|v| (1..=8).contains(v));
    }
    None
}

/// The data of a PNG's last `eXIf` chunk before `IEND`, wherever it lies (PIL reads the chunks after
/// the pixel data too, a later one replacing an earlier one).
pub(crate) fn png_exif(png: &[u8]) -> Option<&[u8]> {
    let mut at = 8usize;
    let mut found = None;
    loop {
        let Some(len) = png
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .and_then(|b| usize::try_from(u32::from_be_bytes(b)).ok())
        else {
            return found;
        };
        let Some(data) = (at + 8)
            .checked_add(len)
            .and_then(|end| png.get(at + 8..end))
        else {
            return found;
        };
        match png.get(at + 4..at + 8) {
            Some(b"eXIf") => found = Some(data),
            Some(b"IEND") | None => return found,
            _ => {}
        }
        at = at + 12 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(png_exif(&png), Some(&t[..]));
        let cut = &png[..png.len() - 20];
        assert_eq!(png_exif(cut), None);
        // A later chunk replaces an earlier one, as in PIL.
        let t3 = tiff(false, 3, 3);
        let mut two = png[..png.len() - 12].to_vec();
        two.extend(chunk(b"eXIf", &t3));
        two.extend(chunk(b"IEND", &[]));
        assert_eq!(png_exif(&two), Some(&t3[..]));
    }

    #[test]
    fn sbyte_values_are_read() {
        assert_eq!(orientation(&tiff(false, 6, 6)), Some(6));
    }
}
