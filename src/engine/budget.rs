//! Space admission: a volume may be given a [`SpaceBudget`] (its owner's
//! quota), asked before every write with the most that write could make the
//! volume allocate. The engine only computes that worst case; what the
//! budget is, and how it counts, is the caller's (`crate::volumes::quota`).
//!
//! Must never: stat files or take a lock that I/O elsewhere holds long; it
//! is on the write path of every request.

/// Decides whether a volume may grow by up to `bytes`.
pub trait SpaceBudget: Send + Sync {
    /// `Err` says why not (the quota and the use), for the writer's error.
    /// A request that cannot allocate (`bytes == 0`) must be admitted, so
    /// an owner over quota can still free space.
    fn admit(&self, bytes: u64) -> Result<(), String>;

    /// True while every request would be admitted (no limit): the engine
    /// then skips working out the worst case.
    fn unlimited(&self) -> bool;
}
