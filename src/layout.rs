//! How a flat buffer of `N` members splits into groups.

use crate::error::{Result, TpoError};
use std::ops::Range;

/// A validated partition of `N` members into `B` contiguous, non-empty groups.
///
/// Either uniform (`B` groups of `K` members each, `N = B * K`, member `j` of group `g` at
/// flat index `g * K + j`) or ragged, described CSR-style by `B + 1` offsets
/// `0 = o_0 < o_1 < ... < o_B = N`, group `g` being the members `o_g .. o_{g+1}`.
/// Validation happens once, in the constructors; every kernel and reference function then
/// trusts the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLayout {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Uniform { groups: usize, k: usize },
    Ragged { offsets: Vec<usize> },
}

impl GroupLayout {
    /// `groups` groups of `k` members each.
    ///
    /// Errors: [`TpoError::NoGroups`] when `groups == 0`, [`TpoError::EmptyGroup`] when `k == 0`,
    /// [`TpoError::BadOffsets`] when `groups * k` overflows.
    pub fn uniform(groups: usize, k: usize) -> Result<Self> {
        if groups == 0 {
            return Err(TpoError::NoGroups);
        }
        if k == 0 {
            return Err(TpoError::EmptyGroup { group: 0 });
        }
        groups
            .checked_mul(k)
            .ok_or_else(|| TpoError::BadOffsets(format!("{groups} groups of {k} members overflow usize")))?;
        Ok(Self { kind: Kind::Uniform { groups, k } })
    }

    /// Ragged groups from `B + 1` offsets: `offsets[0] == 0`, strictly increasing.
    ///
    /// Errors name the first offending position: a first offset other than zero, a group
    /// whose end does not exceed its start (an empty group), or fewer than two offsets.
    pub fn from_offsets(offsets: Vec<usize>) -> Result<Self> {
        if offsets.len() < 2 {
            return Err(if offsets.is_empty() {
                TpoError::BadOffsets("no offsets given: B groups need B + 1 offsets".into())
            } else {
                TpoError::NoGroups
            });
        }
        if offsets[0] != 0 {
            return Err(TpoError::BadOffsets(format!("offsets[0] is {}, must be 0", offsets[0])));
        }
        for g in 0..offsets.len() - 1 {
            if offsets[g + 1] == offsets[g] {
                return Err(TpoError::EmptyGroup { group: g });
            }
            if offsets[g + 1] < offsets[g] {
                return Err(TpoError::BadOffsets(format!(
                    "offsets must increase: offsets[{}] = {} < offsets[{}] = {}",
                    g + 1,
                    offsets[g + 1],
                    g,
                    offsets[g]
                )));
            }
        }
        Ok(Self { kind: Kind::Ragged { offsets } })
    }

    /// Ragged groups from their sizes (`sizes[g]` members in group `g`, all > 0).
    pub fn from_sizes(sizes: &[usize]) -> Result<Self> {
        if sizes.is_empty() {
            return Err(TpoError::NoGroups);
        }
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        offsets.push(0usize);
        let mut acc = 0usize;
        for (g, &s) in sizes.iter().enumerate() {
            if s == 0 {
                return Err(TpoError::EmptyGroup { group: g });
            }
            acc = acc
                .checked_add(s)
                .ok_or_else(|| TpoError::BadOffsets(format!("group sizes overflow usize at group {g}")))?;
            offsets.push(acc);
        }
        Ok(Self { kind: Kind::Ragged { offsets } })
    }

    /// Number of groups `B`.
    pub fn num_groups(&self) -> usize {
        match &self.kind {
            Kind::Uniform { groups, .. } => *groups,
            Kind::Ragged { offsets } => offsets.len() - 1,
        }
    }

    /// Total number of members `N` (the length every per-member input must have).
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Uniform { groups, k } => groups * k,
            Kind::Ragged { offsets } => offsets[offsets.len() - 1],
        }
    }

    /// Always `false`: a valid layout has at least one member. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `Some(K)` for a uniform layout.
    pub fn uniform_size(&self) -> Option<usize> {
        match &self.kind {
            Kind::Uniform { k, .. } => Some(*k),
            Kind::Ragged { .. } => None,
        }
    }

    /// The flat index range of group `g` (panics if `g >= num_groups()`, like slice indexing).
    pub fn range(&self, g: usize) -> Range<usize> {
        match &self.kind {
            Kind::Uniform { groups, k } => {
                assert!(g < *groups, "group index {g} out of range ({groups} groups)");
                g * k..(g + 1) * k
            }
            Kind::Ragged { offsets } => offsets[g]..offsets[g + 1],
        }
    }

    /// Size of the largest group.
    pub fn max_group_size(&self) -> usize {
        match &self.kind {
            Kind::Uniform { k, .. } => *k,
            Kind::Ragged { offsets } => offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
        }
    }

    /// The `B + 1` offsets (materialised for a uniform layout).
    pub fn offsets(&self) -> Vec<usize> {
        match &self.kind {
            Kind::Uniform { groups, k } => (0..=*groups).map(|g| g * k).collect(),
            Kind::Ragged { offsets } => offsets.clone(),
        }
    }

    /// Iterator over the groups' index ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.num_groups()).map(move |g| self.range(g))
    }

    /// Checks that an input called `name` has exactly [`len`](Self::len) elements.
    pub fn check_len(&self, name: &'static str, got: usize) -> Result<()> {
        if got != self.len() {
            return Err(TpoError::LengthMismatch { name, got, expected: self.len() });
        }
        Ok(())
    }
}
