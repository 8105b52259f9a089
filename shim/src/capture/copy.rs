//! Copying at the safe point, the program's whole pause: the values and slices the program's
//! closure adds, and every registered region, whole or only its chunks written since its base.

use std::collections::HashSet;
use std::time::Instant;

use supervise_store::error::Result;
use supervise_store::format::CHUNK_SIZE;

use super::{Buffer, Capture, CaptureTask, Item, OutputsAt, empty_buffer, reserve_capture};
use crate::region::RegionMem;
use crate::runtime::Shim;

impl Shim {
    /// Copies what the snapshot needs; the program is paused for exactly this.
    pub(crate) fn capture<F>(
        &mut self,
        tag: Option<&str>,
        fill: F,
        started: Instant,
        outputs: OutputsAt,
    ) -> Result<CaptureTask>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        self.regions.retain(|slot| slot.mem.strong_count() > 0);
        let mut names: HashSet<String> = self
            .regions
            .iter()
            .filter_map(|slot| slot.mem.upgrade().map(|m| m.name.clone()))
            .collect();
        let mut items = Vec::new();
        let mut arrays = Vec::new();
        fill(&mut Capture {
            items: &mut items,
            buffers: &mut self.buffers,
            names: &mut names,
            arrays: &mut arrays,
        })?;
        self.in_flight_regions.clear();
        for idx in 0..self.regions.len() {
            if let Some(mem) = self.regions[idx].mem.upgrade() {
                items.push(self.capture_region(idx, &mem));
                arrays.extend(mem.array_shape());
                self.in_flight_regions.push(idx);
            }
        }
        Ok(CaptureTask {
            tag: tag.map(str::to_owned),
            items,
            started,
            origin: self.config.origin.clone(),
            outputs,
            seq: self.part_seq,
            arrays,
        })
    }

    /// Captures one region: its written chunks when they are tracked and a base exists,
    /// else all of it.
    fn capture_region(&mut self, idx: usize, mem: &RegionMem) -> Item {
        let delta = self.collect_dirty(idx, mem);
        // The largest spare buffer: a whole copy needs all of it.
        self.buffers.sort_by_key(Buffer::capacity);
        let mut data = self.buffers.pop().unwrap_or_else(empty_buffer);
        match delta {
            Some((base, dirty)) => {
                reserve_capture(&mut data, dirty.len() * CHUNK_SIZE);
                append_chunks(&mut data, mem.bytes(), &dirty);
                Item::Delta {
                    name: mem.name.clone(),
                    base,
                    dirty,
                    data,
                    shuffle: mem.shuffle,
                }
            }
            None => {
                reserve_capture(&mut data, mem.bytes);
                data.extend_from_slice(mem.bytes());
                Item::Whole {
                    name: mem.name.clone(),
                    kind: mem.kind.clone(),
                    data,
                    shuffle: mem.shuffle,
                }
            }
        }
    }
}

/// Appends the 64 KiB chunks numbered in `dirty` of `bytes` to `out`.
fn append_chunks(out: &mut Buffer, bytes: &[u8], dirty: &[usize]) {
    for &chunk in dirty {
        out.extend_from_slice(
            &bytes[chunk * CHUNK_SIZE..((chunk + 1) * CHUNK_SIZE).min(bytes.len())],
        );
    }
}

/// The chunks numbered in `dirty` of `bytes`, one after another.
pub(super) fn copy_chunks(bytes: &[u8], dirty: &[usize]) -> Buffer {
    let mut out = empty_buffer();
    reserve_capture(&mut out, dirty.len() * CHUNK_SIZE);
    append_chunks(&mut out, bytes, dirty);
    out
}
