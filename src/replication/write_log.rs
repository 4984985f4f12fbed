//! The source's bounded write log: logged writes gathered straight into the
//! transfer frames they ship in.
//!
//! A write on a replicated volume is copied once, into the open segment's
//! frame; the sender seals that frame where it lies and writes it to the
//! socket ([`wire::Session::send_frame`]). Frames of shipped segments are
//! reused, so a steady writer allocates nothing per write. Owns: the
//! segments, the byte count that `--max-log` bounds, the spare frames.
//! Never: decides what is logged (the link's write hook does) or talks to the
//! destination.

use super::wire::TransferFrame;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Shipped frames kept for reuse; more are freed (each holds about one
/// transfer, [`WriteLog::new`]'s `segment_bytes`).
const SPARE_FRAMES: usize = 4;

/// One transfer's worth of logged writes.
pub struct Segment {
    pub frame: TransferFrame,
    /// Each piece's write, in piece order: sequence number, offset, length.
    pub writes: Vec<(u64, u64, u64)>,
    /// Bytes of written data in the frame.
    pub bytes: u64,
    /// When its first write was logged.
    pub opened: Instant,
}

pub struct WriteLog {
    /// Oldest first. Only the newest can still take writes, and only while
    /// `open` says so.
    segments: VecDeque<Segment>,
    open: bool,
    bytes: u64,
    segment_bytes: u64,
    spare: Vec<Vec<u8>>,
}

impl WriteLog {
    /// A log whose segments close once they hold `segment_bytes` of data (a
    /// larger write gets a segment of its own).
    pub fn new(segment_bytes: u64) -> WriteLog {
        WriteLog {
            segments: VecDeque::new(),
            open: false,
            bytes: 0,
            segment_bytes,
            spare: Vec::new(),
        }
    }

    /// Data bytes held, what `--max-log` bounds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Logs write `seq` of `data` at `offset`.
    pub fn push(&mut self, seq: u64, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let fits = self
            .segments
            .back()
            .is_some_and(|s| self.open && s.bytes + len <= self.segment_bytes);
        if !fits {
            let frame = TransferFrame::new(self.spare.pop().unwrap_or_default());
            self.segments.push_back(Segment {
                frame,
                writes: Vec::new(),
                bytes: 0,
                opened: Instant::now(),
            });
            self.open = true;
        }
        let s = self
            .segments
            .back_mut()
            .expect("a segment was just ensured");
        s.frame.push(offset, data);
        s.writes.push((seq, offset, len));
        s.bytes += len;
        self.bytes += len;
    }

    /// When the oldest segment should ship, `None` with nothing logged:
    /// at once if it is closed or holds `min_bytes`, else once it is
    /// `linger` old, so that a sender that caught up with its writers
    /// ships fewer, larger transfers (each costs a round trip and a
    /// wake-up on both ends) at the price of at most `linger` of lag.
    pub fn ship_at(&self, min_bytes: u64, linger: Duration) -> Option<Instant> {
        let first = self.segments.front()?;
        let still_open = self.open && self.segments.len() == 1;
        if !still_open || first.bytes >= min_bytes {
            return Some(first.opened);
        }
        Some(first.opened + linger)
    }

    /// Ends the open segment: later writes go to a new one. Called at a
    /// CP's snapshot, so that no segment holds writes from both sides of it.
    pub fn close(&mut self) {
        self.open = false;
    }

    /// Takes the oldest segment if its writes come before sequence number
    /// `limit` (segments never straddle a [`WriteLog::close`], so either all
    /// of its writes do or none).
    pub fn take_before(&mut self, limit: u64) -> Option<Segment> {
        let first = self.segments.front()?.writes[0].0;
        if first >= limit {
            return None;
        }
        if self.segments.len() == 1 {
            self.open = false;
        }
        let s = self.segments.pop_front().expect("front exists");
        self.bytes -= s.bytes;
        Some(s)
    }

    /// Gives back a shipped segment's frame for reuse.
    pub fn recycle(&mut self, frame: Vec<u8>) {
        if self.spare.len() < SPARE_FRAMES {
            self.spare.push(frame);
        }
    }

    /// Drops every logged write (the link broke).
    pub fn clear(&mut self) {
        while let Some(s) = self.segments.pop_front() {
            self.recycle(s.frame.into_buffer());
        }
        self.open = false;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::wire::{decode_transfer, HEADER};

    fn pieces_of(s: Segment, tid: u64) -> Vec<(u64, Vec<u8>)> {
        let frame = s.frame.finish(tid);
        let payload = &frame[HEADER..];
        let (got, pieces) = decode_transfer(payload, 1 << 30).unwrap();
        assert_eq!(got, tid);
        pieces
            .iter()
            .map(|p| (p.offset, payload[p.at..p.at + p.len as usize].to_vec()))
            .collect()
    }

    #[test]
    fn segments_fill_close_at_cps_and_decode_as_transfers() {
        let mut log = WriteLog::new(8192);
        log.push(0, 0, &[1; 4096]);
        log.push(1, 8192, &[2; 4096]);
        // Full: a new segment.
        log.push(2, 4096, &[3; 4096]);
        log.close();
        // After a CP's snapshot: a new segment although the last has room.
        log.push(5, 0, &[4; 512]);
        assert_eq!(log.bytes(), 3 * 4096 + 512);

        // Nothing before sequence 0; the first segment before 1.
        assert!(log.take_before(0).is_none());
        let first = log.take_before(1).unwrap();
        assert_eq!(first.writes, vec![(0, 0, 4096), (1, 8192, 4096)]);
        assert_eq!(
            pieces_of(first, 7),
            vec![(0, vec![1; 4096]), (8192, vec![2; 4096])]
        );
        let second = log.take_before(5).unwrap();
        assert_eq!(second.writes, vec![(2, 4096, 4096)]);
        assert!(log.take_before(5).is_none(), "write 5 is after the CP");
        let third = log.take_before(u64::MAX).unwrap();
        assert_eq!(pieces_of(third, 8), vec![(0, vec![4; 512])]);
        assert!(log.is_empty());
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn taking_the_open_segment_starts_a_new_one() {
        let mut log = WriteLog::new(1 << 20);
        log.push(0, 0, &[1; 4096]);
        let s = log.take_before(u64::MAX).unwrap();
        assert_eq!(s.writes, vec![(0, 0, 4096)]);
        // The taken segment is gone: these writes must not land in it.
        log.push(1, 4096, &[2; 4096]);
        log.push(2, 8192, &[3; 4096]);
        let s = log.take_before(u64::MAX).unwrap();
        assert_eq!(s.writes, vec![(1, 4096, 4096), (2, 8192, 4096)]);
        assert!(log.take_before(u64::MAX).is_none());
    }

    #[test]
    fn a_small_open_segment_lingers_and_a_full_or_closed_one_ships_at_once() {
        let linger = Duration::from_secs(3600);
        let mut log = WriteLog::new(1 << 20);
        assert_eq!(log.ship_at(4096, linger), None, "nothing logged");
        log.push(0, 0, &[1; 1024]);
        let opened = log.segments[0].opened;
        assert_eq!(log.ship_at(4096, linger), Some(opened + linger));
        log.push(1, 4096, &[2; 3072]);
        assert_eq!(log.ship_at(4096, linger), Some(opened), "holds min_bytes");
        assert_eq!(log.ship_at(8192, linger), Some(opened + linger));
        log.close();
        assert_eq!(log.ship_at(8192, linger), Some(opened), "closed at a CP");
        log.push(2, 0, &[3; 512]);
        assert_eq!(
            log.ship_at(8192, linger),
            Some(opened),
            "an older segment waits behind nothing"
        );
    }

    #[test]
    fn large_writes_get_their_own_segment_and_frames_are_reused() {
        let mut log = WriteLog::new(8192);
        log.push(0, 0, &[1; 4096]);
        log.push(1, 0, &[2; 65536]);
        log.push(2, 0, &[3; 4096]);
        let sizes: Vec<u64> = std::iter::from_fn(|| log.take_before(u64::MAX))
            .map(|s| s.bytes)
            .collect();
        assert_eq!(sizes, vec![4096, 65536, 4096]);

        log.recycle(Vec::with_capacity(1 << 20));
        log.push(3, 0, &[1; 512]);
        let frame = log.take_before(u64::MAX).unwrap().frame.into_buffer();
        assert_eq!(frame.capacity(), 1 << 20, "the spare frame was reused");

        log.push(4, 0, &[1; 512]);
        log.clear();
        assert!(log.is_empty());
        assert_eq!(log.bytes(), 0);
    }
}
