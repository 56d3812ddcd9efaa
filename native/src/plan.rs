//! The extent planner: turns block status into ordered work units. Pure, no I/O.
//!
//! Rules it guarantees (each one has a reason in QEMU's snapshot-access behaviour, see
//! shared/DESIGN.md):
//! - no op leaves the dirty regions: a bitmap-restricted export fails such reads with EINVAL;
//! - ranges that `base:allocation` reports as zero become [`OpKind::Zero`] ops, never read;
//! - a unit spans whole clusters (the export end counts as a cluster boundary) and no two units
//!   share a cluster, so reads of different units never overlap after cluster alignment (QEMU
//!   without the reqlist patch aborts when they do). Ops of one unit run one after another;
//! - a unit holding reads spans at most `max_request` rounded down to clusters (at least one
//!   cluster) and each read is at most `max_request`; a unit of zeros only may span up to
//!   [`ZERO_UNIT_SPAN`], since it costs no read;
//! - each unit's discard ranges are what it takes, aligned inward to the cluster size, the
//!   export end excepted (the last partial cluster may be discarded).

use crate::error::{Error, Result};
use crate::source::{Extent, FLAG_DIRTY, FLAG_ZERO};

/// Default copy-before-write cluster size: QEMU's filter uses at least 64 KiB.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// Default largest read.
pub const DEFAULT_MAX_REQUEST: u32 = 4 * 1024 * 1024;
/// Largest span of a unit that holds only zeros (rounded down to clusters, at least one).
pub const ZERO_UNIT_SPAN: u64 = 1024 * 1024 * 1024;

/// A byte range `[offset, offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read the range from the source and hand it to the sink.
    Read,
    /// The range reads as zeros: tell the sink without reading.
    Zero,
}

/// One step of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub offset: u64,
    pub length: u64,
}

impl Op {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A cluster-aligned span of the export, handled by one task: its ops run in order, its
/// discard ranges are trimmed once the sink has taken all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Start of the span; a multiple of the cluster size.
    pub offset: u64,
    /// Length of the span; ends on a cluster boundary or at the export end.
    pub length: u64,
    /// Ascending, non-overlapping ops inside the span.
    pub ops: Vec<Op>,
    /// Ascending ranges to TRIM after the sink took the unit.
    pub discard: Vec<Region>,
}

impl Unit {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn read_bytes(&self) -> u64 {
        self.ops
            .iter()
            .filter(|o| o.kind == OpKind::Read)
            .map(|o| o.length)
            .sum()
    }

    pub fn zero_bytes(&self) -> u64 {
        self.ops
            .iter()
            .filter(|o| o.kind == OpKind::Zero)
            .map(|o| o.length)
            .sum()
    }
}

/// Sizes the planner works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Copy-before-write cluster size (> 0).
    pub cluster_size: u64,
    /// Largest read (> 0), already clamped to the server's maximum.
    pub max_request: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            cluster_size: DEFAULT_CLUSTER_SIZE,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// The ordered work of one copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub size: u64,
    pub units: Vec<Unit>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes handed to the sink as zeros without reading.
    pub bytes_zero: u64,
    /// Bytes not copied at all (clean in the bitmap).
    pub bytes_skipped: u64,
    /// Maximal runs of data or of zeros inside the copied area.
    pub extents: u64,
}

/// Regions whose extents have any of `flag` set, clipped to `[0, size)`, sorted and merged.
pub fn regions_with_flag(extents: &[Extent], size: u64, flag: u64) -> Vec<Region> {
    let ranges = extents
        .iter()
        .filter(|e| e.flags & flag != 0)
        .map(|e| Region {
            offset: e.offset,
            length: e.length,
        });
    normalize(ranges, size)
}

/// Dirty regions of a `qemu:dirty-bitmap:NAME` block status (flag bit 0 = dirty).
pub fn dirty_regions(extents: &[Extent], size: u64) -> Vec<Region> {
    regions_with_flag(extents, size, FLAG_DIRTY)
}

