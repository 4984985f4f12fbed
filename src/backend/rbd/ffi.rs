//! The part of librados' and librbd's C APIs snapblk calls, declared by hand.
//!
//! Why not a crate (issue 14, checked on crates.io): `ceph-rbd` 0.3.2 does
//! not build on current Rust and is a stub; `librbd-sys` dates from 2016;
//! `rbd-sys` 0.1.0 is a first bindgen release; `ceph` and `librados` cover
//! RADOS only. Both C APIs are stable across Ceph releases and the handful
//! of calls below is easier to audit here than a generated binding.

use std::os::raw::{c_char, c_int, c_void};

pub type RadosT = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Completion = *mut c_void;
pub type Callback = extern "C" fn(Completion, *mut c_void);

pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `rbd_snap_create2`: do not ask the image's watchers to quiesce.
pub const SNAP_CREATE_SKIP_QUIESCE: u32 = 1;
/// `RBD_FEATURE_*` (librbd/features.h).
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;

#[repr(C)]
#[derive(Default)]
pub struct ClusterStat {
    pub kb: u64,
    pub kb_used: u64,
    pub kb_avail: u64,
    pub num_objects: u64,
}

#[repr(C)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

#[link(name = "rados")]
extern "C" {
    pub fn rados_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub fn rados_create2(
        cluster: *mut RadosT,
        cluster_name: *const c_char,
        user_name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: RadosT,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_get_instance_id(cluster: RadosT) -> u64;
    pub fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    pub fn rados_cluster_stat(cluster: RadosT, result: *mut ClusterStat) -> c_int;
    pub fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut IoCtx) -> c_int;
    pub fn rados_ioctx_destroy(io: IoCtx);
    pub fn rados_stat(io: IoCtx, oid: *const c_char, size: *mut u64, mtime: *mut i64) -> c_int;
    pub fn rados_read(
        io: IoCtx,
        oid: *const c_char,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    pub fn rados_write_full(io: IoCtx, oid: *const c_char, buf: *const c_char, len: usize)
        -> c_int;
    pub fn rados_trunc(io: IoCtx, oid: *const c_char, size: u64) -> c_int;
    pub fn rados_remove(io: IoCtx, oid: *const c_char) -> c_int;
    pub fn rados_aio_create_completion2(
        arg: *mut c_void,
        complete: Callback,
        c: *mut Completion,
    ) -> c_int;
    pub fn rados_aio_get_return_value(c: Completion) -> c_int;
    pub fn rados_aio_release(c: Completion);
    pub fn rados_aio_write(
        io: IoCtx,
        oid: *const c_char,
        c: Completion,
        buf: *const c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    pub fn rados_aio_read(
        io: IoCtx,
        oid: *const c_char,
        c: Completion,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_create(io: IoCtx, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    pub fn rbd_create2(
        io: IoCtx,
        name: *const c_char,
        size: u64,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    pub fn rbd_get_features(image: Image, features: *mut u64) -> c_int;
    pub fn rbd_update_features(image: Image, features: u64, enabled: u8) -> c_int;
    pub fn rbd_remove(io: IoCtx, name: *const c_char) -> c_int;
    pub fn rbd_list(io: IoCtx, names: *mut c_char, size: *mut usize) -> c_int;
    pub fn rbd_open(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: Image) -> c_int;
    pub fn rbd_snap_create2(
        image: Image,
        name: *const c_char,
        flags: u32,
        progress: Option<extern "C" fn(u64, u64, *mut c_void) -> c_int>,
        progress_arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_snap_remove(image: Image, name: *const c_char) -> c_int;
    pub fn rbd_snap_list(image: Image, snaps: *mut SnapInfo, max: *mut c_int) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut SnapInfo);
    pub fn rbd_get_size(image: Image, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: Image, size: u64) -> c_int;
    pub fn rbd_lock_acquire(image: Image, mode: c_int) -> c_int;
    pub fn rbd_lock_release(image: Image) -> c_int;
    pub fn rbd_is_exclusive_lock_owner(image: Image, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_get_owners(
        image: Image,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max: *mut usize,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, count: usize);
    pub fn rbd_lock_break(image: Image, mode: c_int, owner: *const c_char) -> c_int;
    pub fn rbd_aio_create_completion(arg: *mut c_void, cb: Callback, c: *mut Completion) -> c_int;
    pub fn rbd_aio_get_return_value(c: Completion) -> isize;
    pub fn rbd_aio_release(c: Completion);
    pub fn rbd_aio_read(
        image: Image,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: Completion,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: Image,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: Completion,
    ) -> c_int;
    pub fn rbd_aio_discard(image: Image, off: u64, len: u64, c: Completion) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: Image,
        off: u64,
        len: usize,
        c: Completion,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: Image, c: Completion) -> c_int;
}

// Builds with Ceph support take `malloc` from tcmalloc instead of glibc.
// librbd and librados allocate and free C++ objects for every request, on
// three threads (the caller's, the messenger's, librbd's completion pool);
// under 4k random reads of a Ceph volume glibc's malloc took about 9% of the
// daemon's CPU (`_int_malloc`, `malloc_consolidate`, `_int_free`). With
// tcmalloc the daemon's CPU per read fell from 34-37 to 29-31 us; on local
// volumes it moved within noise (docs/benchmarks.md, "Ceph"). Ceph's own
// daemons link tcmalloc for the same reason. Linked here, among the crate's
// own libraries and so ahead of libc, its `malloc` interposes glibc's for the
// whole process: Rust's allocator, librbd's `new`, libc's own callers. The
// versioned file name: Debian's runtime package (libtcmalloc-minimal4) has no
// unversioned link-time name. `tc_version` is called (the daemon logs it), so
// the linker keeps the library.
#[link(
    name = "libtcmalloc_minimal.so.4",
    kind = "dylib",
    modifiers = "+verbatim"
)]
extern "C" {
    pub fn tc_version(
        major: *mut c_int,
        minor: *mut c_int,
        patch: *mut *const c_char,
    ) -> *const c_char;
}
