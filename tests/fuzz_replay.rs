//! Every input saved under tests/fuzz/regressions/<target>/ (crashes, hangs and leaks the fuzzers
//! found, and seeds worth keeping) replayed through the same target bodies on stable, each
//! bounded in time (a thread and a deadline) and memory (an allocator with a ceiling).

#[path = "fuzz/targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Far above what any tenant file may cost, far below what an expansion bomb needs.
const MEMORY_CEILING: usize = 1 << 30;
const TIME_LIMIT: Duration = Duration::from_secs(10);

struct Ceiling;
static IN_USE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only the accounting is added.
unsafe impl GlobalAlloc for Ceiling {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size() > MEMORY_CEILING {
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Ceiling = Ceiling;

/// The inputs saved under `tests/fuzz/<kind>/<target>/`.
fn saved(kind: &str, target: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz").join(kind).join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no saved inputs in {}", dir.display());
    inputs
}

fn replay(target: &str, run: fn(&[u8])) {
    replay_inputs(saved("regressions", target), run);
}

fn replay_inputs(inputs: Vec<std::path::PathBuf>, run: fn(&[u8])) {
    for path in inputs {
        let data = std::fs::read(&path).unwrap();
        let (done, wait) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            run(&data);
            let _ = done.send(());
        });
        match wait.recv_timeout(TIME_LIMIT) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{}: still running after {TIME_LIMIT:?}", path.display()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let panic = worker.join().expect_err("the worker ended without a result");
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!("{}: {}", path.display(), message.unwrap_or_default());
            }
        }
    }
}

#[test]
fn decode_regressions() {
    replay("decode", targets::decode);
}

#[test]
fn yaml_roundtrip_regressions() {
    replay("yaml_roundtrip", targets::yaml_roundtrip);
}

#[test]
fn render_regressions() {
    replay("render", targets::render);
}

#[test]
fn yaml_fast_path_regressions() {
    replay("yaml_fast_path", targets::yaml_fast_path);
}

#[test]
fn toml_fast_path_regressions() {
    replay("toml_fast_path", targets::toml_fast_path);
}

/// The minimised corpora the fuzzers built (tests/fuzz/corpora): thousands of inputs on which
/// the line readers and the full parsers must agree, replayed on stable.
#[test]
fn yaml_fast_path_corpus() {
    replay_inputs(saved("corpora", "yaml_fast_path"), targets::yaml_fast_path);
}

#[test]
fn toml_fast_path_corpus() {
    replay_inputs(saved("corpora", "toml_fast_path"), targets::toml_fast_path);
}
