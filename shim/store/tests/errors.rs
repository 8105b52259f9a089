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

#[test]
fn an_entry_given_in_parts_is_stored_exactly_and_bad_parts_are_refused() {
    use supervise_store::SnapshotReader;
    use supervise_store::format::EntryKind;
    let dir = tempfile::tempdir().unwrap();
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("j")
        .unwrap();
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    // Three and a half chunks, given in parts out of order; the short last chunk is one.
    let len = 3 * CHUNK_SIZE + CHUNK_SIZE / 2;
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let kind = EntryKind::Slice {
        elem: "u8".into(),
        elem_size: 1,
    };
    let chunk = |i: usize| &bytes[i * CHUNK_SIZE..((i + 1) * CHUNK_SIZE).min(len)];
    let mut b = writer.begin(None);
    let mut entry = b.begin_whole("e", kind.clone(), len as u64).unwrap();
    assert_eq!(entry.count(), 4);
    b.add_chunks(&mut entry, &[3], chunk(3), 0).unwrap();
    b.add_chunks(&mut entry, &[0, 1], &bytes[..2 * CHUNK_SIZE], 0)
        .unwrap();
    let bad: [(&[usize], &[u8]); 4] = [
        (&[1], chunk(1)),                    // given twice
        (&[2, 2], &bytes[..2 * CHUNK_SIZE]), // twice in one part
        (&[2], &bytes[..CHUNK_SIZE - 1]),    // too short
        (&[4], chunk(3)),                    // no such chunk
    ];
    for (chunks, data) in bad {
        let err = b.add_chunks(&mut entry, chunks, data, 0).unwrap_err();
        assert!(matches!(err, Error::DeltaBase { .. }), "{chunks:?}: {err}");
        assert!(err.to_string().contains("\"e\""), "{err}");
    }
    // A whole entry with a chunk never given is refused at its end.
    let mut short = b.begin_whole("f", kind.clone(), len as u64).unwrap();
    b.add_chunks(&mut short, &[0], chunk(0), 0).unwrap();
    let err = b.end_entry(short).unwrap_err();
    assert!(
        matches!(&err, Error::DeltaBase { entry, .. } if entry == "f"),
        "{err}"
    );
    // Read in place from the entry's whole bytes: those must be the entry's length.
    let err = b
        .add_chunks_in_place(&mut entry, &[2], &bytes[..len - 1], 0)
        .unwrap_err();
    assert!(matches!(err, Error::DeltaBase { .. }), "{err}");
    let err = b
        .add_chunks_in_place(&mut entry, &[1, 2], &bytes, 0)
        .unwrap_err();
    assert!(
        matches!(&err, Error::DeltaBase { entry, why, .. } if entry == "e" && why.contains("chunk 1")),
        "{err}"
    );
    b.add_chunks_in_place(&mut entry, &[2], &bytes, 0).unwrap();
    b.end_entry(entry).unwrap();
    let seq = b.commit().unwrap().seq;
    let mut out = vec![0u8; len];
    SnapshotReader::open(&job, seq)
        .unwrap()
        .slice_into("e", "u8", &mut out)
        .unwrap();
    assert_eq!(out, bytes);

    // A delta in parts: chunks 1 and 3 (the short one) new, read in place, the rest from
    // the base.
    let mut b = writer.begin(None);
    let base = b.manifest_of(seq).unwrap();
    let mut entry = b.begin_delta("e", base.entry("e").unwrap()).unwrap();
    let mut changed = bytes.clone();
    changed[CHUNK_SIZE..2 * CHUNK_SIZE].fill(9);
    changed[len - 1] = 1;
    b.add_chunks_in_place(&mut entry, &[1, 3], &changed, 8)
        .unwrap();
    b.end_entry(entry).unwrap();
    let report = b.commit().unwrap();
    assert_eq!(report.bytes_new, (CHUNK_SIZE + CHUNK_SIZE / 2) as u64);
    SnapshotReader::open(&job, report.seq)
        .unwrap()
        .slice_into("e", "u8", &mut out)
        .unwrap();
    assert_eq!(out, changed);
}
