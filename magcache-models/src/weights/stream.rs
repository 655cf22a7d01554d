//! Streamed blocks (`model.offload = "stream"`): each read from the checkpoint when it runs, the
//! next one read ahead on a second thread.

use magcache_core::{Error, Result};

/// Runs the streamed blocks `blocks` in order (`model.offload = "stream"`): `load(i)` reads block
/// `i` from the checkpoint, `run(i, block)` computes it. Block `i + 1` is read on a second thread
/// while block `i` runs, so two blocks are resident. On a failure the pending read is joined before
/// returning, so a panic in it is an error, never an abort. `family` names the model in errors.
pub fn run_streamed<B: Send>(
    family: &str,
    blocks: std::ops::Range<usize>,
    load: impl Fn(usize) -> Result<B> + Sync,
    mut run: impl FnMut(usize, &B) -> Result<()>,
) -> Result<()> {
    let join = |h: std::thread::ScopedJoinHandle<'_, Result<B>>| -> Result<B> {
        h.join().map_err(|_| {
            Error::msg(format!(
                "{family}: the thread reading a streamed block panicked"
            ))
        })?
    };
    std::thread::scope(|s| {
        let load = &load;
        let mut next = None;
        let mut go = || -> Result<()> {
            for i in blocks.clone() {
                let blk = match next.take() {
                    Some(h) => join(h)?,
                    None => load(i)?,
                };
                if i + 1 < blocks.end {
                    next = Some(s.spawn(move || load(i + 1)));
                }
                run(i, &blk)?;
            }
            Ok(())
        };
        let r = go();
        if let Some(h) = next.take() {
            let _ = h.join();
        }
        r
    })
}
