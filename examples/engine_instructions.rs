//! The workload `scripts/bench-instructions` counts under callgrind: `N`
//! requests of 4 KiB at random offsets, 32 in flight on one thread, either
//! straight through the runtime onto a file (`runtime`: the floor every
//! request pays) or through a volume's live view (`write`, `read`).
//!
//! Usage: engine_instructions MODE N DIR (the volume is made in DIR, or
//! opened if it is there; `runtime` uses a plain file in DIR).

use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, View, Volume, VolumeConfig};
use snapblk::runtime::{self, block_on, AlignedBuf};
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::path::Path;

const SIZE: u64 = 128 << 20;
const IN_FLIGHT: u64 = 32;
const BLOCK: usize = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Runtime,
    Write,
    Read,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: engine_instructions runtime|write|read N DIR";
    let mode = match args.get(1).map(String::as_str) {
        Some("runtime") => Mode::Runtime,
        Some("write") => Mode::Write,
        Some("read") => Mode::Read,
        _ => panic!("{usage}"),
    };
    let count: u64 = args.get(2).and_then(|n| n.parse().ok()).expect(usage);
    let dir = Path::new(args.get(3).expect(usage));
    block_on(async move {
        let left = Cell::new(count);
        if mode == Mode::Runtime {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("file"))
                .unwrap();
            file.set_len(SIZE).unwrap();
            let fd = file.as_raw_fd();
            let tasks = (0..IN_FLIGHT).map(|t| {
                each_offset(&left, t, move |buf, offset| async move {
                    runtime::write_at(fd, &buf, offset, 0).await.unwrap();
                    buf
                })
            });
            futures::future::join_all(tasks).await;
            return;
        }
        let config = VolumeConfig {
            size: SIZE,
            chunk_size: 64 << 10,
            partitions: 4,
            backing: None,
            cache: CacheMode::FOR_NEW_VOLUMES,
        };
        let storage = Storage::Dir(dir.to_path_buf());
        let volume = match Volume::create("v", storage.clone(), &config).await {
            Ok(v) => v,
            Err(_) => Volume::open("v", storage).await.unwrap(),
        };
        let live: &View = &volume.live();
        let tasks = (0..IN_FLIGHT).map(|t| {
            each_offset(&left, t, move |mut buf, offset| async move {
                match mode {
                    Mode::Write => live.write(offset, &buf, false).await.unwrap(),
                    _ => live.read(offset, &mut buf).await.unwrap(),
                }
                buf
            })
        });
        futures::future::join_all(tasks).await;
        volume.shutdown().await.unwrap();
    });
}

/// One of the requesters: takes requests from `left` until none is left,
/// each at a pseudo-random block (its own sequence, `seed`).
async fn each_offset<F, Fut>(left: &Cell<u64>, seed: u64, request: F)
where
    F: Fn(AlignedBuf, u64) -> Fut,
    Fut: std::future::Future<Output = AlignedBuf>,
{
    let mut buf = AlignedBuf::zeroed(BLOCK);
    buf[0] = seed as u8;
    let mut x = seed * 7919 + 1;
    while left.get() > 0 {
        left.set(left.get() - 1);
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = ((x >> 20) % (SIZE / BLOCK as u64)) * BLOCK as u64;
        buf = request(buf, offset).await;
    }
}