/// Regions a `base:allocation` block status reports as reading zeros (flag bit 1).
pub fn zero_regions(extents: &[Extent], size: u64) -> Vec<Region> {
    regions_with_flag(extents, size, FLAG_ZERO)
}

/// Clip to `[0, size)`, drop empty ranges, sort, merge overlapping or touching ranges.
fn normalize(ranges: impl IntoIterator<Item = Region>, size: u64) -> Vec<Region> {
    let mut v: Vec<Region> = ranges
        .into_iter()
        .filter_map(|r| {
            let start = r.offset.min(size);
            let end = r.offset.saturating_add(r.length).min(size);
            (end > start).then(|| Region {
                offset: start,
                length: end - start,
            })
        })
        .collect();
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<Region> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.length = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

fn align_down(x: u64, c: u64) -> u64 {
    x - x % c
}

fn align_up(x: u64, c: u64) -> u64 {
    match x % c {
        0 => x,
        r => x.saturating_add(c - r),
    }
}

/// Plan the copy of an export of `size` bytes.
///
/// `dirty` lists the regions to copy (`None` = the whole export); `zero` lists regions known to
/// read as zeros (may be empty, may extend outside `dirty`). Both are normalized here.
pub fn plan(
    size: u64,
    dirty: Option<&[Region]>,
    zero: &[Region],
    options: &PlanOptions,
) -> Result<Plan> {
    if options.cluster_size == 0 {
        return Err(Error::invalid_argument("cluster size must be positive"));
    }
    if options.max_request == 0 {
        return Err(Error::invalid_argument(
            "maximum request size must be positive",
        ));
    }
    let wanted = match dirty {
        Some(d) => normalize(d.iter().copied(), size),
        None if size > 0 => vec![Region {
            offset: 0,
            length: size,
        }],
        None => Vec::new(),
    };
    let zero = normalize(zero.iter().copied(), size);
    let pieces = split_by_zero(&wanted, &zero);

    let c = options.cluster_size;
    let max_request = u64::from(options.max_request);
    let mut builder = Builder {
        c,
        size,
        max_request,
        read_span: align_down(max_request, c).max(c),
        zero_span: align_down(ZERO_UNIT_SPAN, c).max(c),
        units: Vec::new(),
        cur: None,
    };
    for p in &pieces {
        builder.add(p.kind, p.offset, p.end());
    }
    builder.close();

    let bytes_read: u64 = builder.units.iter().map(Unit::read_bytes).sum();
    let bytes_zero: u64 = builder.units.iter().map(Unit::zero_bytes).sum();
    Ok(Plan {
        size,
        units: builder.units,
        bytes_read,
        bytes_zero,
        bytes_skipped: size - bytes_read - bytes_zero,
        extents: pieces.len() as u64,
    })
}

/// Cut the wanted regions into maximal runs of data (Read) and zeros (Zero).
fn split_by_zero(wanted: &[Region], zero: &[Region]) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    let mut push = |kind: OpKind, start: u64, end: u64| {
        if end <= start {
            return;
        }
        match out.last_mut() {
            Some(last) if last.kind == kind && last.end() == start => {
                last.length = end - last.offset
            }
            _ => out.push(Op {
                kind,
                offset: start,
                length: end - start,
            }),
        }
    };
    let mut z = 0;
    for w in wanted {
        let mut pos = w.offset;
        // Zero regions are sorted and disjoint: skip those ending before this region.
        while z < zero.len() && zero[z].end() <= pos {
            z += 1;
        }
        let mut i = z;
        while pos < w.end() {
            match zero.get(i) {
                Some(zr) if zr.offset < w.end() => {
                    push(OpKind::Read, pos, zr.offset.max(pos));
                    let zend = zr.end().min(w.end());
                    push(OpKind::Zero, zr.offset.max(pos), zend);
                    pos = zend;
                    if zr.end() <= w.end() {
                        i += 1;
                    }
                }
                _ => {
                    push(OpKind::Read, pos, w.end());
                    pos = w.end();
                }
            }
        }
        z = i;
    }
    out
}

