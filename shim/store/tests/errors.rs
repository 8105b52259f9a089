//! How the store classifies its failures: only damage to stored data is corruption (which
//! sets a snapshot aside); a delta that does not fit its base, or a bug, is not.

use supervise_store::format::CHUNK_SIZE;
use supervise_store::{Error, SnapshotWriter, Store};

#[test]
fn a_delta_that_does_not_fit_its_base_is_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("j")
        .unwrap();
    let mut writer = SnapshotWriter::open(job, 0).unwrap();
    let grid = vec![1.5f64; 2 * CHUNK_SIZE / 8];
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    let seq = b.commit().unwrap().seq;

    let mut b = writer.begin(None);
    let base = b.manifest_of(seq).unwrap();
    let entry = base.entry("grid").unwrap();
    let cases: [(&[usize], &[u8]); 2] = [
        // A dirty chunk the base does not have.
        (&[9], &[0u8; 16]),
        // Bytes left over after the dirty chunks.
        (&[], &[0u8; 16]),
    ];
    for (dirty, data) in cases {
        let err = b.add_delta("grid", entry, dirty, data, 0).unwrap_err();
        assert!(matches!(err, Error::DeltaBase { .. }), "{err}");
        assert!(!err.is_corruption(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("\"j\"") && text.contains("\"grid\""),
            "{text}"
        );
    }
}
