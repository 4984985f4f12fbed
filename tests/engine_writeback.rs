//! The write-back buffer: writes after a snapshot are acknowledged without
//! waiting for a commit, one commit covers many of them, reads see them at
//! once, FLUSH makes them durable, a full buffer pushes back, and the
//! background committer drains the buffer without any FLUSH.

use snapblk::backend::memory::MemDisk;
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 4096;
const CHUNKS: usize = 256;

fn config() -> VolumeConfig {
    VolumeConfig {
        size: (CHUNK * CHUNKS) as u64,
        chunk_size: CHUNK as u32,
        partitions: 2,
        backing: None,
        cache: CacheMode::Writeback,
    }
}

fn writeback(limit_bytes: usize, background: bool) -> WriteBackConfig {
    WriteBackConfig {
        limit_bytes,
        commit_delay: Duration::ZERO,
        background,
    }
}

/// A volume whose every chunk holds `old`, with snapshot "s" taken.
async fn snapshotted(disk: &Arc<MemDisk>, wb: WriteBackConfig) -> Arc<Volume> {
    let storage = Storage::Memory(disk.clone());
    let volume = Volume::create_with("v", storage, &config(), wb)
        .await
        .unwrap();
    let live = volume.live();
    live.write(0, &vec![0x11u8; CHUNK * CHUNKS], false)
        .await
        .unwrap();
    volume.create_snapshot("s").await.unwrap();
    volume
}

async fn read(volume: &Arc<Volume>, snapshot: Option<&str>, chunk: usize) -> Vec<u8> {
    let view = match snapshot {
        Some(s) => volume.snapshot_view(s).unwrap(),
        None => volume.live(),
    };
    let mut buf = vec![0u8; CHUNK];
    view.read((chunk * CHUNK) as u64, &mut buf).await.unwrap();
    buf
}

#[test]
fn first_overwrites_after_a_snapshot_share_one_commit() {
    let disk = MemDisk::new();
    block_on(async {
        let volume = snapshotted(&disk, writeback(1 << 20, false)).await;
        let live = volume.live();
        let flushes = disk.flushes();
        // One at a time, as a client with a queue depth of 1 writes: each
        // one a first overwrite that needs its chunk preserved.
        for c in 0..64 {
            live.write((c * CHUNK + 512) as u64, &[0x22u8; 512], false)
                .await
                .unwrap();
        }
        assert_eq!(
            disk.flushes(),
            flushes,
            "a write without FUA waited for a commit"
        );
        assert_eq!(volume.held_bytes(), 64 * 512);
        // Reads see the held writes at once; the snapshot still reads the old data.
        for c in [0, 17, 63] {
            let now = read(&volume, None, c).await;
            assert_eq!(&now[..512], &[0x11u8; 512][..]);
            assert_eq!(&now[512..1024], &[0x22u8; 512][..]);
            assert_eq!(read(&volume, Some("s"), c).await, vec![0x11u8; CHUNK]);
        }
        // FLUSH commits them all at once and applies them.
        live.flush().await.unwrap();
        let commit_flushes = disk.flushes() - flushes;
        assert!(
            (1..=8).contains(&commit_flushes),
            "64 preservations should take one commit (a journal and a store \
             flush per partition, and the origin), took {commit_flushes} flushes"
        );
        assert_eq!(volume.held_bytes(), 0);
    });
    // What the flush covered is durable: a power cut keeps it.
    let after = disk.power_cut(&mut snapblk::backend::memory::SplitMix(7));
    block_on(async {
        let volume = Volume::open_with("v", Storage::Memory(after), writeback(1 << 20, false))
            .await
            .unwrap();
        for c in [0, 40, 63] {
            assert_eq!(&read(&volume, None, c).await[512..1024], &[0x22u8; 512][..]);
            assert_eq!(read(&volume, Some("s"), c).await, vec![0x11u8; CHUNK]);
        }
    });
}

#[test]
fn a_fua_write_is_durable_when_acknowledged() {
    let disk = MemDisk::new();
    block_on(async {
        let volume = snapshotted(&disk, writeback(1 << 20, false)).await;
        volume
            .live()
            .write(5 * CHUNK as u64, &[0x33u8; CHUNK], true)
            .await
            .unwrap();
        assert_eq!(volume.held_bytes(), 0);
    });
    let after = disk.power_cut(&mut snapblk::backend::memory::SplitMix(3));
    block_on(async {
        let volume = Volume::open_with("v", Storage::Memory(after), writeback(1 << 20, false))
            .await
            .unwrap();
        assert_eq!(read(&volume, None, 5).await, vec![0x33u8; CHUNK]);
        assert_eq!(read(&volume, Some("s"), 5).await, vec![0x11u8; CHUNK]);
    });
}

#[test]
fn a_full_buffer_pushes_back_instead_of_growing() {
    let disk = MemDisk::new();
    let limit = 16 * 1024;
    block_on(async {
        let volume = snapshotted(&disk, writeback(limit, false)).await;
        let live = volume.live();
        let mut most = 0;
        for c in 0..CHUNKS {
            live.write((c * CHUNK) as u64, &[0x44u8; CHUNK], false)
                .await
                .unwrap();
            most = most.max(volume.held_bytes());
        }
        // The write that reaches the budget commits and drains before it
        // is acknowledged, so the buffer never holds more than the budget.
        assert!(most < limit, "held {most} bytes, budget {limit}");
        for c in [0, 100, CHUNKS - 1] {
            assert_eq!(read(&volume, None, c).await, vec![0x44u8; CHUNK]);
            assert_eq!(read(&volume, Some("s"), c).await, vec![0x11u8; CHUNK]);
        }
    });
}

#[test]
fn the_background_committer_drains_the_buffer_without_a_flush() {
    let disk = MemDisk::new();
    let volume = block_on(snapshotted(&disk, writeback(1 << 20, true)));
    block_on(async {
        for c in 0..32 {
            volume
                .live()
                .write((c * CHUNK) as u64, &[0x55u8; CHUNK], false)
                .await
                .unwrap();
        }
    });
    // No flush is ever sent; the committer thread applies the held writes.
    let start = Instant::now();
    while volume.held_bytes() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "held writes never drained"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Drained means committed, then applied to the origin, where they are
    // as volatile as any write before a FLUSH. What must hold is the order:
    // whatever a power cut keeps of them, the snapshot reads its old data.
    let after = disk.power_cut(&mut snapblk::backend::memory::SplitMix(11));
    block_on(async {
        let reopened = Volume::open_with("v", Storage::Memory(after), writeback(1 << 20, false))
            .await
            .unwrap();
        for c in 0..32 {
            assert_eq!(read(&reopened, Some("s"), c).await, vec![0x11u8; CHUNK]);
            let now = read(&reopened, None, c).await;
            for sector in now.chunks(512) {
                assert!(
                    sector == [0x55u8; 512] || sector == [0x11u8; 512],
                    "chunk {c} holds a sector no write produced"
                );
            }
        }
    });
}