/// The unit being filled.
struct Current {
    start: u64,
    ops: Vec<Op>,
    has_read: bool,
}

impl Current {
    fn end(&self) -> u64 {
        self.ops.last().map_or(self.start, Op::end)
    }

    /// Move everything at or after `at` (a cluster boundary) into a new unit.
    fn split_off(&mut self, at: u64) -> Current {
        let mut tail = Vec::new();
        let mut keep = Vec::new();
        for op in self.ops.drain(..) {
            if op.end() <= at {
                keep.push(op);
            } else if op.offset >= at {
                tail.push(op);
            } else {
                keep.push(Op {
                    kind: op.kind,
                    offset: op.offset,
                    length: at - op.offset,
                });
                tail.push(Op {
                    kind: op.kind,
                    offset: at,
                    length: op.end() - at,
                });
            }
        }
        self.ops = keep;
        self.has_read = self.ops.iter().any(|o| o.kind == OpKind::Read);
        let has_read = tail.iter().any(|o| o.kind == OpKind::Read);
        Current {
            start: at,
            ops: tail,
            has_read,
        }
    }
}

struct Builder {
    c: u64,
    size: u64,
    max_request: u64,
    read_span: u64,
    zero_span: u64,
    units: Vec<Unit>,
    cur: Option<Current>,
}

impl Builder {
    /// Add the piece `[pos, end)` of one kind, cutting it into units.
    fn add(&mut self, kind: OpKind, mut pos: u64, end: u64) {
        let c = self.c;
        let is_read = kind == OpKind::Read;
        let (read_span, zero_span) = (self.read_span, self.zero_span);
        let span_limit = |has_read: bool| if has_read { read_span } else { zero_span };
        while pos < end {
            let take_end = match self.cur.as_mut() {
                // The piece starts in the current unit's last cluster: it must join that unit.
                Some(cur) if pos < align_up(cur.end(), c) => {
                    let cur_end_aligned = align_up(cur.end(), c);
                    if is_read && !cur.has_read && cur_end_aligned - cur.start > read_span {
                        // A long zero-only unit would now hold a read: hand its last cluster
                        // to a new unit instead, so that the read unit stays within read_span.
                        let tail = cur.split_off(align_down(pos, c));
                        self.finish_current();
                        self.cur = Some(tail);
                        continue;
                    }
                    let limit = cur.start + span_limit(cur.has_read || is_read);
                    end.min(cur_end_aligned.max(limit))
                }
                // The piece starts in the cluster right after the unit and the unit has room.
                Some(cur)
                    if align_down(pos, c) == align_up(cur.end(), c)
                        && align_down(pos, c) < cur.start + span_limit(cur.has_read || is_read) =>
                {
                    end.min(cur.start + span_limit(cur.has_read || is_read))
                }
                _ => {
                    self.finish_current();
                    let start = align_down(pos, c);
                    self.cur = Some(Current {
                        start,
                        ops: Vec::new(),
                        has_read: false,
                    });
                    end.min(start + span_limit(is_read))
                }
            };
            if let Some(cur) = self.cur.as_mut() {
                cur.ops.push(Op {
                    kind,
                    offset: pos,
                    length: take_end - pos,
                });
                cur.has_read |= is_read;
            }
            pos = take_end;
        }
    }

    fn close(&mut self) {
        self.finish_current();
    }

