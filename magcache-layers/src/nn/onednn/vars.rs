//! The `MAGCACHE_ONEDNN_*` variables' values, read once when the library opens: each one bad
//! value is an error naming it.

/// An `on`/`off` variable read at open: `Some(on)` where set, `None` unset; another value is an
/// error naming it (`default` says what unset means).
pub(super) fn switch(var: &str, default: &str) -> std::result::Result<Option<bool>, String> {
    match std::env::var(var).as_deref() {
        Ok("on") => Ok(Some(true)),
        Ok("off") => Ok(Some(false)),
        Ok(other) => Err(format!(
            "{var}={other:?}: expected on or off (unset: {default})"
        )),
        Err(_) => Ok(None),
    }
}

/// A block size read at open from `var`: a multiple of `step` from `step` to `most`, `all` where
/// `all` is allowed (`usize::MAX`: no blocks), or unset.
pub(super) fn rows_var(
    var: &str,
    (step, most): (usize, usize),
    all: bool,
) -> std::result::Result<Option<usize>, String> {
    let Ok(v) = std::env::var(var) else {
        return Ok(None);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (step..=most).contains(&n) && n % step == 0 => Ok(Some(n)),
        _ if all && v.trim() == "all" => Ok(Some(usize::MAX)),
        _ => Err(format!(
            "{var}={v:?}: expected a multiple of {step} from {step} to {most}{} (unset: {})",
            if all { ", or all" } else { "" },
            if all {
                "the built-in block"
            } else {
                "sized by the keys"
            },
        )),
    }
}
