//! Streamed blocks (`model.offload = "stream"`): each read from the checkpoint when it runs, the
//! next one read ahead on a second thread.

use magcache_core::{Error, Result};

/// Runs the streamed blocks `blocks` in order (`model.offload = "stream"`): `load(i)` reads block
/// `i` from the checkpoint, `run(i, block)` computes it. One reader thread reads the blocks in
/// order, each handed over only when the previous one has run, so block `i + 1` is read while block
/// `i` runs and two blocks are resident. One thread for the whole pass, not one per block: glibc
/// gives each new thread's allocations an arena of its own and keeps what is freed there, so a
/// thread per block left up to one freed block in each of several arenas (a streamed FLUX.1-dev
/// call peaked at 2.50 GB instead of 1.87 GB). On a failure the reader is stopped and joined before
/// returning, so a panic in it is an error, never an abort. `family` names the model in errors.
pub fn run_streamed<B: Send>(
    family: &str,
    blocks: std::ops::Range<usize>,
    load: impl Fn(usize) -> Result<B> + Sync,
    mut run: impl FnMut(usize, &B) -> Result<()>,
) -> Result<()> {
    let panicked = || {
        Error::msg(format!(
            "{family}: the thread reading a streamed block panicked"
        ))
    };
    std::thread::scope(|s| {
        let load = &load;
        // A rendezvous channel: the reader holds at most the one block it has read ahead.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<B>>(0);
        let range = blocks.clone();
        let reader = s.spawn(move || {
            for i in range {
                let b = load(i);
                let failed = b.is_err();
                if tx.send(b).is_err() || failed {
                    break;
                }
            }
        });
        let r = (|| -> Result<()> {
            for i in blocks {
                let blk = rx.recv().map_err(|_| panicked())??;
                run(i, &blk)?;
            }
            Ok(())
        })();
        // Unblocks a reader waiting to hand over a block, then waits for it.
        drop(rx);
        let joined = reader.join();
        match (r, joined) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(_)) => Err(panicked()),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// A block that counts the live blocks.
    struct Blk<'a>(&'a AtomicUsize);
    impl Drop for Blk<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }

    #[test]
    fn blocks_run_in_order_with_at_most_two_alive() {
        let (live, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut order = Vec::new();
        run_streamed(
            "test",
            0..6,
            |_| {
                let n = live.fetch_add(1, SeqCst) + 1;
                most.fetch_max(n, SeqCst);
                Ok(Blk(&live))
            },
            |i, _| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                order.push(i);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(order, (0..6).collect::<Vec<_>>());
        assert!(most.load(SeqCst) <= 2, "{} blocks alive", most.load(SeqCst));
        assert_eq!(live.load(SeqCst), 0);
    }

    #[test]
    fn a_failed_or_panicking_read_is_an_error_after_the_blocks_before_it() {
        for panic in [false, true] {
            let mut ran = Vec::new();
            let e = run_streamed(
                "test",
                0..5,
                |i| {
                    if i == 2 {
                        if panic {
                            panic!("read failed");
                        }
                        return Err(Error::msg("block 2: bad tensor"));
                    }
                    Ok(i)
                },
                |i, _| {
                    ran.push(i);
                    Ok(())
                },
            )
            .unwrap_err()
            .to_string();
            assert_eq!(ran, vec![0, 1]);
            let want = if panic { "panicked" } else { "bad tensor" };
            assert!(e.contains(want), "{e}");
        }
        // A failing run stops the reader.
        let e = run_streamed("test", 0..100, Ok, |i, _| {
            if i == 3 {
                return Err(Error::msg("run failed"));
            }
            Ok(())
        });
        assert!(e.unwrap_err().to_string().contains("run failed"));
    }
}
