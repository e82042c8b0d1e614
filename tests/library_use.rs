//! The library from another project, as the README's "Write your own task" says: a scratch Cargo
//! project with the README's own `[dependencies]` lines (the path form, pointed at this checkout)
//! and the README's own `src/main.rs`, built offline from the local Cargo cache with this
//! checkout's Cargo.lock. The README's code is examples/custom_task.rs, word for word; the build
//! pulls no dev-dependency (celery-rs) and shows no future-incompat warning.

mod common;

use common::repo_root;
use std::process::Command;

/// The first fenced block of `lang` after `heading` in the README.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = &readme[readme.find(heading).unwrap_or_else(|| panic!("README has no {heading:?}"))..];
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).unwrap_or_else(|| panic!("no {lang} block under {heading:?}")) + fence.len();
    section[start..start + section[start..].find("```").unwrap()].to_owned()
}

#[test]
fn the_readmes_dependency_lines_and_code_build_in_a_new_project() {
    let toml = readme_block("## Write your own task", "toml");
    let code = readme_block("## Write your own task", "rust");
    let example = std::fs::read_to_string(repo_root().join("examples/custom_task.rs")).unwrap();
    let body = &example[example.find("use celery_autoscale").unwrap()..];
    assert_eq!(code, body, "the README's code is examples/custom_task.rs after its doc comment");

    let dir = tempfile::tempdir().unwrap();
    let path_line = toml.lines().find(|l| l.starts_with("celery-autoscale = ")).expect("a celery-autoscale line");
    assert!(path_line.contains("path = \"../celery-autoscale\"") && path_line.contains("git = "), "{path_line}");
    let ours = format!("celery-autoscale = {{ path = {:?} }}", repo_root().display().to_string());
    let manifest = format!(
        "[package]\nname = \"word-count\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n{}",
        toml.replace(path_line, &ours)
    );
    std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/main.rs"), &code).unwrap();
    // The checkout's lock: the same versions, so the build needs nothing the cache lacks.
    std::fs::copy(repo_root().join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();

    // A target directory of its own that outlives the scratch project, so a second run is quick
    // (the first compiles the dependency tree once, a few minutes on two cores).
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("library-use");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--offline", "--quiet"]).current_dir(dir.path());
    // Only what a user's shell would have: none of what `cargo test` set for this process.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" || key == "OUT_DIR" || key == "RUSTFLAGS" {
            build.env_remove(&key);
        }
    }
    build.env("CARGO_TARGET_DIR", &target);
    let out = build.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the README's project does not build:\n{stderr}");
    assert!(!stderr.contains("future version of Rust"), "a future-incompat warning reaches the user:\n{stderr}");
    let lock = std::fs::read_to_string(dir.path().join("Cargo.lock")).unwrap();
    assert!(!lock.contains("name = \"celery\"\n"), "a dev-dependency (celery-rs) was pulled into the user's build");
    let help = Command::new(target.join("debug/word-count")).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--concurrency"), "it is a worker with the usual flags");
}
