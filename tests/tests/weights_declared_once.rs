//! Tensor names and shapes are written once, in the loaders: `block_tensors`, `top_tensors` and
//! `shapes` (magcache_layers::chain_model::ChainModel) record what the loaders ask a recording store for. The released-layout checkpoints of the tiny fixtures
//! are the truth: every block tensor they hold is recorded, with its shape, and nothing else.

use magcache_layers::chain_model::ChainModel;
use magcache_layers::weights::WeightStore;
use magcache_models::flux::model::FluxModel;
use magcache_models::wan::model::WanModel;
use magcache_tests::fixture;
use std::collections::BTreeMap;

/// The checkpoint's tensors whose names start with one of `prefixes`, with their shapes.
fn stored(store: &WeightStore, prefixes: &[&str]) -> BTreeMap<String, Vec<usize>> {
    store
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|k| (k.clone(), store.shape(k).unwrap()))
        .collect()
}

fn recorded(lists: Vec<Vec<(String, Vec<usize>)>>) -> BTreeMap<String, Vec<usize>> {
    let flat: Vec<(String, Vec<usize>)> = lists.into_iter().flatten().collect();
    let n = flat.len();
    let map: BTreeMap<String, Vec<usize>> = flat.into_iter().collect();
    assert_eq!(map.len(), n, "a loader asked for a tensor twice");
    map
}

#[test]
fn wan_block_tensors_are_the_checkpoints_blocks() {
    let l = magcache_models::wan::load::load_wan(
        &fixture("reference/wan21_tiny"),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    let rec = recorded(
        (0..l.config.num_layers)
            .map(|i| WanModel::block_tensors(&l.config, i).unwrap())
            .collect(),
    );
    assert_eq!(rec, stored(&l.store, &["blocks."]));
    // The whole list (embeddings and head, then the blocks) is what presets generate.
    let all = WanModel::shapes(&l.config).unwrap();
    let all: BTreeMap<String, Vec<usize>> = all.into_iter().collect();
    assert_eq!(all, stored(&l.store, &[""]));
}

#[test]
fn flux_block_tensors_are_the_checkpoints_blocks() {
    let l = magcache_models::flux::load::load_flux(
        &fixture("reference/flux_tiny"),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    let c = &l.config;
    let rec = recorded(
        (0..c.num_layers + c.num_single_layers)
            .map(|i| FluxModel::block_tensors(c, i).unwrap())
            .collect(),
    );
    assert_eq!(
        rec,
        stored(
            &l.store,
            &["transformer_blocks.", "single_transformer_blocks."]
        )
    );
    // With the embeddings and head `assemble` reads: the whole checkpoint.
    let mut all = recorded(vec![FluxModel::top_tensors(c).unwrap()]);
    all.extend(rec);
    assert_eq!(all, stored(&l.store, &[""]));
}

#[test]
fn a_recording_store_holds_no_memory_and_is_not_a_checkpoint() {
    let w = WeightStore::recording();
    let t = w.get_weight("a.weight", &[4096, 4096]).unwrap();
    assert_eq!(t.dims(), &[4096, 4096]);
    assert_eq!(t.stride(), &[0, 0], "a zero-stride view, nothing allocated");
    assert_eq!(
        w.recorded().unwrap(),
        vec![("a.weight".to_string(), vec![4096, 4096])]
    );
    let not = WeightStore::default();
    assert!(not.recorded().is_err());
}
