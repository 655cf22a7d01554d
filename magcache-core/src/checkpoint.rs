//! Gradient checkpointing of the block chains, for code that differentiates whole runs (the fitted
//! estimator's fit): the exact gradient with one call's block activations alive at a time instead
//! of every computed call's.
//!
//! A run under [`Checkpoint::record`] runs every chain invocation ([`crate::CallCx::run_chain`],
//! any range of blocks) without a graph, on its detached input, and returns `x + r` where the
//! residual `r` is a fresh leaf variable: autograd sees the rest of the run (embeddings, heads,
//! sampler, guidance, the strategy's reuse) as usual, and the chains as leaves. [`backward`] then
//! sweeps the invocations from the last to the first. For invocation `c` it takes the total
//! gradient `g_c` at its residual (one backward over the light graph), reruns the run with
//! invocation `c`'s blocks recomputed on its recorded input with a graph (every other invocation
//! returns its recorded residual, no block runs), and gets the vector-Jacobian product
//! `v_c = (dr_c/dx_c)^T g_c`. The term `<x_c, v_c>` (`v_c` constant) added to the loss carries the
//! gradient across the blocks to everything before `c`. After the sweep one last backward gives
//! every other leaf's exact gradient.
//!
//! Cost: one run without the blocks' graph, then per invocation one light backward and one rerun
//! up to that invocation (it stops there with an error [`backward`] expects), whose only block
//! work is that invocation's forward and backward. The rerun must make the same
//! invocations in the same order (a deterministic run with the same inputs); a different one is
//! an error.

use crate::chain::{BlockChain, Indicator, Streams};
use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::cell::RefCell;
use std::ops::Range;

/// One recorded chain invocation.
struct Entry {
    blocks: Range<usize>,
    /// The input as the run's graph sees it (tracked).
    input: Streams,
    /// The same values, detached.
    detached: Streams,
    /// The hidden residual's leaf.
    hidden: Var,
    encoder: Encoder,
}

/// What a recorded invocation did to the encoder stream.
#[derive(Clone)]
enum Encoder {
    /// Updated it: the residual's leaf.
    Residual(Var),
    /// Returned this (none, or a stream the input lacked), a constant.
    Constant(Option<Tensor>),
}

impl Encoder {
    fn var(&self) -> Option<&Var> {
        match self {
            Encoder::Residual(v) => Some(v),
            Encoder::Constant(_) => None,
        }
    }
}

/// What this thread's chains do now.
enum Mode {
    Record(Vec<Entry>),
    /// Rerun for invocation `target` of `tape`, with `grad` the residual's gradient; `vjp` is set
    /// once it ran.
    Replay {
        tape: Vec<Entry>,
        next: usize,
        target: usize,
        grad: (Tensor, Option<Tensor>),
        vjp: Option<(Tensor, Option<Tensor>)>,
    },
}

thread_local! {
    static MODE: RefCell<Option<Mode>> = const { RefCell::new(None) };
    static NO_GRAPH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is running blocks whose graph nobody needs (a recorded invocation, or a
/// replayed one other than the target): a model may use its fused ops there even while it is asked
/// for differentiable ones.
pub fn no_graph_needed() -> bool {
    NO_GRAPH.with(|c| c.get())
}

/// Whether a record or a replay is active on this thread.
pub(crate) fn active() -> bool {
    MODE.with(|m| m.borrow().is_some())
}

/// The recorded invocations of a run ([`Checkpoint::record`]).
pub struct Tape(Vec<Entry>);

impl Tape {
    /// Chain invocations recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// While alive, this thread's chain invocations are recorded ([`Checkpoint::finish`] returns
/// them); dropped without `finish`, the record is discarded.
pub struct Checkpoint {
    _private: (),
}

impl Checkpoint {
    /// Starts recording on this thread: an error if a record or replay is already active.
    pub fn record() -> Result<Self> {
        install(Mode::Record(Vec::new()))?;
        Ok(Checkpoint { _private: () })
    }

    /// Ends the record and returns its tape.
    pub fn finish(self) -> Result<Tape> {
        match MODE.with(|m| m.borrow_mut().take()) {
            Some(Mode::Record(e)) => Ok(Tape(e)),
            _ => Err(Error::msg("checkpoint: no record active on this thread")),
        }
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        MODE.with(|m| m.borrow_mut().take());
    }
}

fn install(mode: Mode) -> Result<()> {
    MODE.with(|m| {
        let mut m = m.borrow_mut();
        if m.is_some() {
            return Err(Error::msg(
                "checkpoint: a record or replay is already active on this thread",
            ));
        }
        *m = Some(mode);
        Ok(())
    })
}

/// Removes the replay on drop (a rerun that fails leaves nothing behind).
struct ReplayGuard;

impl Drop for ReplayGuard {
    fn drop(&mut self) {
        MODE.with(|m| m.borrow_mut().take());
    }
}

/// Runs `f` with `NO_GRAPH` set.
fn without_graph<T>(f: impl FnOnce() -> T) -> T {
    let was = NO_GRAPH.with(|c| c.replace(true));
    let out = f();
    NO_GRAPH.with(|c| c.set(was));
    out
}

/// `<a, b>` as a scalar tensor.
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a * b)?.sum_all()?)
}

