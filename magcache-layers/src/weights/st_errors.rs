//! A safetensors reader's errors in words, for every reader of safetensors files.

/// `FILE: (header): not a readable safetensors file: ...` for the reader's error `e` on the file's
/// bytes `bytes` (its header at least); a tensor whose bytes do not match its shape and type is
/// named (the reader's error does not name it).
pub fn safetensors_error(
    file: &str,
    bytes: &[u8],
    e: &safetensors::SafeTensorError,
) -> magcache_core::Error {
    use safetensors::SafeTensorError as E;
    if let (E::TensorInvalidInfo | E::MisalignedSlice, Some((name, why))) = (e, mismatched(bytes)) {
        return magcache_core::Error::weights(file, &name, why);
    }
    magcache_core::Error::weights(
        file,
        "(header)",
        format!("not a readable safetensors file: {}", safetensors_text(e)),
    )
}

/// The first tensor of a safetensors header (in the order of its data) whose byte range does not
/// hold its shape of its type, and why.
fn mismatched(bytes: &[u8]) -> Option<(String, String)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut tensors: Vec<(u64, u64, &String, &serde_json::Value)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| {
            let o = v.get("data_offsets")?.as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, k, v))
        })
        .collect();
    tensors.sort_by_key(|t| (t.0, t.1));
    tensors.into_iter().find_map(|(s, e, name, v)| {
        let bits: u128 = match v.get("dtype")?.as_str()? {
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 8,
            "I16" | "U16" | "F16" | "BF16" => 16,
            "I32" | "U32" | "F32" => 32,
            "I64" | "U64" | "F64" => 64,
            _ => return None,
        };
        let shape: Vec<u128> = v
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .collect::<Option<_>>()?;
        let values = shape.iter().try_fold(1u128, |a, d| a.checked_mul(*d))?;
        let need = values.checked_mul(bits)? / 8;
        let held = u128::from(e.saturating_sub(s));
        (need != held).then(|| {
            (
                name.clone(),
                format!("its shape {shape:?} of {} needs {need} bytes; its data_offsets [{s}, {e}] hold {held}", v["dtype"].as_str().unwrap_or("?")),
            )
        })
    })
}

/// A safetensors reader's error in words: a short or cut file says so (the reader's own names,
/// `InvalidHeaderLength` and `MetadataIncompleteBuffer`, say it to no one).
fn safetensors_text(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "too short for a safetensors header (8 bytes of length, then JSON): truncated, or not a safetensors file".into(),
        E::InvalidHeaderLength => "its header's length runs past the end of the file: truncated, or not a safetensors file".into(),
        E::MetadataIncompleteBuffer => "the tensors its header lists do not end where the file does: truncated, or extra bytes after the last tensor".into(),
        E::HeaderTooLarge => "claims a header over 100 MB: not a safetensors file".into(),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            format!("its header is not valid JSON ({e}): not a safetensors file, or damaged")
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    /// A safetensors file of the F32 tensors `(name, shape, data_offsets)` with `data` bytes.
    fn file(tensors: &[(&str, &str, &str)], data: usize) -> Vec<u8> {
        let entries: Vec<String> = tensors
            .iter()
            .map(|(n, shape, offsets)| {
                format!(
                    "\"{n}\":{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":{offsets}}}"
                )
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    fn error(bytes: &[u8]) -> String {
        match safetensors::SafeTensors::read_metadata(bytes) {
            Ok(_) => "read".into(),
            Err(e) => super::safetensors_error("w.safetensors", bytes, &e).to_string(),
        }
    }

    #[test]
    fn a_tensor_whose_bytes_do_not_hold_its_shape_is_named() {
        let fine = [("a", "[2,2]", "[0,16]"), ("b", "[4,8]", "[16,144]")];
        assert_eq!(error(&file(&fine, 144)), "read");
        // The second tensor's shape claims 124 values in 128 bytes.
        let wrong = [("a", "[2,2]", "[0,16]"), ("b", "[4,31]", "[16,144]")];
        let e = error(&file(&wrong, 144));
        assert_eq!(
            e,
            "w.safetensors: tensor `b`: its shape [4, 31] of F32 needs 496 bytes; its data_offsets [16, 144] hold 128"
        );
    }
}
