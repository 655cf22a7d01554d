//! A safetensors reader's errors in words, for every reader of safetensors files.

/// `FILE: (header): not a readable safetensors file: ...` for the reader's error `e`.
pub fn safetensors_error(file: &str, e: &safetensors::SafeTensorError) -> magcache_core::Error {
    magcache_core::Error::weights(
        file,
        "(header)",
        format!("not a readable safetensors file: {}", safetensors_text(e)),
    )
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
