//! Cancelling a generation outside the denoising loop: a server's job sets a flag
//! ([`Scope::enter`] on the thread that runs the job), and the long stages that have no
//! [`crate::denoise::Observer`] (the text encoders' layers, the VAE's blocks, tiles and frames)
//! call [`check`] between their parts, so a cancelled job stops within one part instead of
//! finishing its decode. Without a scope [`check`] never fails.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The flag a scope watches, and whether a check on it has found it set.
type Watched = (Arc<AtomicBool>, bool);

thread_local! {
    static FLAG: RefCell<Option<Watched>> = const { RefCell::new(None) };
}

/// While alive, [`check`] on this thread fails once `flag` is set. Neither `Send` nor `Sync`: it
/// must be dropped on the thread that entered it (scopes nest, the inner dropped first).
pub struct Scope {
    before: Option<Watched>,
    _thread: PhantomData<*const ()>,
}

impl Scope {
    /// Watches `flag` on this thread until the scope is dropped.
    pub fn enter(flag: Arc<AtomicBool>) -> Scope {
        let before = FLAG.with(|f| f.borrow_mut().replace((flag, false)));
        Scope {
            before,
            _thread: PhantomData,
        }
    }

    /// Whether a check in this scope found the flag set (an error that wraps
    /// [`crate::Error::Cancelled`] is then the cancellation, not a failure of its own).
    pub fn tripped(&self) -> bool {
        FLAG.with(|f| f.borrow().as_ref().is_some_and(|w| w.1))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let before = self.before.take();
        FLAG.with(|f| *f.borrow_mut() = before);
    }
}

/// Whether this thread's job has been cancelled (a `true` is remembered: [`Scope::tripped`]).
pub fn cancelled() -> bool {
    FLAG.with(|f| {
        let mut w = f.borrow_mut();
        match w.as_mut() {
            Some(w) if w.0.load(Ordering::SeqCst) => {
                w.1 = true;
                true
            }
            _ => false,
        }
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
            let s = Scope::enter(flag.clone());
            assert!(check().is_ok());
            flag.store(true, Ordering::SeqCst);
            assert!(!s.tripped());
            assert!(matches!(check(), Err(crate::Error::Cancelled)));
            assert!(s.tripped());
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
