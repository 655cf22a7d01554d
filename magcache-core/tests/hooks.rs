//! Hook registry: composition order, removal, the call scope reaching every hook.

use candle_core::{Device, Tensor};
use magcache_core::hooks::{BlockHook, HookCx, HookOrder, HookRegistry, Next};
use magcache_core::{BlockMetadata, Error, Result, ScopeKey, Streams};
use std::sync::{Arc, Mutex};

const META: BlockMetadata = BlockMetadata {
    kind: "toy",
    joint: false,
};

struct Tracer {
    name: String,
    order: HookOrder,
    log: Arc<Mutex<Vec<String>>>,
}

impl BlockHook for Tracer {
    fn name(&self) -> &str {
        &self.name
    }
    fn order(&self) -> HookOrder {
        self.order
    }
    fn forward(&self, _cx: &HookCx<'_>, streams: Streams, next: Next<'_>) -> Result<Streams> {
        self.log
            .lock()
            .unwrap()
            .push(format!("enter {}", self.name));
        let out = next(streams)?;
        self.log
            .lock()
            .unwrap()
            .push(format!("leave {}", self.name));
        Ok(out)
    }
}

fn tracer(name: &str, order: HookOrder, log: &Arc<Mutex<Vec<String>>>) -> Arc<dyn BlockHook> {
    Arc::new(Tracer {
        name: name.into(),
        order,
        log: log.clone(),
    })
}

const S: ScopeKey = ScopeKey::new(0, magcache_core::Branch::Cond);

fn x() -> Tensor {
    Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()
}

#[test]
fn hooks_compose_by_order_then_registration() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut reg = HookRegistry::new(vec![META]);
    reg.register(0, tracer("inner", HookOrder::Inner, &log))
        .unwrap();
    reg.register(0, tracer("mid1", HookOrder::Middle, &log))
        .unwrap();
    reg.register(0, tracer("outer", HookOrder::Outer, &log))
        .unwrap();
    reg.register(0, tracer("mid2", HookOrder::Middle, &log))
        .unwrap();
    assert_eq!(reg.hook_names(0), ["outer", "mid1", "mid2", "inner"]);
    let blog = log.clone();
    reg.run_block(S, 0, Streams::hidden(x()), &|s: Streams| {
        blog.lock().unwrap().push("block".into());
        Ok(s)
    })
    .unwrap();
    let got = log.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            "enter outer",
            "enter mid1",
            "enter mid2",
            "enter inner",
            "block",
            "leave inner",
            "leave mid2",
            "leave mid1",
            "leave outer"
        ]
    );
}

#[test]
fn removing_a_hook_keeps_the_others_working() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut reg = HookRegistry::new(vec![META, META]);
    reg.register(0, tracer("a", HookOrder::Outer, &log))
        .unwrap();
    reg.register(0, tracer("b", HookOrder::Middle, &log))
        .unwrap();
    reg.register(0, tracer("c", HookOrder::Inner, &log))
        .unwrap();
    assert!(reg.remove(0, "b"));
    assert!(!reg.remove(0, "b"));
    assert!(!reg.remove(7, "a"));
    assert_eq!(reg.hook_names(0), ["a", "c"]);
    let out = reg
        .run_block(S, 0, Streams::hidden(x()), &|s: Streams| {
            Ok(Streams::hidden((&s.hidden * 3.0)?))
        })
        .unwrap();
    assert_eq!(out.hidden.to_vec1::<f32>().unwrap(), [3.0, 6.0]);
    assert_eq!(
        log.lock().unwrap().as_slice(),
        ["enter a", "enter c", "leave c", "leave a"]
    );
    assert_eq!(reg.remove_prefixed(""), 2);
    assert!(reg.is_empty());
}

#[test]
fn duplicate_names_and_bad_blocks_are_errors() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut reg = HookRegistry::new(vec![META]);
    reg.register(0, tracer("a", HookOrder::Outer, &log))
        .unwrap();
    assert!(matches!(
        reg.register(0, tracer("a", HookOrder::Inner, &log)),
        Err(Error::Hooks(_))
    ));
    assert!(matches!(
        reg.register(1, tracer("z", HookOrder::Inner, &log)),
        Err(Error::Hooks(_))
    ));
}

/// Records the scope and block each call arrives with.
struct ScopeProbe(Arc<Mutex<Vec<(ScopeKey, usize)>>>);

impl BlockHook for ScopeProbe {
    fn name(&self) -> &str {
        "probe"
    }
    fn order(&self) -> HookOrder {
        HookOrder::Middle
    }
    fn forward(&self, cx: &HookCx<'_>, streams: Streams, next: Next<'_>) -> Result<Streams> {
        self.0.lock().unwrap().push((cx.scope, cx.block));
        next(streams)
    }
}

#[test]
fn every_hook_sees_the_scope_of_its_call() {
    use magcache_core::Branch;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut reg = HookRegistry::new(vec![META, META]);
    reg.register(1, Arc::new(ScopeProbe(seen.clone()))).unwrap();
    let uncond = ScopeKey::new(1, Branch::Uncond);
    let id = |s: Streams| Ok(s);
    reg.run_block(uncond, 0, Streams::hidden(x()), &id).unwrap();
    reg.run_block(uncond, 1, Streams::hidden(x()), &id).unwrap();
    reg.run_block(ScopeKey::new(0, Branch::Cond), 1, Streams::hidden(x()), &id)
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [(uncond, 1), (ScopeKey::new(0, Branch::Cond), 1)]
    );
    assert!(matches!(
        reg.run_block(uncond, 2, Streams::hidden(x()), &id),
        Err(Error::Hooks(_))
    ));
}

#[test]
fn hooks_see_both_streams_of_a_joint_block() {
    // A FLUX-like double block: hidden and encoder states both flow through the hooks.
    let meta = BlockMetadata {
        kind: "double",
        joint: true,
    };
    assert_eq!(meta.streams(), "hidden + encoder");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut reg = HookRegistry::new(vec![meta]);
    reg.register(0, tracer("outer", HookOrder::Outer, &log))
        .unwrap();
    let out = reg
        .run_block(
            S,
            0,
            Streams::joint(x(), (x() * 10.0).unwrap()),
            &|s: Streams| {
                let e = s.encoder.clone().unwrap();
                Ok(Streams::joint((&s.hidden + &e)?, (e * 2.0)?))
            },
        )
        .unwrap();
    assert_eq!(out.hidden.to_vec1::<f32>().unwrap(), [11.0, 22.0]);
    assert_eq!(out.encoder.unwrap().to_vec1::<f32>().unwrap(), [20.0, 40.0]);
    assert_eq!(log.lock().unwrap().len(), 2);
}
