//! Gradient checkpointing (`magcache_core::checkpoint`): on a toy run with two streams, chains
//! invoked on whole and partial ranges, and leaves both before and after the chains, the
//! checkpointed gradient equals autograd's through the blocks; the blocks of a record run without
//! a graph; a rerun that is not the recorded run is an error.

use candle_core::{Device, Tensor, Var};
use magcache_core::checkpoint::{self, Checkpoint};
use magcache_core::{BlockChain, Branch, CallCx, Result, ScopeKey, Streams};
use std::cell::Cell;
use std::ops::Range;

/// Block `i` maps hidden `h` to `h + tanh(w_i h + e)` and the encoder `e` to `e + 0.5 sin(h.sum())`
/// (a joint block: each stream reads the other). Counts the blocks run and whether their input
/// was tracked.
struct Toy {
    w: Vec<f32>,
    runs: Cell<usize>,
    tracked: Cell<usize>,
}

impl BlockChain for Toy {
    fn num_blocks(&self) -> usize {
        self.w.len()
    }

    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        if x.hidden.track_op() {
            self.tracked.set(self.tracked.get() + 1);
        }
        blocks.into_iter().try_fold(x, |x, i| {
            self.runs.set(self.runs.get() + 1);
            let e = x.encoder.clone().expect("joint");
            let h = (&x.hidden
                + (x.hidden
                    .affine(self.w[i] as f64, 0.0)?
                    .broadcast_add(&e.mean_all()?)?)
                .tanh()?)?;
            let e2 = (&e + (x.hidden.sum_all()?.sin()? * 0.5)?.broadcast_as(e.shape())?)?;
            Ok(Streams::joint(h, e2))
        })
    }
}

const S: ScopeKey = ScopeKey::new(0, Branch::Cond);

/// A "run": two calls, the first on the whole chain, the second in two invocations (block 0, then
/// the rest), a leaf `a` before the first call and `b` between them; the loss is a squared error.
fn run(chain: &Toy, a: &Var, b: &Var) -> Result<Tensor> {
    let dev = Device::Cpu;
    let x0 = Tensor::new(&[0.3f32, -0.7, 1.1], &dev)?.broadcast_mul(a.as_tensor())?;
    let e0 = Tensor::new(&[0.2f32, -0.1], &dev)?;
    let cx = CallCx::dense(S);
    let y = cx.run_chain(chain, Streams::joint(x0, e0))?;
    let x1 = (y.hidden.broadcast_mul(b.as_tensor())? + 0.25)?;
    let e1 = y.encoder.expect("joint");
    // The second call in two invocations, as a strategy that runs the first block alone makes.
    let s1 = CallCx::dense(S).run_chain(&Prefix(chain, 1), Streams::joint(x1, e1))?;
    let s2 = CallCx::dense(S).run_chain(&Suffix(chain, 1), s1)?;
    let target = Tensor::new(&[0.5f32, 0.0, -0.5], &dev)?;
    let enc = s2.encoder.expect("joint");
    Ok(((s2.hidden - target)?.sqr()?.sum_all()? + enc.sqr()?.sum_all()?)?)
}

/// The first `n` blocks of a chain as a chain.
struct Prefix<'a>(&'a Toy, usize);
/// The blocks from `n` on.
struct Suffix<'a>(&'a Toy, usize);

impl BlockChain for Prefix<'_> {
    fn num_blocks(&self) -> usize {
        self.1
    }
    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        self.0.run(blocks, x)
    }
}

impl BlockChain for Suffix<'_> {
    fn num_blocks(&self) -> usize {
        self.0.num_blocks() - self.1
    }
    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        self.0.run(blocks.start + self.1..blocks.end + self.1, x)
    }
}

fn toy() -> Toy {
    Toy {
        w: vec![0.9, -1.3, 0.6],
        runs: Cell::new(0),
        tracked: Cell::new(0),
    }
}

fn leaves() -> (Var, Var) {
    let dev = Device::Cpu;
    (
        Var::new(&[1.2f32], &dev).unwrap(),
        Var::new(&[0.8f32], &dev).unwrap(),
    )
}

fn grads(g: &candle_core::backprop::GradStore, a: &Var, b: &Var) -> Vec<f32> {
    [a, b]
        .iter()
        .map(|v| g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0])
        .collect()
}

#[test]
fn checkpointed_gradient_is_autograds() {
    let (a, b) = leaves();
    let chain = toy();
    let loss = run(&chain, &a, &b).unwrap();
    let exact = grads(&loss.backward().unwrap(), &a, &b);
    let plain = loss.to_scalar::<f32>().unwrap();

    let chain = toy();
    let rec = Checkpoint::record().unwrap();
    let loss = run(&chain, &a, &b).unwrap();
    let tape = rec.finish().unwrap();
    assert_eq!(tape.len(), 3);
    assert_eq!(loss.to_scalar::<f32>().unwrap(), plain);
    // Recorded blocks see detached inputs: no graph kept.
    assert_eq!(chain.tracked.get(), 0);
    let before = chain.runs.get();
    let g = checkpoint::backward(&loss, tape, || run(&chain, &a, &b).map(drop)).unwrap();
    let got = grads(&g, &a, &b);
    for (x, y) in exact.iter().zip(&got) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{exact:?} vs {got:?}"
        );
    }
    // Each rerun recomputes only its target's blocks (3 + 1 + 2), with a graph.
    assert_eq!(chain.runs.get() - before, 6);
    assert_eq!(chain.tracked.get(), 3);
}

#[test]
fn a_rerun_that_differs_is_an_error() {
    let (a, b) = leaves();
    let chain = toy();
    let rec = Checkpoint::record().unwrap();
    let loss = run(&chain, &a, &b).unwrap();
    let tape = rec.finish().unwrap();
    let err = checkpoint::backward(&loss, tape, || {
        CallCx::dense(S)
            .run_chain(
                &Prefix(&chain, 2),
                Streams::joint(
                    Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?,
                    Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?,
                ),
            )
            .map(drop)
    })
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains("not the recorded run"), "{err}");
    // Nothing is left active: a new record starts.
    drop(Checkpoint::record().unwrap());
}
