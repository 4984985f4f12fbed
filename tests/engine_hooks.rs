//! The engine's attachment points for copy jobs and replication: write hooks
//! see (and may delay) every live write, and a snapshot's sole reader can give
//! chunks back so later overwrites skip preserving them.

use futures::future::BoxFuture;
use snapblk::backend::memory::MemDisk;
use snapblk::backend::Storage;
use snapblk::engine::{
    CacheMode, Change, Result, View, Volume, VolumeConfig, WriteGuard, WriteHook,
};
use snapblk::runtime::{block_on, spawn};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const CHUNK: u32 = 64 * 1024;

fn volume(disk: &Arc<MemDisk>) -> Arc<Volume> {
    let config = VolumeConfig {
        size: 16 * CHUNK as u64,
        chunk_size: CHUNK,
        partitions: 2,
        backing: None,
        cache: CacheMode::Writeback,
    };
    block_on(Volume::create("v", Storage::Memory(disk.clone()), &config)).unwrap()
}

/// One write as a hook saw it: offset, data (None for zeroes), length.
type Seen = (u64, Option<Vec<u8>>, u64);

/// Records what it is shown; optionally makes writes wait until `open`.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
    begun: Mutex<Vec<u64>>,
    closed: AtomicBool,
    gate: Mutex<Option<futures::future::Shared<futures::channel::oneshot::Receiver<()>>>>,
}

impl WriteHook for Recorder {
    fn before_write(&self, offset: u64, _len: u64) -> BoxFuture<'_, Result<WriteGuard>> {
        self.begun.lock().unwrap().push(offset);
        let wait = self.gate.lock().unwrap().clone();
        Box::pin(async move {
            if let Some(wait) = wait {
                let _ = wait.await;
            }
            Ok(None)
        })
    }

    fn after_write(&self, _: &mut WriteGuard, offset: u64, change: Change<'_>) {
        assert!(!self.closed.load(Ordering::SeqCst), "called after removal");
        let data = match change {
            Change::Data(d) => Some(d.to_vec()),
            Change::Zeroes(_) => None,
        };
        self.seen.lock().unwrap().push((offset, data, change.len()));
    }
}

#[test]
fn a_hook_sees_every_write_while_installed_and_none_after() {
    let disk = MemDisk::new();
    let volume = volume(&disk);
    let live = volume.live();
    let recorder = Arc::new(Recorder::default());
    let hook: Arc<dyn WriteHook> = recorder.clone();
    block_on(async {
        live.write(0, &[1u8; 4096], false).await.unwrap();
        volume.add_write_hook(hook.clone()).await;
        live.write(8192, &[2u8; 512], true).await.unwrap();
        live.write_zeroes(65536, 4096, false).await.unwrap();
        live.discard(0, 4096).await.unwrap();
        volume.remove_write_hook(&hook).await;
        recorder.closed.store(true, Ordering::SeqCst);
        live.write(0, &[3u8; 4096], false).await.unwrap();
    });
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (8192, Some(vec![2u8; 512]), 512),
            (65536, None, 4096),
            (0, None, 4096),
        ]
    );
}

/// Lets other tasks on this thread run once.
async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Starts writing `data` at `offset` on another task and returns once the
/// write reached `recorder`'s hook; the receiver gets the write's result.
async fn write_up_to_the_hook(
    live: &View,
    recorder: &Recorder,
    offset: u64,
    data: Vec<u8>,
) -> futures::channel::oneshot::Receiver<Result<()>> {
    let (done, writer) = futures::channel::oneshot::channel();
    let writing = live.clone();
    spawn(async move {
        let _ = done.send(writing.write(offset, &data, false).await);
    });
    while recorder.begun.lock().unwrap().is_empty() {
        yield_now().await;
    }
    writer
}

#[test]
fn a_hook_can_hold_a_write_until_it_lets_go() {
    let disk = MemDisk::new();
    let volume = volume(&disk);
    let live = volume.live();
    let recorder = Arc::new(Recorder::default());
    let (open, wait) = futures::channel::oneshot::channel();
    *recorder.gate.lock().unwrap() = Some(futures::FutureExt::shared(wait));
    block_on(async {
        volume.add_write_hook(recorder.clone()).await;
        let writer = write_up_to_the_hook(&live, &recorder, 4096, vec![7u8; 4096]).await;
        let mut buf = vec![0u8; 4096];
        live.read(4096, &mut buf).await.unwrap();
        assert_eq!(buf, vec![0u8; 4096], "the held write reached the origin");
        assert!(recorder.seen.lock().unwrap().is_empty());
        open.send(()).unwrap();
        writer.await.unwrap().unwrap();
        live.read(4096, &mut buf).await.unwrap();
        assert_eq!(buf, vec![7u8; 4096]);
    });
}

