//! FLUX.2's prompt goes through the tokenizer folder's chat template: the runner renders Qwen3's
//! ChatML with the thinking switch for the pipeline's one call, so a folder whose template renders
//! something else is refused naming the file (issue 42), and the released layout's is accepted.

use magcache_text::qwen3::check_chat_template;
use std::path::Path;

fn copy_tokenizer(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pipelines/flux2_klein_tiny_folder/tokenizer");
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_template_this_runner_cannot_render_is_refused() {
    let d = tempfile::tempdir().unwrap();
    copy_tokenizer(d.path());
    let from = check_chat_template(d.path()).unwrap();
    assert!(from.ends_with("chat_template.jinja"), "{from}");
    let jinja = d.path().join("chat_template.jinja");
    for other in [
        // Another chat format.
        "{% for m in messages %}USER: {{ m.content }}\n{% endfor %}ASSISTANT:",
        // ChatML without Qwen3's thinking switch.
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ] {
        std::fs::write(&jinja, other).unwrap();
        let e = check_chat_template(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("chat_template.jinja") && e.contains("not a template this runner renders"),
            "{e}"
        );
    }
    // Without the .jinja file: tokenizer_config.json's `chat_template` decides.
    std::fs::remove_file(&jinja).unwrap();
    let from = check_chat_template(d.path()).unwrap();
    assert!(from.contains("tokenizer_config.json"), "{from}");
}