/// The gradients of `loss`, a function of a run recorded in `tape`, exact through the blocks:
/// `rerun` runs the same run again (same inputs, same leaves' values), its chains answering from
/// the tape ([module docs](self)).
pub fn backward(
    loss: &Tensor,
    tape: Tape,
    mut rerun: impl FnMut() -> Result<()>,
) -> Result<GradStore> {
    let mut tape = tape.0;
    let mut total = loss.clone();
    for c in (0..tape.len()).rev() {
        let e = &tape[c];
        let tracked =
            e.input.hidden.track_op() || e.input.encoder.as_ref().is_some_and(Tensor::track_op);
        if !tracked {
            // Nothing before this invocation depends on a leaf: no gradient to carry back.
            continue;
        }
        let g = total.backward()?;
        let gh = g.get(e.hidden.as_tensor()).cloned();
        let ge = e.encoder.var().and_then(|v| g.get(v.as_tensor()).cloned());
        drop(g);
        let gh = match (gh, &ge) {
            (Some(h), _) => h,
            (None, Some(_)) => e.hidden.as_tensor().zeros_like()?,
            (None, None) => continue,
        };
        install(Mode::Replay {
            tape,
            next: 0,
            target: c,
            grad: (gh, ge),
            vjp: None,
        })?;
        let guard = ReplayGuard;
        let ran = rerun();
        let mode = MODE.with(|m| m.borrow_mut().take());
        drop(guard);
        let Some(Mode::Replay { tape: t, vjp, .. }) = mode else {
            return Err(Error::msg(
                "checkpoint: the replay was replaced while it ran",
            ));
        };
        // The rerun stops at the first invocation after the target (an error by design); an
        // error before the target's product is the rerun's own.
        if vjp.is_none() {
            ran?;
        }
        tape = t;
        let (vh, ve) = vjp.ok_or_else(|| {
            Error::msg(format!(
                "checkpoint: the rerun made fewer chain invocations than the {} recorded",
                tape.len()
            ))
        })?;
        let e = &tape[c];
        total = (total + dot(&e.input.hidden, &vh)?)?;
        if let (Some(x), Some(v)) = (&e.input.encoder, &ve) {
            total = (total + dot(x, v)?)?;
        }
    }
    Ok(total.backward()?)
}

/// `inner` as the active record or replay sees it (what [`crate::CallCx::run_chain`] runs while
/// one is active).
pub(crate) struct Taped<'a>(pub(crate) &'a dyn BlockChain);

