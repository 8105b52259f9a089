//! The store under hostile conditions, through the shim's API: links planted inside the store
//! are refused and never followed (no data goes outside, retention deletes nothing outside),
//! directories another user owns or others may write are refused (and can be looked at
//! read-only), the lock file is never written through a link, and an oversized manifest is
//! refused before it is read. The tests run as root, as the reported attacks did: "another
//! user" is uid 65534.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use supervise_store::lock::{JobLock, Owner};
use supervise_store::{Error, Result, SnapshotReader, SnapshotWriter, Store, UnsafeKind};

const OTHER_UID: u32 = 65534;

/// Every file under `dir`: path, content.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.insert(e.path(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// What a writer does in a cycle: open, snapshot, retention keeping one.
fn write_cycle(root: &Path) -> Result<()> {
    let job = Store::open(root)?.job("j")?;
    let mut writer = SnapshotWriter::open(job, 0)?;
    for round in 0..2u64 {
        let mut b = writer.begin(None);
        b.value("round", &round)?;
        b.slice("data", &vec![round as f64; 50_000])?;
        b.commit()?;
        writer.apply_retention(1)?;
    }
    Ok(())
}

fn is_link_refused(result: &Result<()>, name: &str) -> bool {
    matches!(result, Err(Error::Unsafe { path, kind: UnsafeKind::NotExpectedKind { found: "symbolic link" } })
        if path.ends_with(name))
}

#[test]
fn symlinked_packs_or_snapshots_are_refused_and_nothing_outside_changes() {
    for sub in ["packs", "snapshots"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(root.join("j")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        // An unrelated pack-like file and a manifest-like file in the link's target.
        std::fs::write(
            outside.join("00000000000000000001-unrelated-000.pack"),
            b"keep me",
        )
        .unwrap();
        std::fs::write(outside.join("00000000000000000001.snap"), b"keep me too").unwrap();
        symlink(&outside, root.join("j").join(sub)).unwrap();
        let before = files(&outside);

        let result = write_cycle(&root);
        assert_eq!(
            files(&outside),
            before,
            "{sub}: something changed outside the store"
        );
        assert!(is_link_refused(&result, sub), "{sub}: {result:?}");
        // Looking is refused too: a link is never followed, whatever the access.
        let look = Store::open_read_only(&root)
            .and_then(|s| s.existing_job("j"))
            .map(drop);
        assert!(is_link_refused(&look, sub), "{sub}: {look:?}");
    }
}

#[test]
fn a_job_or_store_owned_by_another_user_is_refused_and_can_be_looked_at_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    write_cycle(&root).unwrap();
    let job_dir = root.join("j");
    std::os::unix::fs::chown(&job_dir, Some(OTHER_UID), None).unwrap();
    let before = files(&root);

    let result = write_cycle(&root);
    assert!(
        matches!(&result, Err(Error::Unsafe { path, kind: UnsafeKind::ForeignOwner { uid: OTHER_UID, mode: 0o700 } }) if *path == job_dir),
        "{result:?}"
    );
    let lock = JobLock::try_take(&job_dir, &Owner::this_process("test")).map(drop);
    assert!(
        matches!(
            &lock,
            Err(Error::Unsafe {
                kind: UnsafeKind::ForeignOwner { .. },
                ..
            })
        ),
        "{lock:?}"
    );
    assert_eq!(files(&root), before, "a refused store was changed");

    // Read-only: readable, verifiable, and every change fails.
    let job = Store::open_read_only(&root)
        .unwrap()
        .existing_job("j")
        .unwrap();
    let seq = *job.snapshot_seqs().unwrap().last().unwrap();
    SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    assert!(matches!(job.quarantine(seq), Err(Error::Io { .. })));
    assert!(matches!(job.remove_all_snapshots(), Err(Error::Io { .. })));
    job.collect_garbage().unwrap(); // nothing to collect: nothing to refuse
    assert_eq!(files(&root), before, "a read-only store was changed");

    // The store root itself owned by someone else.
    std::os::unix::fs::chown(&job_dir, Some(0), None).unwrap();
    std::os::unix::fs::chown(&root, Some(OTHER_UID), None).unwrap();
    let result = write_cycle(&root);
    assert!(
        matches!(&result, Err(Error::Unsafe { path, kind: UnsafeKind::ForeignOwner { uid: OTHER_UID, .. } }) if *path == root),
        "{result:?}"
    );
}

