//! The embedded store: one SQLite file in WAL mode.
//!
//! Reads use connections of their own (see [`Readers`]). Writes go through one writer thread that owns one
//! connection and commits whatever is queued in a single transaction (group commit): under load,
//! one fsync covers many state transitions, and SQLite's single-writer rule never makes two of
//! our own writers wait on each other.
//!
//! All of it makes synchronous SQLite calls (rusqlite, on the same SQLite library as sqlx, which
//! only creates and migrates the file) with cached prepared statements: a batch costs the writer
//! one thread wake-up, not two per statement as an async driver's worker-thread round trips
//! would. Those round trips were the benchmark's bottleneck (BENCHMARKS.md).

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::decode::{self, BRANCH_COLUMNS, FINISHED, GLOBAL_COLUMNS};
use super::{
    AddBranches, Guard, KvEntry, Lease, ListQuery, Result, StatusChange, Store, StoreError, branches_to_add,
    check_branches, check_change, check_key, check_new, check_text,
};
use crate::engine::BranchUpdate;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus};

// Every dynamic SQL string below is assembled from constants of this file and of `decode`, never
// from input.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Most writes committed together.
const MAX_BATCH: usize = 512;

/// How long a connection waits for a lock held by another process sharing the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepared statements the writer's cache holds (it uses about twenty distinct ones besides the
/// ones [`Writer`] keeps).
const STATEMENT_CACHE: usize = 64;

/// SQLite `synchronous` setting: how hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints: survives process crashes, may lose the last commits on power loss.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: std::sync::Arc<Readers>,
    writer: mpsc::Sender<Job>,
}

#[derive(Debug)]
struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Reply>>,
}

#[derive(Debug)]
enum Write {
    Create(GlobalTrans, Vec<Branch>),
    ChangeStatus(StatusChange),
    ChangeStatusAndLoad(StatusChange),
    AddBranches(String, Vec<Branch>),
    UpdateBranches(Guard, Vec<BranchUpdate>, Millis),
    Claim(String, Lease, Millis),
    ClaimDue(Lease, Millis, i64),
    ExtendLease(Guard, Millis),
    Release(Guard, Millis, i64, Millis),
    ResetNextCronTime(String, Millis),
    ResetCronTimes(Millis, Millis, i64),
    ReclaimLeases(String, Millis),
    KvCreate(String, String, String, Millis),
    KvUpdate(String, String, String, i64, Millis),
    KvDelete(String, String),
    PurgeFinished(Millis, i64),
}

#[derive(Debug)]
enum Reply {
    Flag(bool),
    Gids(Vec<String>),
    Added(AddBranches),
    Count(u64),
    Loaded(Option<Box<(GlobalTrans, Vec<Branch>)>>),
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(path: &str, synchronous: Synchronous) -> Result<Self> {
        Self::open_with(path, synchronous, true).await
    }

