//! Checks of the crate's layering that the compiler cannot make.
//!
//! The planner and the engine see only their traits (`Source`, `Sink`): the NBD client is known
//! inside `nbd/` (which adapts it to `Source` in `nbd/source.rs`) and at the copy entry points
//! alone, `copy.rs` (one copy run from a URI) and `napi/client.rs` (the client's binding). A new
//! use elsewhere would tie the engine to the protocol again, so it fails this test.

use std::path::{Path, PathBuf};

/// Files outside `nbd/` that may name the client, relative to `src/`.
const CLIENT_ENTRY_POINTS: &[&str] = &["copy.rs", "napi/client.rs"];

/// Every `.rs` file under `dir`, with its path relative to `root`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(root)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .replace('\\', "/");
            out.push((relative, path));
        }
    }
    Ok(())
}

/// Whether `text` holds `word` as a whole identifier (so `NativeNbdClient` does not count).
fn names(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn only_nbd_and_the_copy_entry_points_name_the_nbd_client() -> std::io::Result<()> {
    // Spelled in two halves so that this file does not name it.
    let client = concat!("Nbd", "Client");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &root, &mut files)?;
    assert!(
        files.iter().any(|(name, _)| name == "engine.rs"),
        "found no sources under {}",
        root.display()
    );
    let mut offenders = Vec::new();
    for (name, path) in &files {
        if name.starts_with("nbd/") || CLIENT_ENTRY_POINTS.contains(&name.as_str()) {
            continue;
        }
        if names(&std::fs::read_to_string(path)?, client) {
            offenders.push(name.clone());
        }
    }
    assert!(
        offenders.is_empty(),
        "{offenders:?} name {client}: outside nbd/, only {CLIENT_ENTRY_POINTS:?} may; the engine and the planner see the Source trait alone"
    );
    Ok(())
}

#[test]
fn names_matches_whole_identifiers_only() {
    assert!(names("use crate::nbd::{Foo, Bar};", "Foo"));
    assert!(names("Foo", "Foo"));
    assert!(!names("NativeFoo FooBar foo_Foo", "Foo"));
}