    fn finish_current(&mut self) {
        let Some(cur) = self.cur.take() else { return };
        if cur.ops.is_empty() {
            return;
        }
        let c = self.c;
        // Merge touching ops of one kind, then cut reads to the request size.
        let mut merged: Vec<Op> = Vec::with_capacity(cur.ops.len());
        for op in cur.ops {
            match merged.last_mut() {
                Some(last) if last.kind == op.kind && last.end() == op.offset => {
                    last.length += op.length
                }
                _ => merged.push(op),
            }
        }
        let mut ops = Vec::with_capacity(merged.len());
        for op in merged {
            if op.kind == OpKind::Read && op.length > self.max_request {
                let mut off = op.offset;
                while off < op.end() {
                    let len = (op.end() - off).min(self.max_request);
                    ops.push(Op {
                        kind: op.kind,
                        offset: off,
                        length: len,
                    });
                    off += len;
                }
            } else {
                ops.push(op);
            }
        }
        // Discard: each maximal run of taken ops, aligned inward; the export end is aligned.
        let mut discard = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            let run_start = ops[i].offset;
            let mut run_end = ops[i].end();
            while i + 1 < ops.len() && ops[i + 1].offset == run_end {
                i += 1;
                run_end = ops[i].end();
            }
            i += 1;
            let d_start = align_up(run_start, c);
            let d_end = if run_end == self.size {
                run_end
            } else {
                align_down(run_end, c)
            };
            if d_end > d_start {
                discard.push(Region {
                    offset: d_start,
                    length: d_end - d_start,
                });
            }
        }
        let span_end = align_up(ops.last().map_or(cur.start, Op::end), c).min(self.size);
        self.units.push(Unit {
            offset: cur.start,
            length: span_end - cur.start,
            ops,
            discard,
        });
    }
}

