//! Cancelling a generation outside the denoising loop: a server's job sets a flag
//! ([`Scope::enter`] on the thread that runs the job), and the long stages that have no
//! [[`crate::denoise::Observer`]] (the text encoders' layers, the VAE's blocks, tiles and frames)
//! call [`check`] between their parts, so a cancelled job stops within one part instead of
//! finishing its decode. Without a scope [`check`] never fails.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

thread_local! {
    static FLAG: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// While alive, [`check`] on this thread fails once `flag` is set.
pub struct Scope {
    before: Option<Arc<AtomicBool>>,
}

impl Scope {
    /// Watches `flag` on this thread until the scope is dropped (scopes nest).
    pub fn enter(flag: Arc<AtomicBool>) -> Scope {
        let before = FLAG.with(|f| f.borrow_mut().replace(flag));
        Scope { before }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let before = self.before.take();
        FLAG.with(|f| *f.borrow_mut() = before);
    }
}

/// Whether this thread's job has been cancelled.
pub fn cancelled() -> bool {
    FLAG.with(|f| {
        f.borrow()
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    })
}

/// [`crate::Error::Cancelled`] once this thread's job has been cancelled.
pub fn check() -> crate::Result<()> {
    if cancelled() {
        Err(crate::Error::Cancelled)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fails_only_inside_a_cancelled_scope_of_this_thread() {
        assert!(check().is_ok());
        let flag = Arc::new(AtomicBool::new(false));
        {
            let _s = Scope::enter(flag.clone());
            assert!(check().is_ok());
            flag.store(true, Ordering::SeqCst);
            assert!(matches!(check(), Err(crate::Error::Cancelled)));
            // Another thread does not see this thread's job.
            assert!(std::thread::spawn(|| check().is_ok())
                .join()
                .unwrap_or(false));
            {
                let _inner = Scope::enter(Arc::new(AtomicBool::new(false)));
                assert!(check().is_ok());
            }
            assert!(check().is_err());
        }
        assert!(check().is_ok());
    }
}