#[test]
fn a_store_or_job_directory_others_may_write_is_refused_and_0755_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    write_cycle(&root).unwrap();
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for (path, mode) in [
        (root.clone(), 0o777),
        (root.clone(), 0o770),
        (root.join("j"), 0o777),
        (root.join("j").join("packs"), 0o722),
    ] {
        set(&path, mode);
        let result = write_cycle(&root);
        assert!(
            matches!(&result, Err(Error::Unsafe { path: p, kind: UnsafeKind::OpenToOthers { mode: m } }) if *p == path && *m == mode),
            "{} {mode:o}: {result:?}",
            path.display()
        );
        set(&path, 0o700);
    }
    // Readable by others is not a danger to the store: an existing 0755 store keeps working.
    set(&root, 0o755);
    set(&root.join("j"), 0o755);
    write_cycle(&root).unwrap();
}

#[test]
fn a_lock_file_planted_as_a_link_or_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let job = Store::open(&root).unwrap().job("j").unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let lock = job.dir().join("lock");
    symlink(&victim, &lock).unwrap();

    let taken = JobLock::try_take(job.dir(), &Owner::this_process("test")).map(drop);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(
        matches!(&taken, Err(Error::Unsafe { path, kind: UnsafeKind::NotExpectedKind { found: "symbolic link" } }) if *path == lock),
        "{taken:?}"
    );
    let probed = JobLock::holder(job.dir());
    assert!(matches!(probed, Err(Error::Unsafe { .. })), "{probed:?}");

    // A regular lock file someone else owns (they could read our owner record or hold it).
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, b"").unwrap();
    std::os::unix::fs::chown(&lock, Some(OTHER_UID), None).unwrap();
    let taken = JobLock::try_take(job.dir(), &Owner::this_process("test")).map(drop);
    assert!(
        matches!(
            &taken,
            Err(Error::Unsafe {
                kind: UnsafeKind::ForeignOwner { uid: OTHER_UID, .. },
                ..
            })
        ),
        "{taken:?}"
    );
    assert_eq!(std::fs::metadata(&lock).unwrap().len(), 0);
    assert_eq!(std::fs::metadata(&lock).unwrap().uid(), OTHER_UID);
}

#[test]
fn an_oversized_manifest_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    write_cycle(&root).unwrap();
    let job = Store::open(&root).unwrap().job("j").unwrap();
    let seq = *job.snapshot_seqs().unwrap().last().unwrap();
    let path = job.manifest_path(seq);
    // Sparse: no disk space, but a plain read would allocate it all.
    let big = (1u64 << 30) + 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(big)
        .unwrap();
    let err = job.read_manifest(seq).unwrap_err();
    assert!(
        matches!(&err, Error::TooLarge { path: p, len, .. } if *p == path && *len == big),
        "{err:?}"
    );
}

#[test]
fn a_manifest_planted_as_a_link_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    write_cycle(&root).unwrap();
    let job = Store::open(&root).unwrap().job("j").unwrap();
    let seq = *job.snapshot_seqs().unwrap().last().unwrap();
    let path = job.manifest_path(seq);
    let real = dir.path().join("real.snap");
    std::fs::rename(&path, &real).unwrap();
    symlink(&real, &path).unwrap();
    let err = job.read_manifest(seq).map(drop);
    assert!(
        matches!(
            &err,
            Err(Error::Unsafe {
                kind: UnsafeKind::NotExpectedKind {
                    found: "symbolic link"
                },
                ..
            })
        ),
        "{err:?}"
    );
}
