//! Reading a snapshot while it is still being downloaded, so that a restore takes about the
//! longer of the download and the merge instead of both (design §3.8): a SQLite VFS,
//! `harmonylite-arriving`, which is the default VFS except that the reads of a file registered
//! as an [`Arrival`] wait until the download has written the bytes they ask for.
//!
//! Hand-written FFI, with a reason: rusqlite has no VFS API, and the shim is small (one wrapped
//! file type; every other VFS method is the default's). It is used only for the snapshot a
//! restore attaches read-only; the live database and every other file never go through it.
//!
//! Invariants:
//! - A read of an arriving file returns only bytes the download has written (they are final: the
//!   download only appends), or fails once the download failed or stalled and the bytes are not
//!   there. It never returns a zero-filled short read of bytes still to come, which SQLite would
//!   take for the file's end. Bytes written stay readable after a failure, so that the file can
//!   always be detached (SQLite reads its header to do so).
//! - Until the download is complete, the file's size is the one announced (SQLite trusts the
//!   page count in the header only up to the file's size); after, its real size.
//! - Memory maps are never used for an arriving file: `xFetch` declines, so every read goes
//!   through the wait.
//! - A wait ends: when the bytes arrive, when the download ends (a drop of its handle ends it as
//!   failed), or after [`STALL`] without a byte, which fails the arrival, so that the restore
//!   holding the write lock gives up instead of waiting without end.
//! - Files not registered (journals, WAL, any other database) are the default VFS's own files,
//!   opened in place with its methods: no wrapper, no cost.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::ffi;

/// The VFS's name, for `vfs=` in a URI filename.
pub const VFS: &str = "harmonylite-arriving";
const VFS_C: &CStr = c"harmonylite-arriving";
/// The URI parameter naming the [`Arrival`] a file is.
const PARAM: &CStr = c"arrival";

/// How long a read waits without any byte arriving before it fails the arrival.
pub const STALL: Duration = Duration::from_secs(60);

/// A file being downloaded: how much of it is written, how big it will be, and how the download
/// ended. Shared by the download (which advances it) and SQLite's reads (which wait on it).
#[derive(Default)]
pub struct Arrival {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// How long without a byte fails the arrival ([`STALL`]; shorter in tests).
    stall: Duration,
    /// The announced size, once known.
    total: Option<u64>,
    /// Bytes written to the file (from its start).
    written: u64,
    /// When the last byte arrived (or the arrival began).
    last: Option<Instant>,
    /// How it ended; the first ending wins.
    end: Option<Result<(), String>>,
}

impl Default for State {
    fn default() -> State {
        State {
            stall: STALL,
            total: None,
            written: 0,
            last: None,
            end: None,
        }
    }
}

impl State {
    /// Ends the arrival as failed if no byte arrived for `stall`; whether it did so now.
    fn stalled(&mut self) -> bool {
        if self.end.is_some() || self.last.is_none_or(|t| t.elapsed() < self.stall) {
            return false;
        }
        self.end = Some(Err(format!(
            "no byte of the snapshot arrived for {} s ({} read)",
            self.stall.as_secs_f64(),
            self.written
        )));
        true
    }
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (written, total, ended) = self.progress();
        write!(f, "Arrival({written}/{total:?}, ended: {ended})")
    }
}

impl Arrival {
    pub fn new() -> Arc<Arrival> {
        Arc::new(Arrival::default())
    }

