//! The warm caches of a long-lived process (`magcache serve`): a checkpoint's tensors are kept as
//! read once turned on, what a model streams never is, and prompt embeddings are kept by key.
//! Its own test binary: turning the caches on is for the whole process.

use candle_core::{DType, Device, Tensor};
use magcache_layers::weights::{warm, WeightStore};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

fn checkpoint(dir: &std::path::Path, name: &str, n: usize) -> std::path::PathBuf {
    let p = dir.join(name);
    let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
    let map: HashMap<String, Tensor> = [("w".to_string(), t)].into();
    candle_core::safetensors::save(&map, &p).unwrap();
    p
}

#[test]
fn kept_tensors_are_the_read_ones_streamed_ones_are_never_kept_and_prompts_are_kept_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let held = checkpoint(dir.path(), "held.safetensors", 1000);
    let streamed = checkpoint(dir.path(), "streamed.safetensors", 5000);
    // Off: nothing kept.
    let s = WeightStore::load_checkpoint(&held).unwrap();
    s.get("w").unwrap();
    assert_eq!(warm::kept_bytes(), 0);

    warm::keep_warm();
    let first = WeightStore::load_checkpoint(&held)
        .unwrap()
        .get("w")
        .unwrap();
    assert_eq!(warm::kept_bytes(), 4000);
    let again = WeightStore::load_checkpoint(&held)
        .unwrap()
        .get("w")
        .unwrap();
    let d = (first - again).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(warm::kept_bytes(), 4000, "read once, kept once");

    let s = WeightStore::load_checkpoint(&streamed).unwrap();
    s.streamed.store(true, Ordering::Relaxed);
    assert_eq!(s.get("w").unwrap().dims(), &[5000]);
    assert_eq!(
        warm::kept_bytes(),
        4000,
        "a streamed model's tensors are never kept"
    );

    let mut runs = 0;
    let mut encode = || {
        runs += 1;
        Ok((
            vec![Tensor::zeros(3, DType::F32, &Device::Cpu)?],
            "note".to_string(),
        ))
    };
    let hits = warm::prompt_hits();
    let (v, note) = warm::prompt("enc|a cat".into(), &mut encode).unwrap();
    assert_eq!((v.len(), note.as_str()), (1, "note"));
    warm::prompt("enc|a cat".into(), &mut encode).unwrap();
    warm::prompt("enc|a dog".into(), &mut encode).unwrap();
    assert_eq!(runs, 2, "the repeated prompt is not encoded again");
    assert_eq!(warm::prompt_hits(), hits + 1);
}
