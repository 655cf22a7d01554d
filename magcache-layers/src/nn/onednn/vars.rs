//! The block sizes of the attention on oneDNN (`MAGCACHE_ONEDNN_QUERY_ROWS`, `_KEY_ROWS`), read
//! once when the library opens: a bad value is an error naming it.

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The block sizes a variable takes and refuses (a name of the test's own: no other test
    /// reads it).
    #[test]
    fn rows_take_multiples_of_the_step_and_all_where_allowed() {
        const VAR: &str = "MAGCACHE_TEST_ONEDNN_ROWS_VAR";
        let read = |v: Option<&str>, all| {
            match v {
                Some(v) => std::env::set_var(VAR, v),
                None => std::env::remove_var(VAR),
            }
            rows_var(VAR, (32, 1 << 20), all)
        };
        assert_eq!(read(None, true), Ok(None));
        assert_eq!(read(Some("32"), true), Ok(Some(32)));
        assert_eq!(read(Some(" 1048576 "), true), Ok(Some(1 << 20)));
        assert_eq!(read(Some("all"), true), Ok(Some(usize::MAX)));
        for bad in ["16", "48", "0", "2097152", "many", ""] {
            let e = read(Some(bad), true).unwrap_err();
            assert!(e.contains(VAR) && e.contains("or all"), "{e}");
        }
        let e = read(Some("all"), false).unwrap_err();
        assert!(!e.contains("or all"), "{e}");
        std::env::remove_var(VAR);
    }
}
