//! The on/off environment switches (`MAGCACHE_CPU_BF16`, `MAGCACHE_LINE_ALLOC`, the
//! `MAGCACHE_ONEDNN_*` switches): one parser.

/// An `on`/`off` environment switch (either case): `Some(on)` where set, `None` where unset or
/// empty; another value is a one-line error naming the variable (`unset` says what unset means).
pub fn env_switch(var: &str, unset: &str) -> std::result::Result<Option<bool>, String> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) if v.eq_ignore_ascii_case("on") => Ok(Some(true)),
        Ok(v) if v.eq_ignore_ascii_case("off") => Ok(Some(false)),
        Ok(v) => Err(format!("{var}={v:?}: expected on or off (unset: {unset})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `on` and `off` in either case, unset or empty for the default, anything else one line
    /// naming the variable and its value (a name of the test's own: no other test reads it).
    #[test]
    fn env_switches_take_on_and_off() {
        const VAR: &str = "MAGCACHE_TEST_ENV_SWITCH";
        let read = |v: Option<&str>| {
            match v {
                Some(v) => std::env::set_var(VAR, v),
                None => std::env::remove_var(VAR),
            }
            env_switch(VAR, "the default")
        };
        assert_eq!(read(None), Ok(None));
        assert_eq!(read(Some("")), Ok(None));
        assert_eq!(read(Some("on")), Ok(Some(true)));
        assert_eq!(read(Some("OFF")), Ok(Some(false)));
        let e = read(Some("yes")).unwrap_err();
        assert_eq!(
            e,
            "MAGCACHE_TEST_ENV_SWITCH=\"yes\": expected on or off (unset: the default)"
        );
        std::env::remove_var(VAR);
    }
}
