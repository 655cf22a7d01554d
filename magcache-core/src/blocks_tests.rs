//! Tests of [`super::ModelBlocks`] and [`super::run_streamed`].

use super::*;

use crate::{BlockHook, HookCx, HookOrder, Streams};
use candle_core::{Device, Tensor};
use std::sync::Arc;

const KIND: BlockMetadata = BlockMetadata {
    kind: "test.block",
    joint: false,
};

fn ones() -> Tensor {
    Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap()
}

fn first(s: &Streams) -> f32 {
    s.hidden.to_vec1::<f32>().unwrap()[0]
}

/// Adds `add` to the block's input (before the block) and records the output's first value.
struct AddBefore(f64);
impl BlockHook for AddBefore {
    fn name(&self) -> &str {
        "add"
    }
    fn order(&self) -> HookOrder {
        HookOrder::Outer
    }
    fn forward(&self, _: &HookCx<'_>, s: Streams, next: crate::hooks::Next<'_>) -> Result<Streams> {
        next(Streams::hidden((s.hidden + self.0)?))
    }
}

#[test]
fn held_and_streamed_chains_run_alike_through_hooks_and_trace() {
    let scales = vec![2.0f64, 3.0, 5.0];
    let held = ModelBlocks::held("test", scales.clone(), vec![KIND; 3]).unwrap();
    let s2 = scales.clone();
    let streamed = ModelBlocks::streamed("test", vec![KIND; 3], move |i| Ok(s2[i]));
    assert!(!held.is_streamed() && streamed.is_streamed());
    assert_eq!(held.held_blocks().map(|b| b.len()), Some(3));
    assert!(streamed.held_blocks().is_none());
    for mut blocks in [held, streamed] {
        blocks.hooks.register(1, Arc::new(AddBefore(1.0))).unwrap();
        let mut seen = Vec::new();
        let mut trace = |i: usize, s: &Streams| seen.push((i, first(s)));
        let chain = blocks
            .call(
                ScopeKey::new(0, crate::Branch::Cond),
                |_, k: &f64, s: Streams| Ok(Streams::hidden((s.hidden * *k)?)),
            )
            .with_indicator(Indicator::TimestepEmbedding, &ones())
            .traced(&mut trace);
        assert_eq!(chain.num_blocks(), 3);
        // Block 0 alone, then 1..3 from its output: (1*2 + 1)*3 = 9, *5 = 45.
        let a = chain.run(0..1, Streams::hidden(ones())).unwrap();
        let b = chain.run(1..3, a).unwrap();
        assert_eq!(first(&b), 45.0);
        assert!(chain.run(2..4, b.clone()).is_err());
        assert!(chain
            .indicator(Indicator::TimestepEmbedding)
            .unwrap()
            .is_some());
        assert!(chain.indicator(Indicator::InputLatents).unwrap().is_none());
        drop(chain);
        assert_eq!(seen, [(0, 2.0), (1, 9.0), (2, 45.0)]);
    }
    assert!(ModelBlocks::held("test", vec![1.0f64], vec![KIND; 2]).is_err());
}

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