    /// Opens (creating if needed) the database file, running the migrations when `migrate`.
    pub async fn open_with(path: &str, synchronous: Synchronous, migrate: bool) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT);
        // Nothing touches the file before this process knows it is the only one using it.
        let lock = lock_file(options.get_filename())?;
        // The first connection creates the file, switches it to WAL and migrates it.
        let mut setup = SqliteConnection::connect_with(&options).await?;
        if migrate {
            MIGRATOR
                .run(&mut setup)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        }
        let file = options.get_filename().to_path_buf();
        setup.close().await?;
        let readers = std::sync::Arc::new(Readers {
            _lock: lock,
            idle: std::sync::Mutex::new(vec![open_reader(&file)?]),
            file: file.clone(),
        });
        let (sender, receiver) = mpsc::channel(4096);
        let (opened, open_result) = oneshot::channel();
        std::thread::Builder::new()
            .name("kubetx-sqlite-writer".to_owned())
            .spawn(move || match open_writer(&file, synchronous) {
                Ok(conn) => {
                    let _ = opened.send(Ok(()));
                    run_writer(&conn, receiver);
                }
                Err(error) => {
                    let _ = opened.send(Err(error));
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer: {e}")))?;
        open_result.await.map_err(|_| StoreError::Closed)??;
        Ok(SqliteStore {
            readers,
            writer: sender,
        })
    }

    async fn write(&self, write: Write) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job { write, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn write_flag(&self, write: Write) -> Result<bool> {
        match self.write(write).await? {
            Reply::Flag(flag) => Ok(flag),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }
}

/// Takes the exclusive lock of `<file>.lock` for as long as the store lives, so that this
/// process knows it is the only one using the file: every lease it finds at start belongs to a
/// dead process (see [`Store::reclaim_leases`]). A second process is refused here, before it
/// writes anything. The lock is the kernel's and goes with the process, however it ends.
fn lock_file(file: &std::path::Path) -> Result<std::fs::File> {
    let mut path = file.as_os_str().to_owned();
    path.push(".lock");
    let path = std::path::PathBuf::from(path);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open the lock file {}: {e}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another kubetx process (it holds {}); stop that process or use another database file",
            file.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

fn open_writer(file: &std::path::Path, synchronous: Synchronous) -> Result<Connection> {
    // The connection never leaves its thread, so SQLite's own mutexes are not needed.
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// The writer thread: takes whatever is queued (at least one job), commits it, answers, repeats
/// until every sender is gone. Writes that arrive during a commit form the next batch.
fn run_writer(conn: &Connection, mut jobs: mpsc::Receiver<Job>) {
    let conn = &Writer::new(conn);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = jobs.blocking_recv() {
        batch.push(job);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        for (reply, result) in commit_batch(conn, &mut batch) {
            // The caller may have given up waiting; nothing to do then.
            let _ = reply.send(result);
        }
    }
}

type Answer = (oneshot::Sender<Result<Reply>>, Result<Reply>);

/// The writer's connection with its hottest statements prepared once and kept. A
/// `prepare_cached` statement costs a hash of its SQL text twice per use (taken from the cache,
/// put back), a twentieth of kubetx's instructions per saga (BENCHMARKS.md, issue 15); the
/// others still go through the cache (the `Deref` to the connection).
struct Writer<'c> {
    conn: &'c Connection,
    hot: std::cell::RefCell<[Option<rusqlite::Statement<'c>>; Hot::COUNT]>,
    /// The branch `INSERT` of `n + 1` rows at index `n`.
    branch_inserts: std::cell::RefCell<[Option<rusqlite::Statement<'c>>; ROWS_PER_INSERT]>,
}

/// The statements [`Writer`] keeps: every saga runs each of them.
#[derive(Debug, Clone, Copy)]
enum Hot {
    Begin,
    Commit,
    InsertGlobal,
    ChangeStatus,
    GuardHolds,
    UpdateBranch,
}

impl Hot {
    const COUNT: usize = 6;

    fn sql(self) -> &'static str {
        match self {
            Hot::Begin => "BEGIN IMMEDIATE",
            Hot::Commit => "COMMIT",
            Hot::InsertGlobal => {
                "INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, custom_data, \
                 options, create_time, update_time, finish_time, rollback_time, next_cron_time, \
                 next_cron_interval, owner, result, rollback_reason, ext_data) \
                 VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (gid) DO NOTHING"
            }
            Hot::ChangeStatus => {
                "UPDATE trans_global SET status = ?1, update_time = ?2, \
                 rollback_reason = COALESCE(?3, rollback_reason), result = COALESCE(?4, result), \
                 custom_data = COALESCE(?5, custom_data), owner = COALESCE(?6, owner), \
                 next_cron_time = COALESCE(?7, next_cron_time), \
                 finish_time = CASE WHEN ?1 = 'succeed' THEN ?2 ELSE finish_time END, \
                 rollback_time = CASE WHEN ?1 = 'failed' THEN ?2 ELSE rollback_time END \
                 WHERE gid = ?8 AND status = ?9 AND (?10 IS NULL OR owner = ?10) \
                 AND (?11 IS NULL OR trans_type = ?11)"
            }
            Hot::GuardHolds => "SELECT 1 FROM trans_global WHERE gid = ? AND status = ? AND owner = ?",
            Hot::UpdateBranch => {
                "UPDATE trans_branch_op SET status = ?1, update_time = ?2, \
                 finish_time = CASE WHEN ?1 = 'succeed' THEN ?3 ELSE finish_time END, \
                 rollback_time = CASE WHEN ?1 = 'failed' THEN ?3 ELSE rollback_time END \
                 WHERE gid = ?4 AND branch_id = ?5 AND op = ?6"
            }
        }
    }
}

impl<'c> Writer<'c> {
    fn new(conn: &'c Connection) -> Self {
        Writer {
            conn,
            hot: std::cell::RefCell::new(Default::default()),
            branch_inserts: std::cell::RefCell::new(Default::default()),
        }
    }

    /// Runs `use_it` on the kept statement `which`, preparing it on first use.
    fn hot<T>(
        &self,
        which: Hot,
        use_it: impl FnOnce(&mut rusqlite::Statement<'c>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut hot = self.hot.borrow_mut();
        self.kept(&mut hot[which as usize], || Cow::Borrowed(which.sql()), use_it)
    }

    /// Runs `use_it` on the kept branch `INSERT` of `rows` rows (1 to [`ROWS_PER_INSERT`]).
    fn insert_statement<T>(
        &self,
        rows: usize,
        use_it: impl FnOnce(&mut rusqlite::Statement<'c>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut inserts = self.branch_inserts.borrow_mut();
        let slot = inserts
            .get_mut(rows.wrapping_sub(1))
            .ok_or_else(|| StoreError::Corrupt(format!("no branch insert of {rows} rows")))?;
        self.kept(slot, || Cow::Owned(insert_branches_sql(rows)), use_it)
    }

    /// Runs `use_it` on the statement in `slot`, preparing it from `sql` first if empty.
    /// (`use_it` never comes back to the writer, so no cell is ever borrowed twice.)
    fn kept<T>(
        &self,
        slot: &mut Option<rusqlite::Statement<'c>>,
        sql: impl FnOnce() -> Cow<'static, str>,
        use_it: impl FnOnce(&mut rusqlite::Statement<'c>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        if slot.is_none() {
            *slot = Some(self.conn.prepare(&sql())?);
        }
        match slot {
            Some(statement) => Ok(use_it(statement)?),
            None => Err(StoreError::Corrupt("statement not prepared".to_owned())),
        }
    }
}

impl std::ops::Deref for Writer<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// Runs a batch in one transaction; every write gets its own result, or the commit's error.
fn commit_batch(conn: &Writer<'_>, batch: &mut Vec<Job>) -> Vec<Answer> {
    if let Err(error) = conn.hot(Hot::Begin, |begin| begin.execute([])) {
        return batch.drain(..).map(|job| (job.reply, Err(error.clone()))).collect();
    }
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut jobs = batch.drain(..);
    for job in jobs.by_ref() {
        match apply(conn, job.write) {
            Err(error) if conn.is_autocommit() => {
                // SQLite gave up the whole transaction (disk full, I/O error): nothing of this
                // batch was written, and the rest must not run outside a transaction.
                answers.push((job.reply, Err(error.clone())));
                return fail_all(answers, jobs, &error);
            }
            result => answers.push((job.reply, result)),
        }
    }
    drop(jobs);
    match conn.hot(Hot::Commit, |commit| commit.execute([])) {
        Ok(_) => answers,
        Err(error) => {
            // Best effort: leave the connection usable for the next batch.
            let _ = run(conn, "ROLLBACK");
            fail_all(answers, std::iter::empty(), &error)
        }
    }
}

fn fail_all(answers: Vec<Answer>, rest: impl Iterator<Item = Job>, error: &StoreError) -> Vec<Answer> {
    answers
        .into_iter()
        .map(|(reply, _)| reply)
        .chain(rest.map(|job| job.reply))
        .map(|reply| (reply, Err(error.clone())))
        .collect()
}

/// Runs one parameterless statement through the statement cache.
fn run(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Undoes a create whose branch rows failed to insert (that one statement SQLite has undone by
/// itself): deletes the global row the create has just inserted, which leaves the database as
/// before the write. Cheaper than a savepoint around every create, which copies each page the
/// create touches into the statement journal first (BENCHMARKS.md, issue 15). If the delete
/// fails too, the whole batch is given up (the caller sees autocommit mode and fails every write).
fn undo_create(conn: &Connection, gid: &str) {
    if conn.is_autocommit() {
        // SQLite gave up the whole transaction itself: nothing of the create remains.
        return;
    }
    let undone = conn
        .prepare_cached("DELETE FROM trans_global WHERE gid = ?")
        .and_then(|mut statement| statement.execute([gid]));
    if undone.is_err() {
        give_up_batch(conn);
    }
}

/// Gives up the whole batch after a write failed half-way and cannot be undone alone: the
/// caller sees the connection in autocommit mode and fails every write of the batch.
fn give_up_batch(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = run(conn, "ROLLBACK");
    }
}

/// Runs a write of several statements all or nothing. (A single statement needs no savepoint:
/// SQLite undoes a failed statement by itself and the batch goes on.)
fn atomically<T>(conn: &Writer<'_>, write: impl FnOnce(&Writer<'_>) -> Result<T>) -> Result<T> {
    run(conn, "SAVEPOINT w")?;
    let result = write(conn);
    if result.is_err()
        && let Err(error) = run(conn, "ROLLBACK TO w")
    {
        // The write cannot be undone alone: give up the whole batch (the caller sees the
        // connection back in autocommit mode and fails every write of it).
        let _ = run(conn, "ROLLBACK");
        return Err(error);
    }
    run(conn, "RELEASE w")?;
    result
}

fn apply(conn: &Writer<'_>, write: Write) -> Result<Reply> {
    match write {
        Write::Create(global, branches) => {
            let options = serde_json::to_string(&global.options).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if branches.len() > ROWS_PER_INSERT {
                // Several branch statements: the savepoint undoes the first ones if a later fails.
                return atomically(conn, |conn| create(conn, &global, &options, &branches));
            }
            create(conn, &global, &options, &branches)
        }
        Write::ChangeStatus(change) => Ok(Reply::Flag(change_status(conn, &change)?)),
        Write::ChangeStatusAndLoad(change) => {
            if !change_status(conn, &change)? {
                return Ok(Reply::Loaded(None));
            }
            let global = query_all(
                conn,
                &format!("SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE gid = ?"),
                [&change.gid],
                |row| decode::global(row),
            )?
            .pop();
            let branches = load_branches(conn, &change.gid)?;
            Ok(Reply::Loaded(global.map(|global| Box::new((global, branches)))))
        }
        Write::AddBranches(gid, branches) => Ok(Reply::Added(atomically(conn, |conn| {
            add_branches(conn, &gid, &branches)
        })?)),
        Write::UpdateBranches(guard, updates, now) => {
            if !guard_holds(conn, &guard)? {
                return Ok(Reply::Flag(false));
            }
            if updates.len() == 1 {
                record_branches(conn, &guard.gid, &updates, now)?;
            } else {
                atomically(conn, |conn| record_branches(conn, &guard.gid, &updates, now))?;
            }
            Ok(Reply::Flag(true))
        }
        Write::Claim(gid, lease, now) => {
            let done = conn
                .prepare_cached(&format!(
                    "UPDATE trans_global SET owner = ?1, next_cron_time = ?2, update_time = ?3 \
                     WHERE gid = ?4 AND status NOT IN {FINISHED} AND (owner = '' OR next_cron_time <= ?3)"
                ))?
                .execute(params![lease.owner, lease.until, now, gid])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::ClaimDue(lease, now, limit) => {
            let mut statement = conn.prepare_cached(&format!(
                "UPDATE trans_global SET owner = ?1, next_cron_time = ?2, update_time = ?3 \
                 WHERE id IN (SELECT id FROM trans_global WHERE status NOT IN {FINISHED} AND next_cron_time <= ?3 \
                 ORDER BY next_cron_time LIMIT ?4) RETURNING gid"
            ))?;
            let gids = statement
                .query_map(params![lease.owner, lease.until, now, limit], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(Reply::Gids(gids))
        }
        Write::ExtendLease(guard, until) => {
            let done = conn
                .prepare_cached(
                    "UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ? AND status = ?",
                )?
                .execute(params![until, guard.gid, guard.owner, guard.status.as_str()])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::Release(guard, next_cron_time, interval, now) => {
            let done = conn
                .prepare_cached(
                    "UPDATE trans_global SET owner = '', next_cron_time = ?, next_cron_interval = ?, \
                     update_time = ? WHERE gid = ? AND owner = ? AND status = ?",
                )?
                .execute(params![
                    next_cron_time,
                    interval,
                    now,
                    guard.gid,
                    guard.owner,
                    guard.status.as_str()
                ])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::ResetNextCronTime(gid, now) => {
            // A leased transaction is being driven right now; making it due would invite a
            // second driver, so only parked ones move.
            conn.prepare_cached("UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ''")?
                .execute(params![now, gid])?;
            let exists = conn
                .prepare_cached("SELECT 1 FROM trans_global WHERE gid = ?")?
                .exists(params![gid])?;
            Ok(Reply::Flag(exists))
        }
        Write::ResetCronTimes(after, now, limit) => {
            let done = conn
                .prepare_cached(&format!(
                    "UPDATE trans_global SET next_cron_time = ?1 WHERE id IN (SELECT id FROM trans_global \
                     WHERE status NOT IN {FINISHED} AND owner = '' AND next_cron_time > ?2 LIMIT ?3)"
                ))?
                .execute(params![now, after, limit])?;
            Ok(Reply::Count(done as u64))
        }
        Write::KvCreate(cat, key, value, now) => {
            let done = conn
                .prepare_cached(
                    "INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES (?, ?, ?, 1, ?, ?) \
                     ON CONFLICT (cat, k) DO NOTHING",
                )?
                .execute(params![cat, key, value, now, now])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::ReclaimLeases(owner, now) => {
            // The file lock proves that no other process uses the file: every other lease is a
            // dead process's.
            let done = conn
                .prepare_cached(&format!(
                    "UPDATE trans_global SET owner = '', next_cron_time = ?1 \
                     WHERE status NOT IN {FINISHED} AND owner <> '' AND owner <> ?2"
                ))?
                .execute(params![now, owner])?;
            Ok(Reply::Count(done as u64))
        }
        Write::KvUpdate(cat, key, value, version, now) => {
            let done = conn
                .prepare_cached(
                    "UPDATE kv SET v = ?, version = version + 1, update_time = ? \
                     WHERE cat = ? AND k = ? AND version = ?",
                )?
                .execute(params![value, now, cat, key, version])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::KvDelete(cat, key) => {
            let done = conn
                .prepare_cached("DELETE FROM kv WHERE cat = ? AND k = ?")?
                .execute(params![cat, key])?;
            Ok(Reply::Flag(done == 1))
        }
        Write::PurgeFinished(before, limit) => atomically(conn, |conn| {
            // One writer runs this alone, so both statements see the same victims.
            let victims = format!(
                "SELECT {{}} FROM trans_global WHERE status IN {FINISHED} AND update_time < ?1 \
                 ORDER BY update_time, id LIMIT ?2"
            );
            conn.prepare_cached(&format!(
                "DELETE FROM trans_branch_op WHERE gid IN ({})",
                victims.replace("{}", "gid")
            ))?
            .execute(params![before, limit])?;
            let deleted = conn
                .prepare_cached(&format!(
                    "DELETE FROM trans_global WHERE id IN ({})",
                    victims.replace("{}", "id")
                ))?
                .execute(params![before, limit])?;
            Ok(Reply::Count(deleted as u64))
        }),
    }
}

/// Inserts a transaction and its branch rows (at most [`ROWS_PER_INSERT`] of them: one
/// statement), unless the gid exists. A failed branch insert is undone with the create.
fn create(conn: &Writer<'_>, global: &GlobalTrans, options: &str, branches: &[Branch]) -> Result<Reply> {
    let inserted = conn.hot(Hot::InsertGlobal, |insert| {
        insert.execute(params![
            global.gid,
            global.trans_type.as_str(),
            global.status.as_str(),
            global.query_prepared,
            global.protocol,
            global.custom_data,
            options,
            global.create_time,
            global.update_time,
            global.finish_time,
            global.rollback_time,
            global.next_cron_time,
            global.next_cron_interval,
            global.owner,
            global.result,
            global.rollback_reason,
            global.ext_data,
        ])
    })? == 1;
    if inserted && let Err(error) = insert_branches(conn, branches) {
        undo_create(conn, &global.gid);
        return Err(error);
    }
    Ok(Reply::Flag(inserted))
}

/// A conditional status change, with the branch outcomes it records.
fn change_status(conn: &Writer<'_>, change: &StatusChange) -> Result<bool> {
    let (owner, next_cron_time) = change.owner_and_expiry();
    let done = conn.hot(Hot::ChangeStatus, |update| {
        update.execute(params![
            change.to.as_str(),
            change.now,
            change.rollback_reason,
            change.result,
            change.custom_data,
            owner,
            next_cron_time,
            change.gid,
            change.from.as_str(),
            change.owner,
            change.trans_type.map(|t| t.as_str()),
        ])
    })? == 1;
    // The branch updates set a status and times by unique key: no constraint can refuse them,
    // only the disk. Should one fail all the same, the status change before it cannot be undone
    // alone, and the whole batch is given up (no savepoint per change: BENCHMARKS.md, issue 15).
    if done
        && !change.branch_updates.is_empty()
        && let Err(error) = record_branches(conn, &change.gid, &change.branch_updates, change.now)
    {
        give_up_batch(conn);
        return Err(error);
    }
    Ok(done)
}

fn load_branches(conn: &Connection, gid: &str) -> Result<Vec<Branch>> {
    query_all(
        conn,
        &format!("SELECT {BRANCH_COLUMNS} FROM trans_branch_op WHERE gid = ? ORDER BY id"),
        [gid],
        |row| decode::branch(row),
    )
}

fn guard_holds(conn: &Writer<'_>, guard: &Guard) -> Result<bool> {
    conn.hot(Hot::GuardHolds, |select| {
        select.exists(params![guard.gid, guard.status.as_str(), guard.owner])
    })
}

fn record_branches(conn: &Writer<'_>, gid: &str, updates: &[BranchUpdate], now: Millis) -> Result<()> {
    conn.hot(Hot::UpdateBranch, |statement| {
        for update in updates {
            statement.execute(params![
                update.status.as_str(),
                now,
                update.at,
                gid,
                update.branch_id,
                update.op
            ])?;
        }
        Ok(())
    })
}

/// Branch rows per INSERT statement. A saga's rows go in one statement (a 2-step saga has 4), so
/// SQLite's per-statement work (bind, step, halt) is paid once, not per row; longer lists take
/// several. The writer keeps each of these statements prepared.
const ROWS_PER_INSERT: usize = 16;

/// Inserts branch rows; they get ids in the order given.
fn insert_branches(conn: &Writer<'_>, branches: &[Branch]) -> Result<()> {
    for chunk in branches.chunks(ROWS_PER_INSERT) {
        let statuses: Vec<&str> = chunk.iter().map(|b| b.status.as_str()).collect();
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 10);
        for (branch, status) in chunk.iter().zip(&statuses) {
            values.extend([
                &branch.gid as &dyn rusqlite::ToSql,
                &branch.url,
                &branch.bin_data,
                &branch.branch_id,
                &branch.op,
                status,
                &branch.create_time,
                &branch.update_time,
                &branch.finish_time,
                &branch.rollback_time,
            ]);
        }
        conn.insert_statement(chunk.len(), |insert| insert.execute(rusqlite::params_from_iter(values)))?;
    }
    Ok(())
}

/// `INSERT` of `rows` branch rows.
fn insert_branches_sql(rows: usize) -> String {
    let row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = String::from(
        "INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, update_time, \
         finish_time, rollback_time) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql
}

fn add_branches(conn: &Writer<'_>, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM trans_global WHERE gid = ?")?
        .query_row(params![gid], |row| row.get(0))
        .optional()?;
    let status = status.map(|s| decode::parse_status(&s)).transpose()?;
    if status != Some(TransStatus::Prepared) {
        return Ok(AddBranches::WrongStatus(status));
    }
    let stored = query_all(
        conn,
        "SELECT branch_id, op, url, bin_data, status FROM trans_branch_op WHERE gid = ?",
        [gid],
        |row| decode::stored_branch(row),
    )?;
    let missing = match branches_to_add(branches, &stored) {
        Ok(missing) => missing,
        Err(answer) => return Ok(answer),
    };
    insert_branches(conn, &missing)?;
    Ok(AddBranches::Added)
}

/// Runs a query and decodes every row.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: fn(&rusqlite::Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    conn.prepare_cached(sql)?
        .query_map(params, |row| Ok(decode(row)))?
        .map(|row| row?)
        .collect()
}

/// Reader connections. Point lookups (a transaction, its branches, a key) run on the caller's
/// thread: in WAL mode a reader never waits for the writer, and a lookup in the page cache
/// takes microseconds, less than handing it to another thread would. Scans go to the blocking
/// pool. A connection is taken for one call and put back; there are at most as many as calls
/// ever ran at once.
#[derive(Debug)]
struct Readers {
    /// The file lock, held while any handle of the store lives.
    _lock: std::fs::File,
    file: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
}

impl Readers {
    fn with<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let idle = self.idle.lock().map(|mut idle| idle.pop()).unwrap_or_default();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.file)?,
        };
        let result = read(&conn);
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        result
    }
}

fn open_reader(file: &std::path::Path) -> Result<Connection> {
    // Read-write although it only reads: a read-only connection cannot open a WAL database
    // whose shared-memory index does not exist yet.
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl SqliteStore {
    /// Runs a read that may take a while (a scan) off the async threads.
    async fn scan<T: Send + 'static>(&self, read: impl FnOnce(&Connection) -> Result<T> + Send + 'static) -> Result<T> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(read))
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        self.readers
            .with(|conn| Ok(conn.prepare_cached("SELECT 1")?.exists([])?))?;
        Ok(())
    }

    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        check_new(global, branches)?;
        self.write_flag(Write::Create(global.clone(), branches.to_vec())).await
    }

    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        self.readers.with(|conn| {
            Ok(query_all(
                conn,
                &format!("SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE gid = ?"),
                [gid],
                |row| decode::global(row),
            )?
            .pop())
        })
    }

    async fn branches(&self, gid: &str) -> Result<Vec<Branch>> {
        self.readers.with(|conn| load_branches(conn, gid))
    }
    async fn change_status(&self, change: &StatusChange) -> Result<bool> {
        check_change(change)?;
        self.write_flag(Write::ChangeStatus(change.clone())).await
    }

    async fn change_status_and_load(&self, change: &StatusChange) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
        check_change(change)?;
        match self.write(Write::ChangeStatusAndLoad(change.clone())).await? {
            Reply::Loaded(loaded) => Ok(loaded.map(|loaded| *loaded)),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
        check_key("gid", gid)?;
        check_branches(branches)?;
        match self
            .write(Write::AddBranches(gid.to_owned(), branches.to_vec()))
            .await?
        {
            Reply::Added(added) => Ok(added),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool> {
        self.write_flag(Write::UpdateBranches(guard.clone(), updates.to_vec(), now))
            .await
    }

    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool> {
        self.write_flag(Write::Claim(gid.to_owned(), lease.clone(), now)).await
    }

    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        match self.write(Write::ClaimDue(lease.clone(), now, limit)).await? {
            Reply::Gids(gids) => Ok(gids),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn reclaim_leases(&self, _instance: &str, owner: &str, now: Millis) -> Result<u64> {
        match self.write(Write::ReclaimLeases(owner.to_owned(), now)).await? {
            Reply::Count(count) => Ok(count),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool> {
        self.write_flag(Write::ExtendLease(guard.clone(), until)).await
    }

    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        self.write_flag(Write::Release(guard.clone(), next_cron_time, interval, now))
            .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        use rusqlite::types::Value;
        let mut sql = format!("SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE 1 = 1");
        let mut values: Vec<Value> = Vec::new();
        let mut filter = |condition: &str, value: Value| {
            sql.push_str(condition);
            values.push(value);
        };
        if let Some(before) = query.before_id {
            filter(" AND id < ?", before.into());
        }
        if let Some(status) = query.status {
            filter(" AND status = ?", status.as_str().to_owned().into());
        }
        if let Some(trans_type) = query.trans_type {
            filter(" AND trans_type = ?", trans_type.as_str().to_owned().into());
        }
        if let Some(from) = query.created_from {
            filter(" AND create_time >= ?", from.into());
        }
        if let Some(to) = query.created_to {
            filter(" AND create_time <= ?", to.into());
        }
        if let Some((low, high)) = query.gid_range() {
            filter(" AND gid >= ?", low.into());
            filter(" AND gid < ?", high.into());
        }
        filter(" ORDER BY id DESC LIMIT ?", query.limit.into());
        self.scan(move |conn| {
            query_all(conn, &sql, rusqlite::params_from_iter(values), |row| {
                decode::global(row)
            })
        })
        .await
    }

    async fn list_due(&self, after: Option<super::DuePosition>, limit: i64) -> Result<Vec<GlobalTrans>> {
        let (time, id) = after.map_or((i64::MIN, i64::MIN), |a| (a.next_cron_time, a.id));
        self.scan(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE status NOT IN {FINISHED} \
                     AND (next_cron_time > ?1 OR (next_cron_time = ?1 AND id > ?2)) ORDER BY next_cron_time, id LIMIT ?3"
                ),
                rusqlite::params![time, id, limit],
                |row| decode::global(row),
            )
        })
        .await
    }

    async fn unfinished_summary(&self) -> Result<super::UnfinishedSummary> {
        self.scan(|conn| {
            let mut statement = conn.prepare_cached(super::sql::SUMMARY_SQL)?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<Vec<(String, i64, Option<i64>)>>>()?;
            Ok(super::sql::summary_from(rows))
        })
        .await
    }

    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool> {
        self.write_flag(Write::ResetNextCronTime(gid.to_owned(), now)).await
    }

    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        match self.write(Write::ResetCronTimes(after, now, limit)).await? {
            Reply::Count(count) => Ok(count),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>> {
        self.readers.with(|conn| {
            Ok(query_all(
                conn,
                "SELECT id, cat, k, v, version, create_time, update_time FROM kv WHERE cat = ? AND k = ?",
                [cat, key],
                |row| decode::kv(row),
            )?
            .pop())
        })
    }

    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>> {
        let cat = cat.to_owned();
        self.scan(move |conn| {
            query_all(
                conn,
                "SELECT id, cat, k, v, version, create_time, update_time FROM kv WHERE cat = ? AND id > ? \
                 ORDER BY id LIMIT ?",
                params![cat, after_id, limit],
                |row| decode::kv(row),
            )
        })
        .await
    }

    async fn kv_create(&self, cat: &str, key: &str, value: &str, now: Millis) -> Result<bool> {
        check_key("category", cat)?;
        check_key("key", key)?;
        check_text("value", value)?;
        self.write_flag(Write::KvCreate(cat.to_owned(), key.to_owned(), value.to_owned(), now))
            .await
    }

    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool> {
        check_text("value", value)?;
        self.write_flag(Write::KvUpdate(
            cat.to_owned(),
            key.to_owned(),
            value.to_owned(),
            version,
            now,
        ))
        .await
    }

    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool> {
        self.write_flag(Write::KvDelete(cat.to_owned(), key.to_owned())).await
    }

    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64> {
        match self.write(Write::PurgeFinished(before, limit)).await? {
            Reply::Count(count) => Ok(count),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }
}
