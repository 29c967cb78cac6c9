//! Placement: which IOM holds which block, computed from (object, block) alone.
//!
//! Parity rotates across groups (RAID-5 style) and the rotation is offset per
//! object by a hash of its id, so a sequential write touches all W IOMs
//! evenly and small files do not all land on the same IOM. Data block `j` of
//! a group sits on the `j+1`-th IOM after the group's parity IOM, so every
//! group uses W distinct IOMs.

use crate::ids::{BlockKey, BlockNo, GroupKey, GroupNo, IomId, ObjectId};
use serde::{Deserialize, Serialize};

/// Striping geometry of a cluster: W = N + 1 IOMs, blocks of B bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    width: u32,
    block_size: u32,
}

/// One piece of a byte range that falls inside a single block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub block: BlockNo,
    /// Offset inside the block.
    pub offset: u32,
    pub len: u32,
    /// Offset of this piece inside the caller's buffer.
    pub buf_offset: usize,
}

/// The smallest and largest supported cluster widths and block sizes.
pub const MIN_WIDTH: u32 = 3;
pub const MAX_WIDTH: u32 = 64;
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 4 << 20;

impl Layout {
    /// A layout; `None` when W or B is outside the supported range or B is
    /// not a power of two.
    pub fn new(width: u32, block_size: u32) -> Option<Layout> {
        if !(MIN_WIDTH..=MAX_WIDTH).contains(&width)
            || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size)
            || !block_size.is_power_of_two()
        {
            return None;
        }
        Some(Layout { width, block_size })
    }

    pub fn width(&self) -> u32 {
        self.width
    }
    /// N: data blocks per parity group.
    pub fn n(&self) -> u32 {
        self.width - 1
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn group_bytes(&self) -> u64 {
        self.block_size as u64 * self.n() as u64
    }

    pub fn group_of(&self, b: BlockNo) -> GroupNo {
        GroupNo(b.0 / self.n() as u64)
    }
    /// Position of block `b` inside its group, 0..N.
    pub fn index_in_group(&self, b: BlockNo) -> u32 {
        (b.0 % self.n() as u64) as u32
    }
    /// Block number of member `index` of group `g`.
    pub fn member_block(&self, g: GroupNo, index: u32) -> BlockNo {
        BlockNo(g.0 * self.n() as u64 + index as u64)
    }
    pub fn group_key(&self, k: BlockKey) -> GroupKey {
        GroupKey { object: k.object, group: self.group_of(k.block) }
    }

    fn rotation(&self, o: ObjectId) -> u64 {
        mix64(o.0) % self.width as u64
    }

    /// The IOM holding the parity block of group `g` of object `o`.
    pub fn parity_iom(&self, o: ObjectId, g: GroupNo) -> IomId {
        let w = self.width as u64;
        IomId(((g.0 % w + self.rotation(o)) % w) as u32)
    }

    /// The IOM holding data block `b` of object `o`.
    pub fn data_iom(&self, o: ObjectId, b: BlockNo) -> IomId {
        let p = self.parity_iom(o, self.group_of(b)).0;
        IomId((p + 1 + self.index_in_group(b)) % self.width)
    }

    /// Data IOMs of a group in member order, then the parity IOM.
    pub fn group_ioms(&self, o: ObjectId, g: GroupNo) -> (Vec<IomId>, IomId) {
        let p = self.parity_iom(o, g);
        let data = (0..self.n()).map(|j| IomId((p.0 + 1 + j) % self.width)).collect();
        (data, p)
    }

    /// Splits the byte range `[offset, offset+len)` into per-block pieces.
    pub fn split(&self, offset: u64, len: usize) -> Vec<Piece> {
        let bs = self.block_size as u64;
        let mut out = Vec::with_capacity(len / self.block_size as usize + 2);
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let take = (bs - in_block).min(end - pos);
            out.push(Piece {
                block: BlockNo(block),
                offset: in_block as u32,
                len: take as u32,
                buf_offset: (pos - offset) as usize,
            });
            pos += take;
        }
        out
    }

    /// Number of blocks needed to hold `size` bytes.
    pub fn blocks_for(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size as u64)
    }
}