#[test]
fn released_chunks_are_not_preserved_and_the_others_still_are() {
    let disk = MemDisk::new();
    let volume = volume(&disk);
    let live = volume.live();
    block_on(async {
        live.write(0, &vec![1u8; 4 * CHUNK as usize], false)
            .await
            .unwrap();
        volume.create_snapshot(".copy").await.unwrap();
        let consumer = volume.consume_snapshot(".copy").await.unwrap();
        // Chunk 0 wholly, chunk 1 only partly: only chunk 0 goes.
        consumer.release(0, CHUNK as u64 + 4096);
        let used = |v: &Volume| v.list_snapshots()[0].exclusive_bytes;
        live.write(0, &[2u8; 4096], false).await.unwrap();
        assert_eq!(used(&volume), 0, "a released chunk was preserved");
        live.write(CHUNK as u64, &[2u8; 4096], false).await.unwrap();
        assert_eq!(used(&volume), CHUNK as u64);
        let snap = volume.snapshot_view(".copy").unwrap();
        let mut buf = vec![0u8; 4096];
        snap.read(CHUNK as u64, &mut buf).await.unwrap();
        assert_eq!(
            buf,
            vec![1u8; 4096],
            "an unreleased chunk lost its old data"
        );

        // A user snapshot taken later still gets its own copy of chunk 0.
        volume.create_snapshot("user").await.unwrap();
        live.write(0, &[3u8; 4096], false).await.unwrap();
        let user = volume.snapshot_view("user").unwrap();
        user.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, vec![2u8; 4096]);

        // Deleting the consumed snapshot drops its released set with it.
        volume.delete_snapshot(".copy").await.unwrap();
        volume.delete_snapshot("user").await.unwrap();
        volume.create_snapshot("again").await.unwrap();
        live.write(0, &[4u8; 4096], false).await.unwrap();
        let again = volume.snapshot_view("again").unwrap();
        again.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, vec![3u8; 4096]);
    });
}

#[test]
fn a_write_held_by_a_hook_sees_chunks_released_meanwhile() {
    // Replication's CP: a write waits at the link's barrier while the CP's
    // snapshot is taken and the chunks the CP will not read are released;
    // when it goes on, it must not preserve its chunk for that snapshot.
    let disk = MemDisk::new();
    let volume = volume(&disk);
    let live = volume.live();
    let recorder = Arc::new(Recorder::default());
    let (open, wait) = futures::channel::oneshot::channel();
    block_on(async {
        live.write(0, &vec![1u8; 2 * CHUNK as usize], false)
            .await
            .unwrap();
        volume.add_write_hook(recorder.clone()).await;
        volume.create_snapshot(".cp").await.unwrap();
        *recorder.gate.lock().unwrap() = Some(futures::FutureExt::shared(wait));
        let writer = write_up_to_the_hook(&live, &recorder, 0, vec![2u8; 4096]).await;
        let consumer = volume.consume_snapshot(".cp").await.unwrap();
        consumer.release(0, CHUNK as u64);
        open.send(()).unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(
            volume.list_snapshots()[0].exclusive_bytes,
            0,
            "the held write preserved a chunk released while it waited"
        );
        // It prepared again under the new epoch, with the same hook: it kept
        // its guard (asked again, a replication link would have counted it
        // as two writes, one that never reached the origin).
        assert_eq!(recorder.begun.lock().unwrap().len(), 1);
        // An unreleased chunk is still preserved.
        live.write(CHUNK as u64, &[2u8; 4096], false).await.unwrap();
        assert_eq!(volume.list_snapshots()[0].exclusive_bytes, CHUNK as u64);
    });
}

#[test]
fn releases_do_not_survive_a_reopen() {
    let disk = MemDisk::new();
    let volume = volume(&disk);
    block_on(async {
        let live = volume.live();
        live.write(0, &[1u8; 4096], false).await.unwrap();
        volume.create_snapshot(".copy").await.unwrap();
        volume
            .consume_snapshot(".copy")
            .await
            .unwrap()
            .release(0, CHUNK as u64);
        volume.shutdown().await.unwrap();
    });
    drop(volume);
    let volume = block_on(Volume::open("v", Storage::Memory(disk.clone()))).unwrap();
    block_on(async {
        volume.live().write(0, &[2u8; 4096], false).await.unwrap();
        let mut buf = vec![0u8; 4096];
        volume
            .snapshot_view(".copy")
            .unwrap()
            .read(0, &mut buf)
            .await
            .unwrap();
        assert_eq!(
            buf,
            vec![1u8; 4096],
            "the consumer must release again after a restart"
        );
    });
}