    /// An arrival that fails after `stall` without a byte (tests).
    #[cfg(test)]
    pub fn with_stall(stall: Duration) -> Arc<Arrival> {
        let a = Arrival::default();
        a.state().stall = stall;
        Arc::new(a)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces the file's size (`None`: unknown; reads of its size then wait for the end).
    pub fn expect(&self, total: Option<u64>) {
        let mut s = self.state();
        s.total = total;
        s.last.get_or_insert_with(Instant::now);
        self.changed.notify_all();
    }

    /// `bytes` more are in the file (written, visible to other readers of it).
    pub fn advance(&self, bytes: u64) {
        let mut s = self.state();
        s.written += bytes;
        s.last = Some(Instant::now());
        self.changed.notify_all();
    }

    /// Ends the arrival (a no-op once ended): `Ok` when the file is complete, else why not.
    pub fn finish(&self, outcome: Result<(), String>) {
        let mut s = self.state();
        if s.end.is_none() {
            s.end = Some(outcome);
            self.changed.notify_all();
        }
    }

    /// Why the arrival failed, if it did (the download stops writing then).
    pub fn failed(&self) -> Option<String> {
        match &self.state().end {
            Some(Err(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// Fails the arrival if no byte arrived for [`STALL`] (for waits that poll instead of
    /// blocking here).
    pub fn check_stall(&self) {
        if self.state().stalled() {
            self.changed.notify_all();
        }
    }

    /// (bytes written, announced size, ended).
    pub fn progress(&self) -> (u64, Option<u64>, bool) {
        let s = self.state();
        (s.written, s.total, s.end.is_some())
    }

    /// Blocks until `pred` holds or the arrival ended; fails the arrival after [`STALL`]
    /// without progress. Returns the ending if there is one.
    fn wait(&self, pred: impl Fn(&State) -> bool) -> Option<Result<(), String>> {
        let mut s = self.state();
        loop {
            if let Some(end) = &s.end {
                return Some(end.clone());
            }
            if pred(&s) {
                return None;
            }
            if s.stalled() {
                self.changed.notify_all();
                continue;
            }
            let left = s
                .stall
                .saturating_sub(s.last.get_or_insert_with(Instant::now).elapsed());
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Blocks until the download ended; its outcome.
    ///
    /// # Errors
    /// Why the file is not complete.
    pub fn wait_end(&self) -> Result<(), String> {
        self.wait(|_| false).unwrap_or(Ok(()))
    }

    /// Blocks until `end` bytes are in the file or the download ended (`Ok`: read what there is).
    /// Bytes written before a download failed stay readable: SQLite reads the header again to
    /// end its use of the file (DETACH), which must not fail, or the file stays attached.
    ///
    /// # Errors
    /// The download failed or stalled before the bytes arrived.
    pub fn wait_for_bytes(&self, end: u64) -> Result<(), String> {
        match self.wait(|s| s.written >= end) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(_)) if self.state().written >= end => Ok(()),
            Some(Err(why)) => Err(why),
        }
    }

    /// The size to report: the announced one while the download runs and after it failed (the
    /// header's page count must stay consistent with it, or even DETACH finds the file
    /// corrupt), the real one once it is complete. With no announced size, waits for the end.
    fn size_to_report(&self) -> Option<u64> {
        match self.wait(|s| s.total.is_some()) {
            None | Some(Err(_)) => self.state().total,
            Some(Ok(())) => None,
        }
    }

    /// Registers this arrival for SQLite; the URI filename to attach `path` by (read-only,
    /// through [`VFS`]) while the returned registration lives.
    ///
    /// # Errors
    /// The VFS could not be registered with SQLite.
    pub fn register(
        self: &Arc<Self>,
        path: &std::path::Path,
    ) -> Result<(String, Registered), String> {
        register_vfs()?;
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        registry().insert(id, Arc::clone(self));
        let uri = format!(
            "file:{}?mode=ro&vfs={VFS}&{}={id}",
            uri_path(path),
            PARAM.to_string_lossy()
        );
        Ok((uri, Registered(id)))
    }
}

/// A snapshot file for a restore to attach: complete, or still arriving.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: std::path::PathBuf,
    /// The download still writing it, if any.
    pub arrival: Option<Arc<Arrival>>,
}

impl From<&std::path::Path> for SnapshotFile {
    fn from(path: &std::path::Path) -> SnapshotFile {
        SnapshotFile {
            path: path.to_path_buf(),
            arrival: None,
        }
    }
}

impl From<&std::path::PathBuf> for SnapshotFile {
    fn from(path: &std::path::PathBuf) -> SnapshotFile {
        SnapshotFile::from(path.as_path())
    }
}

impl SnapshotFile {
    /// The URI filename to attach it by (read-only), valid while the registration lives.
    ///
    /// # Errors
    /// The VFS could not be registered with SQLite.
    pub fn uri(&self) -> Result<(String, Option<Registered>), String> {
        match &self.arrival {
            Some(a) => a.register(&self.path).map(|(uri, r)| (uri, Some(r))),
            None => Ok((format!("file:{}?mode=ro", uri_path(&self.path)), None)),
        }
    }
}

/// `path` escaped for a URI filename.
pub fn uri_path(path: &std::path::Path) -> String {
    path.to_string_lossy()
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23")
}

/// Keeps an [`Arrival`] findable by SQLite's `xOpen`; files already open keep theirs.
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        registry().remove(&self.0);
    }
}

fn registry() -> std::sync::MutexGuard<'static, HashMap<u64, Arc<Arrival>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Arc<Arrival>>>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers the VFS once per process.
fn register_vfs() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    // SAFETY: called once; the VFS struct is leaked, so it lives as long as SQLite may use it.
    REGISTERED.get_or_init(|| unsafe { install() }).clone()
}

/// The wrapped file: SQLite's base (its methods pointer), our arrival, then the default VFS's
/// file in the rest of the allocation (`szOsFile` is ours plus the default's).
#[repr(C)]
struct Wrapped {
    base: ffi::sqlite3_file,
    arrival: *const Arrival,
}

/// Where the default VFS's file starts in a [`Wrapped`] allocation (8-byte aligned).
const INNER: usize = std::mem::size_of::<Wrapped>().div_ceil(8) * 8;

unsafe fn install() -> Result<(), String> {
    // SAFETY: sqlite3_vfs_find is thread-safe; the default VFS lives for the process.
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return Err("SQLite failed to initialize".into());
        }
        let default = ffi::sqlite3_vfs_find(std::ptr::null());
        if default.is_null() {
            return Err("SQLite has no default VFS".into());
        }
        // A copy of the default: every method but xOpen is its own, called with our struct,
        // which carries the same sizes; pAppData points to the default for xOpen.
        let mut vfs = *default;
        vfs.zName = VFS_C.as_ptr();
        vfs.szOsFile = INNER as c_int + (*default).szOsFile;
        vfs.pAppData = default.cast();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(open);
        let vfs = Box::leak(Box::new(vfs));
        match ffi::sqlite3_vfs_register(vfs, 0) {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(format!("SQLite refused the {VFS} VFS (code {rc})")),
        }
    }
}