#[cfg(test)]
#[allow(clippy::identity_op)] // `1 * M` reads better next to `3 * M`
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = 1024 * 1024;

    fn r(offset: u64, length: u64) -> Region {
        Region { offset, length }
    }

    fn opts(cluster_size: u64, max_request: u64) -> PlanOptions {
        PlanOptions {
            cluster_size,
            max_request: max_request as u32,
        }
    }

    fn rd(offset: u64, length: u64) -> Op {
        Op {
            kind: OpKind::Read,
            offset,
            length,
        }
    }

    fn zr(offset: u64, length: u64) -> Op {
        Op {
            kind: OpKind::Zero,
            offset,
            length,
        }
    }

    /// Every invariant the engine and QEMU rely on, checked on any plan.
    fn check(p: &Plan, dirty: Option<&[Region]>, zero: &[Region], o: &PlanOptions) {
        let c = o.cluster_size;
        let mr = u64::from(o.max_request);
        let read_span = align_down(mr, c).max(c);
        let wanted = match dirty {
            Some(d) => normalize(d.iter().copied(), p.size),
            None => normalize([r(0, p.size)], p.size),
        };
        let zero = normalize(zero.iter().copied(), p.size);
        let mut all_ops: Vec<Op> = Vec::new();
        let mut prev_end = 0;
        for u in &p.units {
            assert_eq!(u.offset % c, 0, "span start aligned: {u:?}");
            assert!(
                u.end() % c == 0 || u.end() == p.size,
                "span end aligned: {u:?}"
            );
            assert!(u.end() <= p.size);
            // Spans ascend and never share a cluster.
            assert!(
                u.offset >= align_up(prev_end, c),
                "units share a cluster: {u:?}"
            );
            prev_end = u.end();
            assert!(!u.ops.is_empty());
            if u.read_bytes() > 0 {
                assert!(u.length <= read_span, "read unit too long: {u:?}");
            }
            for op in &u.ops {
                assert!(op.length > 0);
                assert!(
                    op.offset >= u.offset && op.end() <= u.end(),
                    "op outside span: {u:?}"
                );
                if op.kind == OpKind::Read {
                    assert!(op.length <= mr, "read too long: {op:?}");
                }
                // Zero ops lie in zero regions, reads outside them.
                let in_zero = zero
                    .iter()
                    .any(|z| z.offset <= op.offset && op.end() <= z.end());
                let touches_zero = zero
                    .iter()
                    .any(|z| z.offset < op.end() && op.offset < z.end());
                match op.kind {
                    OpKind::Zero => assert!(in_zero, "zero op outside zero region: {op:?}"),
                    OpKind::Read => assert!(!touches_zero, "read of a zero region: {op:?}"),
                }
            }
            for d in &u.discard {
                assert_eq!(d.offset % c, 0);
                assert!(d.end() % c == 0 || d.end() == p.size);
                assert!(d.offset >= u.offset && d.end() <= u.end());
            }
            all_ops.extend(u.ops.iter().copied());
        }
        // Ops cover exactly the wanted regions, in order.
        let covered = normalize(all_ops.iter().map(|o| r(o.offset, o.length)), p.size);
        assert_eq!(covered, wanted, "ops must cover exactly the dirty regions");
        for w in all_ops.windows(2) {
            assert!(w[0].end() <= w[1].offset, "ops overlap or are out of order");
        }
        // Discards are exactly the taken runs aligned inward.
        let discards = normalize(
            p.units.iter().flat_map(|u| u.discard.iter().copied()),
            p.size,
        );
        let expected: Vec<Region> = normalize(
            covered.iter().filter_map(|t| {
                let s = align_up(t.offset, c);
                let e = if t.end() == p.size {
                    t.end()
                } else {
                    align_down(t.end(), c)
                };
                (e > s).then(|| r(s, e - s))
            }),
            p.size,
        );
        assert_eq!(
            discards, expected,
            "discard must be the taken ranges aligned inward"
        );
        let read: u64 = all_ops
            .iter()
            .filter(|o| o.kind == OpKind::Read)
            .map(|o| o.length)
            .sum();
        let zeroed: u64 = all_ops
            .iter()
            .filter(|o| o.kind == OpKind::Zero)
            .map(|o| o.length)
            .sum();
        assert_eq!(p.bytes_read, read);
        assert_eq!(p.bytes_zero, zeroed);
        assert_eq!(p.bytes_read + p.bytes_zero + p.bytes_skipped, p.size);
    }

    fn planned(size: u64, dirty: Option<&[Region]>, zero: &[Region], o: PlanOptions) -> Plan {
        let p = plan(size, dirty, zero, &o).expect("plan");
        check(&p, dirty, zero, &o);
        p
    }

    #[test]
    fn full_disk_is_cut_into_max_request_units() {
        let p = planned(10 * M, None, &[], opts(64 * K, 4 * M));
        let spans: Vec<_> = p.units.iter().map(|u| (u.offset, u.length)).collect();
        assert_eq!(spans, vec![(0, 4 * M), (4 * M, 4 * M), (8 * M, 2 * M)]);
        assert_eq!(p.units[0].ops, vec![rd(0, 4 * M)]);
        assert_eq!(p.units[2].discard, vec![r(8 * M, 2 * M)]);
        assert_eq!(
            (p.bytes_read, p.bytes_zero, p.bytes_skipped, p.extents),
            (10 * M, 0, 0, 1)
        );
    }

    #[test]
    fn size_not_multiple_of_512_or_cluster_ends_at_export_end_and_discards_it() {
        let size = 4 * M + 64 * K + 1001;
        let p = planned(size, None, &[], opts(64 * K, 4 * M));
        let last = p.units.last().expect("units");
        assert_eq!(last.end(), size);
        assert_eq!(last.ops, vec![rd(4 * M, 64 * K + 1001)]);
        // The partial last cluster is discarded: the export end counts as aligned.
        assert_eq!(last.discard, vec![r(4 * M, 64 * K + 1001)]);
    }

    #[test]
    fn tiny_export_smaller_than_a_cluster() {
        let p = planned(1000, None, &[], opts(64 * K, 4 * M));
        assert_eq!(p.units.len(), 1);
        assert_eq!(p.units[0].ops, vec![rd(0, 1000)]);
        assert_eq!(p.units[0].discard, vec![r(0, 1000)]);
    }

    #[test]
    fn empty_export_has_no_units() {
        let p = planned(0, None, &[], opts(64 * K, 4 * M));
        assert!(p.units.is_empty());
        let p = planned(0, Some(&[]), &[], opts(64 * K, 4 * M));
        assert!(p.units.is_empty());
    }

    #[test]
    fn clean_export_skips_everything() {
        let p = planned(8 * M, Some(&[]), &[], opts(64 * K, 4 * M));
        assert!(p.units.is_empty());
        assert_eq!(p.bytes_skipped, 8 * M);
    }

    #[test]
    fn granularity_smaller_than_cluster_keeps_runs_of_one_cluster_in_one_unit() {
        // Bitmap granularity 4 KiB, cluster 64 KiB: two dirty runs inside cluster 0, one in
        // cluster 2. Cluster 0's runs must be one unit (their reads would overlap after
        // alignment), and nothing is discarded since no whole cluster was taken.
        let dirty = [r(4 * K, 4 * K), r(20 * K, 8 * K), r(128 * K + 4 * K, 4 * K)];
        let p = planned(1 * M, Some(&dirty), &[], opts(64 * K, 4 * M));
        assert_eq!(p.units.len(), 2);
        assert_eq!(p.units[0].offset, 0);
        assert_eq!(p.units[0].length, 64 * K);
        assert_eq!(p.units[0].ops, vec![rd(4 * K, 4 * K), rd(20 * K, 8 * K)]);
        assert!(p.units[0].discard.is_empty());
        assert_eq!(p.units[1].offset, 128 * K);
        assert_eq!(p.units[1].ops, vec![rd(132 * K, 4 * K)]);
        assert_eq!(p.extents, 3);
        assert_eq!(p.bytes_skipped, 1 * M - 16 * K);
    }

    #[test]
    fn dirty_run_crossing_cluster_discards_only_whole_clusters() {
        let dirty = [r(60 * K, 200 * K)]; // 60K..260K: whole clusters 64K..256K
        let p = planned(1 * M, Some(&dirty), &[], opts(64 * K, 4 * M));
        assert_eq!(p.units.len(), 1);
        assert_eq!(p.units[0].offset, 0);
        assert_eq!(p.units[0].length, 320 * K);
        assert_eq!(p.units[0].discard, vec![r(64 * K, 192 * K)]);
    }

    #[test]
    fn allocation_zeros_become_zero_ops() {
        let zero = [r(1 * M, 2 * M)];
        let p = planned(4 * M, None, &zero, opts(64 * K, 4 * M));
        let ops: Vec<Op> = p.units.iter().flat_map(|u| u.ops.clone()).collect();
        assert_eq!(ops, vec![rd(0, 1 * M), zr(1 * M, 2 * M), rd(3 * M, 1 * M)]);
        assert_eq!((p.bytes_read, p.bytes_zero, p.extents), (2 * M, 2 * M, 3));
    }

    #[test]
    fn zero_regions_outside_dirty_are_ignored() {
        let dirty = [r(0, 128 * K)];
        let zero = [r(64 * K, 1 * M)];
        let p = planned(2 * M, Some(&dirty), &zero, opts(64 * K, 4 * M));
        let ops: Vec<Op> = p.units.iter().flat_map(|u| u.ops.clone()).collect();
        assert_eq!(ops, vec![rd(0, 64 * K), zr(64 * K, 64 * K)]);
    }

    #[test]
    fn long_zero_runs_make_large_units_and_split_before_a_shared_read() {
        // 3 GiB zeros ending mid-cluster, then data sharing that cluster.
        let size = 4 * 1024 * M;
        let zend = 3 * 1024 * M + 1000;
        let zero = [r(0, zend)];
        let p = planned(size, None, &zero, opts(64 * K, 4 * M));
        assert_eq!(p.units[0].length, ZERO_UNIT_SPAN);
        assert_eq!(p.units[0].ops, vec![zr(0, ZERO_UNIT_SPAN)]);
        // The cluster holding both the zero tail and the first data is a small read unit.
        let shared = p
            .units
            .iter()
            .find(|u| u.offset == 3 * 1024 * M)
            .expect("shared unit");
        assert_eq!(shared.ops[0], zr(3 * 1024 * M, 1000));
        assert_eq!(shared.ops[1].kind, OpKind::Read);
        assert!(shared.length <= 4 * M);
    }

    #[test]
    fn cluster_larger_than_max_request_splits_reads_within_one_unit() {
        let p = planned(3 * M, None, &[], opts(2 * M, 512 * K));
        assert_eq!(p.units.len(), 2);
        assert_eq!(p.units[0].length, 2 * M);
        assert_eq!(p.units[0].ops.len(), 4);
        assert_eq!(p.units[1].length, 1 * M);
        assert_eq!(p.units[1].ops.len(), 2);
    }

    #[test]
    fn max_request_not_multiple_of_cluster_rounds_span_down() {
        let p = planned(4 * M, None, &[], opts(1 * M, 1536 * K));
        assert!(p.units.iter().all(|u| u.length == 1 * M));
    }

    #[test]
    fn unsorted_overlapping_input_is_normalized() {
        let dirty = [
            r(256 * K, 64 * K),
            r(0, 64 * K),
            r(32 * K, 64 * K),
            r(300 * K, 10 * M),
        ];
        let p = planned(1 * M, Some(&dirty), &[], opts(64 * K, 4 * M));
        let covered = normalize(
            p.units
                .iter()
                .flat_map(|u| u.ops.iter().map(|o| r(o.offset, o.length))),
            p.size,
        );
        assert_eq!(covered, vec![r(0, 96 * K), r(256 * K, 768 * K)]);
    }

    #[test]
    fn extents_are_filtered_by_flag_and_clipped() {
        let ext = [
            Extent {
                offset: 0,
                length: 4096,
                flags: 1,
            },
            Extent {
                offset: 4096,
                length: 4096,
                flags: 0,
            },
            Extent {
                offset: 8192,
                length: 4096,
                flags: 1,
            },
            Extent {
                offset: 12288,
                length: 4096,
                flags: 1,
            },
            Extent {
                offset: 16384,
                length: 1 << 40,
                flags: 3,
            },
        ];
        assert_eq!(
            dirty_regions(&ext, 20000),
            vec![r(0, 4096), r(8192, 20000 - 8192)]
        );
        assert_eq!(zero_regions(&ext, 20000), vec![r(16384, 20000 - 16384)]);
    }

    #[test]
    fn invalid_sizes_are_refused() {
        assert!(plan(10, None, &[], &opts(0, 4096)).is_err());
        assert!(plan(
            10,
            None,
            &[],
            &PlanOptions {
                cluster_size: 4096,
                max_request: 0
            }
        )
        .is_err());
    }

    /// Tiny deterministic generator so that the randomized test needs no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound.max(1)
        }
    }

    #[test]
    fn randomized_inputs_keep_every_invariant() {
        let mut g = Lcg(42);
        for _ in 0..2000 {
            let c = [512, 4096, 64 * K, 192 * K, 1 * M][g.next(5) as usize];
            let mr = [4096, 64 * K, 100_000, 1 * M, 4 * M][g.next(5) as usize];
            let size = g.next(8 * M) + 1;
            let gran = [1, 512, 4096, 64 * K][g.next(4) as usize];
            let mut dirty = Vec::new();
            let mut zero = Vec::new();
            for _ in 0..g.next(12) {
                dirty.push(r(
                    g.next(size) / gran * gran,
                    (g.next(4) + 1) * gran * (g.next(20) + 1),
                ));
            }
            for _ in 0..g.next(6) {
                zero.push(r(g.next(size), g.next(2 * M) + 1));
            }
            let d = if g.next(4) == 0 {
                None
            } else {
                Some(&dirty[..])
            };
            planned(size, d, &zero, opts(c, mr));
        }
    }
}