impl Taped<'_> {
    fn record(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        let detached = Streams {
            hidden: x.hidden.detach(),
            encoder: x.encoder.as_ref().map(Tensor::detach),
        };
        let y = without_graph(|| self.0.run(blocks.clone(), detached.clone()))?;
        let hidden = Var::from_tensor(&(&y.hidden - &detached.hidden)?)?;
        let (encoder, enc_out) = match (&x.encoder, &y.encoder) {
            (Some(a), Some(b)) => {
                let v = Var::from_tensor(&(b - a.detach())?)?;
                let out = (a + v.as_tensor())?;
                (Encoder::Residual(v), Some(out))
            }
            (_, b) => {
                let b = b.as_ref().map(Tensor::detach);
                (Encoder::Constant(b.clone()), b)
            }
        };
        let out = Streams {
            hidden: (&x.hidden + hidden.as_tensor())?,
            encoder: enc_out,
        };
        MODE.with(|m| match &mut *m.borrow_mut() {
            Some(Mode::Record(entries)) => {
                entries.push(Entry {
                    blocks,
                    input: x,
                    detached,
                    hidden,
                    encoder,
                });
                Ok(())
            }
            _ => Err(Error::msg("checkpoint: the record ended while a chain ran")),
        })?;
        Ok(out)
    }

    /// One invocation of a replay: the recorded residual, or for the target the blocks rerun on
    /// the recorded input with a graph and the vector-Jacobian product taken.
    fn replay(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        // What this invocation needs, taken out of the thread's state so the blocks can run
        // without holding it.
        let (n, target, recorded) = MODE.with(|m| -> Result<_> {
            let mut m = m.borrow_mut();
            let Some(Mode::Replay {
                tape,
                next,
                target,
                grad,
                ..
            }) = &mut *m
            else {
                return Err(Error::msg("checkpoint: no replay active"));
            };
            let n = *next;
            *next += 1;
            if n > *target {
                return Err(Error::msg(
                    "checkpoint: the replay has what it needs (the rerun stops here)",
                ));
            }
            let e = tape.get(n).ok_or_else(|| {
                Error::msg(format!(
                    "checkpoint: the rerun made more chain invocations than the {} recorded",
                    tape.len()
                ))
            })?;
            if e.blocks != blocks || e.detached.hidden.dims() != x.hidden.dims() {
                return Err(Error::msg(format!(
                    "checkpoint: chain invocation {n} ran blocks {blocks:?} on {:?}, the record {:?} on {:?} (the rerun is not the recorded run)",
                    x.hidden.dims(),
                    e.blocks,
                    e.detached.hidden.dims()
                )));
            }
            // The target's recorded input and residual gradient.
            let target = (n == *target).then(|| (e.detached.clone(), grad.clone()));
            Ok((n, target, (e.hidden.as_tensor().detach(), e.encoder.clone())))
        })?;
        if let Some((d, (gh, ge))) = target {
            let xh = Var::from_tensor(&d.hidden)?;
            let xe = d.encoder.as_ref().map(Var::from_tensor).transpose()?;
            let input = Streams {
                hidden: xh.as_tensor().clone(),
                encoder: xe.as_ref().map(|v| v.as_tensor().clone()),
            };
            let y = self.0.run(blocks, input)?;
            let mut s = dot(&(&y.hidden - xh.as_tensor())?, &gh)?;
            if let (Some(ye), Some(xe), Some(ge)) = (&y.encoder, &xe, &ge) {
                s = (s + dot(&(ye - xe.as_tensor())?, ge)?)?;
            }
            let g = s.backward()?;
            let vh = match g.get(xh.as_tensor()) {
                Some(t) => t.clone(),
                None => xh.as_tensor().zeros_like()?,
            };
            let ve = xe.as_ref().and_then(|v| g.get(v.as_tensor()).cloned());
            MODE.with(|m| {
                if let Some(Mode::Replay { vjp, .. }) = &mut *m.borrow_mut() {
                    *vjp = Some((vh, ve));
                }
            });
        }
        let (rh, re) = recorded;
        Ok(Streams {
            hidden: (&x.hidden + rh)?,
            encoder: match (&x.encoder, re) {
                (Some(a), Encoder::Residual(r)) => Some((a + r.as_tensor().detach())?),
                (None, Encoder::Residual(_)) => {
                    return Err(Error::msg(format!(
                        "checkpoint: chain invocation {n} has no encoder stream, the record had one"
                    )))
                }
                (_, Encoder::Constant(constant)) => constant,
            },
        })
    }
}

impl BlockChain for Taped<'_> {
    fn num_blocks(&self) -> usize {
        self.0.num_blocks()
    }

    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        let replaying = MODE.with(|m| matches!(&*m.borrow(), Some(Mode::Replay { .. })));
        if replaying {
            self.replay(blocks, x)
        } else {
            self.record(blocks, x)
        }
    }

    fn indicator(&self, kind: Indicator) -> Result<Option<Tensor>> {
        self.0.indicator(kind)
    }
}
