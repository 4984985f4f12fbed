//! The fuzz targets' inputs in a plain `cargo test`, without cargo-fuzz:
//! every kept input (the seed corpora in `fuzz/corpus/TARGET/` and the
//! inputs of fixed crashes and hangs in `fuzz/regressions/TARGET/`) goes
//! through the same function its fuzz target calls, so a fixed bug that
//! comes back fails here. The seeds themselves are made by code and must be
//! accepted whole, which shows the targets reach past the first check.
//!
//! `cargo test --release --test fuzz_regressions -- --ignored write_seed_corpora`
//! rewrites the committed seeds (`fuzz/corpus/TARGET/seed-*`).

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The kept inputs of `target`, in a stable order.
fn kept_inputs(target: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for kind in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) {
            paths.extend(entries.map(|e| e.expect("a readable directory").path()));
        }
    }
    paths.sort();
    paths
}

#[test]
fn every_kept_input_replays_without_a_crash() {
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        let inputs = kept_inputs(target);
        assert!(
            !inputs.is_empty(),
            "fuzz/corpus/{target} holds no inputs; write the seeds (see this file's doc)"
        );
        for path in inputs {
            let data = std::fs::read(&path).expect("a kept input reads");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} crashes its target again",
                path.display()
            );
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} kept fuzz inputs");
}

#[test]
fn every_seed_is_accepted_whole() {
    let seeds = harness::seeds::all();
    for (target, _) in harness::TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| t == target),
            "no seed for {target}"
        );
    }
    for (target, name, data) in &seeds {
        let (_, run) = harness::TARGETS
            .iter()
            .find(|(t, _)| t == target)
            .expect("a seed names a target");
        assert!(run(data), "{target}: seed {name} is refused");
    }
}

#[test]
#[ignore = "writes the seed corpora into the source tree"]
fn write_seed_corpora() {
    for (target, name, data) in harness::seeds::all() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("the corpus directory is created");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("a seed is written");
    }
}