fn default_of(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: only called on our VFS, whose pAppData is the default VFS.
    unsafe { (*vfs).pAppData.cast() }
}

/// The arrival a main database file is registered as, from its URI parameter.
unsafe fn arrival_of(name: *const c_char, flags: c_int) -> Option<Arc<Arrival>> {
    if name.is_null() || flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
        return None;
    }
    // SAFETY: `name` is the database filename SQLite passed to xOpen.
    let value = unsafe { ffi::sqlite3_uri_parameter(name, PARAM.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated parameter value inside SQLite's filename.
    let id: u64 = unsafe { CStr::from_ptr(value) }
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    registry().get(&id).cloned()
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let default = default_of(vfs);
    // SAFETY: SQLite hands us `file` of our szOsFile bytes; the default's xOpen gets either all
    // of it (not ours) or the part after our header (ours), both at least its szOsFile.
    unsafe {
        let Some(xopen) = (*default).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let Some(arrival) = arrival_of(name, flags) else {
            return xopen(default, name, file, flags, out_flags);
        };
        let wrapped = file.cast::<Wrapped>();
        (*wrapped).base.pMethods = std::ptr::null();
        (*wrapped).arrival = std::ptr::null();
        let rc = xopen(default, name, inner(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        (*wrapped).arrival = Arc::into_raw(arrival);
        (*wrapped).base.pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: within the allocation of szOsFile bytes (see `open`).
    unsafe { file.cast::<u8>().add(INNER).cast() }
}

/// The default VFS's methods of the wrapped file.
unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: a wrapped file's inner file was opened successfully, so it has methods, which the
    // default VFS keeps for the process.
    unsafe { &*(*inner(file)).pMethods }
}

unsafe fn arrival(file: *mut ffi::sqlite3_file) -> &'static Arrival {
    // SAFETY: set in `open`, released only in `close`, after which SQLite makes no call.
    unsafe { &*(*file.cast::<Wrapped>()).arrival }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Calls the inner file's method `$m` with `$args`, or returns `$missing` when it has none.
macro_rules! forward {
    ($file:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {
        // SAFETY: see `methods`; the arguments are SQLite's, passed on unchanged.
        unsafe {
            match methods($file).$m {
                Some(f) => f(inner($file) $(, $arg)*),
                None => $missing,
            }
        }
    };
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let rc = forward!(file, xClose, ffi::SQLITE_OK);
    // SAFETY: the reference `open` took; SQLite makes no call on the file after xClose.
    unsafe {
        let wrapped = file.cast::<Wrapped>();
        if !(*wrapped).arrival.is_null() {
            drop(Arc::from_raw((*wrapped).arrival));
            (*wrapped).arrival = std::ptr::null();
        }
    }
    rc
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let end = (offset.max(0) as u64).saturating_add(amount.max(0) as u64);
    // SAFETY: a wrapped file (only those have these methods).
    if let Err(why) = unsafe { arrival(file) }.wait_for_bytes(end) {
        tracing::debug!(reason = %why, offset, "snapshot read failed: the download did not complete");
        return ffi::SQLITE_IOERR_READ;
    }
    forward!(file, xRead, ffi::SQLITE_IOERR_READ, buf, amount, offset)
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    forward!(file, xWrite, ffi::SQLITE_IOERR_WRITE, buf, amount, offset)
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    forward!(file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    forward!(file, xSync, ffi::SQLITE_IOERR_FSYNC, flags)
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: a wrapped file; `size` is SQLite's out pointer.
    match unsafe { arrival(file) }.size_to_report() {
        Some(total) => {
            unsafe { *size = total as ffi::sqlite3_int64 };
            ffi::SQLITE_OK
        }
        None => forward!(file, xFileSize, ffi::SQLITE_IOERR_FSTAT, size),
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xLock, ffi::SQLITE_IOERR_LOCK, level)
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xUnlock, ffi::SQLITE_IOERR_UNLOCK, level)
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(
        file,
        xCheckReservedLock,
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        out
    )
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    forward!(file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(
        file,
        xShmMap,
        ffi::SQLITE_IOERR_SHMMAP,
        region,
        size,
        extend,
        out
    )
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    forward!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    forward!(file, xShmBarrier, ())
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    forward!(file, xShmUnmap, ffi::SQLITE_OK, delete)
}

/// Declines every memory map: reads must wait in `read`.
unsafe extern "C" fn fetch(
    _file: *mut ffi::sqlite3_file,
    _offset: ffi::sqlite3_int64,
    _amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's out pointer.
    unsafe { *out = std::ptr::null_mut() };
    ffi::SQLITE_OK
}

unsafe extern "C" fn unfetch(
    _file: *mut ffi::sqlite3_file,
    _offset: ffi::sqlite3_int64,
    _page: *mut c_void,
) -> c_int {
    ffi::SQLITE_OK
}

/// For tests: writes `bytes` to `dest` in the background, `piece` bytes at a time with a pause
/// between pieces, advancing `arrival`; with `fail_at`, ends it as failed ("connection reset")
/// before the piece that would reach that offset, else as complete.
#[cfg(test)]
pub fn trickle(
    bytes: &[u8],
    dest: &std::path::Path,
    arrival: &Arc<Arrival>,
    piece: usize,
    fail_at: Option<usize>,
) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let mut out = std::fs::File::create(dest).expect("create the arriving file");
    let (arrival, bytes) = (Arc::clone(arrival), bytes.to_vec());
    std::thread::spawn(move || {
        for (i, chunk) in bytes.chunks(piece).enumerate() {
            if fail_at.is_some_and(|at| i * piece >= at) {
                arrival.finish(Err("connection reset".into()));
                return;
            }
            out.write_all(chunk).expect("write");
            arrival.advance(chunk.len() as u64);
            std::thread::sleep(Duration::from_millis(1));
        }
        arrival.finish(Ok(()));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A database written out slowly by another thread reads whole and right through the VFS,
    /// while it arrives; a download that fails midway fails the reads instead of ending them.
    #[test]
    fn reads_wait_for_the_bytes_and_fail_with_the_download() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("source.db");
        {
            let c = Connection::open(&source).expect("open");
            c.execute_batch(
                "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
                 INSERT INTO t SELECT i, printf('%0200d', i) FROM n;",
            )
            .expect("fill");
        }
        let bytes = std::fs::read(&source).expect("read");
        for fail_at in [None, Some(bytes.len() / 2)] {
            let dest = dir
                .path()
                .join(format!("arriving-{}.db", fail_at.is_some()));
            let arrival = Arrival::new();
            arrival.expect(Some(bytes.len() as u64));
            let (uri, _registered) = arrival.register(&dest).expect("register");
            let writer = trickle(&bytes, &dest, &arrival, 16 * 1024, fail_at);
            let c = Connection::open_in_memory().expect("memory db");
            let got = c.execute("ATTACH DATABASE ?1 AS s", [&uri]).and_then(|_| {
                c.query_row("SELECT count(*), sum(length(v)) FROM s.t", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
            });
            writer.join().expect("writer");
            match fail_at {
                None => assert_eq!(got.expect("read while arriving"), (5000, 5000 * 200)),
                Some(_) => assert!(
                    got.is_err(),
                    "a failed download must fail the read: {got:?}"
                ),
            }
        }
    }

    /// A download that stops sending fails the arrival after the stall time: readers waiting for
    /// bytes get an error instead of waiting without end, bytes already there stay readable,
    /// and a poll (`check_stall`) ends it the same way.
    #[test]
    fn a_stalled_download_fails_its_readers_instead_of_blocking_them() {
        let a = Arrival::with_stall(Duration::from_millis(200));
        a.expect(Some(10_000));
        a.advance(4096);
        let started = Instant::now();
        let got = a.wait_for_bytes(8192);
        assert!(
            matches!(&got, Err(why) if why.contains("no byte of the snapshot arrived")),
            "{got:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(a.wait_for_bytes(4096), Ok(()));
        assert!(a.wait_end().is_err());
        let polled = Arrival::with_stall(Duration::from_millis(50));
        polled.expect(Some(1));
        polled.check_stall();
        assert!(polled.failed().is_none(), "not stalled yet");
        std::thread::sleep(Duration::from_millis(80));
        polled.check_stall();
        assert!(polled.failed().is_some());
    }

    /// Files that are not registered go straight to the default VFS, even through ours.
    #[test]
    fn unregistered_files_are_the_default_vfs_own() {
        register_vfs().expect("vfs");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plain.db");
        let c = Connection::open(&path).expect("open");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("write");
        drop(c);
        let c = Connection::open_in_memory().expect("memory db");
        c.execute(
            "ATTACH DATABASE ?1 AS p",
            [format!("file:{}?mode=ro&vfs={VFS}", uri_path(&path))],
        )
        .expect("attach");
        let n: i64 = c
            .query_row("SELECT count(*) FROM p.t", [], |r| r.get(0))
            .expect("read");
        assert_eq!(n, 1);
    }
}
