//! Keeping models warm in a long-lived process (`magcache serve`): once turned on, every tensor a
//! [`super::WeightStore`] reads from a checkpoint file is kept (as read, on the CPU), so building
//! the same run again reads nothing from disk; and prompt embeddings are kept per encoder and
//! prompt (the last [`PROMPTS`]), so a repeated prompt does not run the text encoder at all.
//!
//! Off (the default, every other command) both are pass-throughs: a run reads its weights once
//! and holds only what its model holds.

use candle_core::Tensor;
use magcache_core::Result;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

/// Prompt embeddings kept per process.
pub const PROMPTS: usize = 64;

#[derive(Default)]
struct Warm {
    on: bool,
    /// Checkpoint tensors by (file, place in the file).
    tensors: HashMap<(String, String), Tensor>,
    /// Prompt embeddings (and a note on how they were made) by key, oldest first.
    prompts: VecDeque<(String, Kept)>,
}

fn warm() -> &'static Mutex<Warm> {
    static W: OnceLock<Mutex<Warm>> = OnceLock::new();
    W.get_or_init(Mutex::default)
}

/// Turns the process's warm caches on (never off again: a server keeps its models).
pub fn keep_warm() {
    if let Ok(mut w) = warm().lock() {
        w.on = true;
    }
}

/// The tensor at `place` of `file`: kept from an earlier read when warm, else `read()` (kept when
/// warm and `keep`: a streamed model's blocks are read for every call and never kept).
pub(super) fn tensor(
    file: &str,
    place: String,
    keep: bool,
    read: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if !keep {
        return read();
    }
    let key = (file.to_string(), place);
    // The lock is never held while reading (a read may build what reads again).
    let kept = match warm().lock() {
        Ok(w) if w.on => Some(w.tensors.get(&key).cloned()),
        _ => None,
    };
    match kept {
        None => return read(),
        Some(Some(t)) => return Ok(t),
        Some(None) => {}
    }
    let t = read()?;
    if let Ok(mut w) = warm().lock() {
        w.tensors.insert(key, t.clone());
    }
    Ok(t)
}

/// Bytes of the tensors kept.
pub fn kept_bytes() -> usize {
    warm()
        .lock()
        .map(|w| {
            w.tensors
                .values()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum()
        })
        .unwrap_or(0)
}

thread_local! {
    static PROMPT_HITS: Cell<usize> = const { Cell::new(0) };
}

/// A prompt's embeddings and a note on how they were made (e.g. the chat template).
pub type Kept = (Vec<Tensor>, String);

/// A prompt's embeddings under `key` (the encoder's folder, dtype, device, the prompt and every
/// setting that changes them): kept from an earlier encoding when warm (counted in
/// [`prompt_hits`]), else `encode()` (kept when warm, the oldest dropped past [`PROMPTS`]).
pub fn prompt(key: String, encode: impl FnOnce() -> Result<Kept>) -> Result<Kept> {
    // The lock is never held while encoding (the encoder's weights come through `tensor`).
    let kept = match warm().lock() {
        Ok(w) if w.on => Some(
            w.prompts
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone()),
        ),
        _ => None,
    };
    match kept {
        None => return encode(),
        Some(Some(v)) => {
            PROMPT_HITS.with(|h| h.set(h.get() + 1));
            return Ok(v);
        }
        Some(None) => {}
    }
    let v = encode()?;
    if let Ok(mut w) = warm().lock() {
        w.prompts.push_back((key, v.clone()));
        while w.prompts.len() > PROMPTS {
            w.prompts.pop_front();
        }
    }
    Ok(v)
}

/// How many prompt encodings this thread took from the cache so far.
pub fn prompt_hits() -> usize {
    PROMPT_HITS.with(|h| h.get())
}

/// [`prompt`] for encoders that give `N` tensors.
pub fn prompt_n<const N: usize>(
    key: String,
    encode: impl FnOnce() -> Result<[Tensor; N]>,
) -> Result<[Tensor; N]> {
    let (v, _) = prompt(key, || Ok((encode()?.to_vec(), String::new())))?;
    let n = v.len();
    <[Tensor; N]>::try_from(v).map_err(|_| {
        magcache_core::Error::msg(format!("internal: {n} kept prompt tensors, expected {N}"))
    })
}

/// [`prompt`] for a prompt's embeddings and, with guidance, the negative prompt's, with a note.
pub fn prompt_pair(
    key: String,
    encode: impl FnOnce() -> Result<((Tensor, Option<Tensor>), String)>,
) -> Result<((Tensor, Option<Tensor>), String)> {
    let (v, note) = prompt(key, || {
        let ((p, n), note) = encode()?;
        Ok((std::iter::once(p).chain(n).collect(), note))
    })?;
    let mut it = v.into_iter();
    let p = it
        .next()
        .ok_or_else(|| magcache_core::Error::msg("internal: no kept prompt embeddings"))?;
    Ok(((p, it.next()), note))
}