/// splitmix64 finaliser: a cheap, well-spread hash of an object id.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `dst ^= src` over `src.len()` bytes.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    let n = src.len().min(dst.len());
    let (d8, s8) = (&mut dst[..n], &src[..n]);
    let mut dc = d8.chunks_exact_mut(8);
    let mut sc = s8.chunks_exact(8);
    for (d, s) in (&mut dc).zip(&mut sc) {
        let x = u64::from_ne_bytes(d.try_into().expect("8")) ^ u64::from_ne_bytes(s.try_into().expect("8"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for (d, s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *d ^= *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(Layout::new(2, 65536).is_none());
        assert!(Layout::new(5, 65535).is_none());
        assert!(Layout::new(5, 1024).is_none());
        assert!(Layout::new(5, 65536).is_some());
    }

    #[test]
    fn split_covers_range() {
        let l = Layout::new(5, 4096).unwrap();
        let p = l.split(4000, 5000);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], Piece { block: BlockNo(0), offset: 4000, len: 96, buf_offset: 0 });
        assert_eq!(p[1], Piece { block: BlockNo(1), offset: 0, len: 4096, buf_offset: 96 });
        assert_eq!(p[2], Piece { block: BlockNo(2), offset: 0, len: 808, buf_offset: 4192 });
        assert!(l.split(10, 0).is_empty());
    }

    proptest! {
        /// Every group uses W distinct IOMs, and data_iom agrees with group_ioms.
        #[test]
        fn groups_use_distinct_ioms(w in 3u32..17, o in any::<u64>(), g in 0u64..1_000_000) {
            let l = Layout::new(w, 65536).unwrap();
            let (data, p) = l.group_ioms(ObjectId(o), GroupNo(g));
            let mut all: Vec<u32> = data.iter().map(|i| i.0).collect();
            all.push(p.0);
            all.sort_unstable();
            all.dedup();
            prop_assert_eq!(all.len(), w as usize);
            prop_assert!(all.iter().all(|&i| i < w));
            for (j, d) in data.iter().enumerate() {
                let b = l.member_block(GroupNo(g), j as u32);
                prop_assert_eq!(l.data_iom(ObjectId(o), b), *d);
                prop_assert_eq!(l.group_of(b), GroupNo(g));
                prop_assert_eq!(l.index_in_group(b), j as u32);
            }
        }

        /// A long file spreads data and parity evenly: over W*k groups every
        /// IOM holds exactly k parity blocks and k*N data blocks.
        #[test]
        fn long_file_is_even(w in 3u32..17, o in any::<u64>(), k in 1u64..20, start in 0u64..1000) {
            let l = Layout::new(w, 65536).unwrap();
            let mut data = vec![0u64; w as usize];
            let mut parity = vec![0u64; w as usize];
            let first = start * w as u64;
            for g in first..first + k * w as u64 {
                parity[l.parity_iom(ObjectId(o), GroupNo(g)).0 as usize] += 1;
                for j in 0..l.n() {
                    data[l.data_iom(ObjectId(o), l.member_block(GroupNo(g), j)).0 as usize] += 1;
                }
            }
            prop_assert!(parity.iter().all(|&c| c == k));
            prop_assert!(data.iter().all(|&c| c == k * l.n() as u64));
        }

        /// Many small files (block 0 only) spread over all IOMs: none gets
        /// more than twice its fair share.
        #[test]
        fn small_files_spread(w in 3u32..9, base in any::<u32>()) {
            let l = Layout::new(w, 65536).unwrap();
            let mut count = vec![0u32; w as usize];
            let files = 2000u64;
            for o in 0..files {
                count[l.data_iom(ObjectId(base as u64 + o), BlockNo(0)).0 as usize] += 1;
            }
            let fair = files as u32 / w;
            prop_assert!(count.iter().all(|&c| c < 2 * fair && c > fair / 2), "{:?}", count);
        }

        #[test]
        fn split_is_exact(off in 0u64..(1u64 << 40), len in 0usize..300_000) {
            let l = Layout::new(5, 65536).unwrap();
            let pieces = l.split(off, len);
            let mut pos = off;
            let mut buf = 0usize;
            for p in &pieces {
                prop_assert_eq!(p.block.0 * 65536 + p.offset as u64, pos);
                prop_assert_eq!(p.buf_offset, buf);
                prop_assert!(p.len > 0 && p.offset + p.len <= 65536);
                pos += p.len as u64;
                buf += p.len as usize;
            }
            prop_assert_eq!(buf, len);
        }
    }
}
