//! A sharded checkpoint's `*.safetensors.index.json` is honoured, not only its file list: a shard
//! path that leaves the folder, a tensor the index places in a shard that does not hold it, and a
//! shard tensor the index does not list are errors naming the index or shard and the tensor.

use magcache_layers::weights::weight_files;
use magcache_tests::fixture;
use serde_json::Value;

const INDEX: &str = "model.safetensors.index.json";

/// A copy of the sharded FLUX.2 text encoder whose index `edit` changes.
fn with_index(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("pipelines/flux2_text_encoder")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
    }
    let p = d.path().join(INDEX);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v["weight_map"].as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
    let err = weight_files(d.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    (d, err)
}

#[test]
fn the_fixture_index_is_whole() {
    let files = weight_files(&fixture("pipelines/flux2_text_encoder")).unwrap();
    assert_eq!(files.len(), 2);
}

#[test]
fn a_shard_outside_the_folder_is_refused() {
    for bad in [
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
    ] {
        let (_d, e) = with_index(|m| {
            m.insert("model.embed_tokens.weight".into(), bad.into());
        });
        assert!(
            e.contains(INDEX)
                && e.contains("model.embed_tokens.weight")
                && e.contains("not a file name"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_ghost_or_missing_entry_is_refused() {
    let (_d, e) = with_index(|m| {
        m.insert(
            "model.ghost.weight".into(),
            "model-00002-of-00002.safetensors".into(),
        );
    });
    assert!(
        e.contains("model.ghost.weight") && e.contains("does not hold it"),
        "{e}"
    );
    let (_d, e) = with_index(|m| {
        m.remove("model.norm.weight").unwrap();
    });
    assert!(
        e.contains("model.norm.weight") && e.contains("not in") && e.contains("safetensors"),
        "{e}"
    );
    // A tensor listed under the other shard than the one holding it.
    let (_d, e) = with_index(|m| {
        let k = "model.embed_tokens.weight";
        let other = match m[k].as_str().unwrap() {
            "model-00001-of-00002.safetensors" => "model-00002-of-00002.safetensors",
            _ => "model-00001-of-00002.safetensors",
        };
        m.insert(k.into(), other.into());
    });
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
}
