//! Group commit for PostgreSQL: a writer task runs the writes queued for it (each write goes to
//! one of the writers by its gid; one with the default pool) in one database transaction and
//! answers each caller only once that transaction has committed.
//!
//! - **One statement per batch on the hot path.** The creates and status changes of distinct
//!   transactions, all a saga writes, go into one statement ([`Bulk`]); a batch of nothing
//!   else is that statement alone, committing by itself: one round trip and one WAL flush for
//!   the whole batch.
//! - **Other writes in order.** Claims, lease writes, branch registrations, a second write of
//!   one gid and key-value writes run one after another in the batch's transaction (BEGIN,
//!   the bulk statement, each of them, COMMIT): sqlx cannot pipeline, so each is a round trip.
//! - **No savepoint on the happy path.** A failing statement aborts the whole PostgreSQL
//!   transaction, so a batch runs optimistically without savepoints (each one would cost two
//!   more round trips per write); when a write fails, the transaction is rolled back, that write
//!   alone gets its error, and the others run again, now each under a savepoint so that a
//!   second failure cannot undo its neighbours. Nothing is acknowledged before its commit, so
//!   running a write again is invisible to its caller.
//! - **One lock order.** Writes are sorted by the row they lock (the gid, then KV keys) before
//!   they run, so two batches (of two replicas sharing the database) always take their row
//!   locks in the same order and cannot deadlock on each other. A deadlock with something else
//!   (a bulk statement on the pool, a person's session) or a serialization failure is retried
//!   in a later transaction, up to the attempts the pool's calls get.
//! - **A failed commit fails the batch.** When BEGIN, COMMIT, a savepoint or the connection
//!   fails, every write of the round gets the error: a caller never sees success for a write
//!   that may not be durable.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};

use super::pg_bulk::Bulk;
use super::postgres::{Reply, Write};
use super::sql::{Reachability, is_connectivity};
use super::{Result, StoreError};

/// Writes queued for the writer at most (callers wait for room beyond this).
const QUEUE: usize = 4096;

/// The sending side of the writer tasks.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    /// One queue per writer task; a write goes to the one its lock key hashes to.
    shards: Arc<[mpsc::Sender<Job>]>,
}

/// A queued write and where its answer goes.
struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Reply>>,
    /// Which attempt the next run is (1 first); bounded like the pool's retries.
    attempt: usize,
}

impl Writer {
    /// Starts `writers` writer tasks on `pool` (theirs, a connection each), each committing up
    /// to `max_batch` writes at a time. The tasks end when every handle is gone.
    ///
    /// Several writers overlap their round trips (a batch's statements run one after another,
    /// each waiting for the server); each write of one transaction or key goes to the same
    /// writer, so writes of one row keep their order and two writers of this process never
    /// wait for each other's row locks.
    pub(super) fn start(pool: PgPool, reach: Arc<Reachability>, writers: usize, max_batch: usize) -> Writer {
        let shards = (0..writers.max(1))
            .map(|_| {
                let (jobs, queue) = mpsc::channel(QUEUE);
                tokio::spawn(run(pool.clone(), reach.clone(), queue, max_batch.max(1)));
                jobs
            })
            .collect();
        Writer { shards }
    }

    /// Queues `write` and waits until it is committed (or failed).
    pub(super) async fn write(&self, write: Write) -> Result<Reply> {
        let shard = {
            let mut hasher = std::hash::DefaultHasher::new();
            write.lock_key().hash(&mut hasher);
            (hasher.finish() % self.shards.len() as u64) as usize
        };
        let (reply, answer) = oneshot::channel();
        self.shards[shard]
            .send(Job {
                write,
                reply,
                attempt: 1,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// The writer task: takes whatever is queued (at least one write, at most `max_batch`), commits
/// it, answers, repeats. Writes that arrive during a commit form the next batch.
async fn run(pool: PgPool, reach: Arc<Reachability>, mut queue: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        // Stable: writes of one gid keep their arrival order.
        batch.sort_by(|a, b| a.write.lock_key().cmp(&b.write.lock_key()));
        commit_batch(&pool, &reach, std::mem::take(&mut batch)).await;
    }
}

/// How one transaction over a batch ended.
enum Round {
    /// Committed; each write's own result (an error only under savepoints).
    Committed(Vec<Result<Reply, sqlx::Error>>),
    /// Write `index` failed without a savepoint: the transaction was rolled back.
    WriteFailed(usize, sqlx::Error),
    /// The bulk statement failed: the transaction was rolled back.
    BulkFailed(sqlx::Error),
    /// The transaction itself failed (connection, BEGIN, COMMIT, a savepoint): nothing is known
    /// to be written.
    Failed(sqlx::Error),
}

/// Runs a sorted batch to the end: every job is answered with its committed result or an error.
async fn commit_batch(pool: &PgPool, reach: &Arc<Reachability>, mut pending: Vec<Job>) {
    let mut isolate = false;
    while !pending.is_empty() {
        if let Err(error) = reach.check() {
            return fail_all(pending, &error);
        }
        match round(pool, &pending, isolate).await {
            Round::Committed(results) => {
                let mut again = Vec::new();
                for (mut job, result) in pending.drain(..).zip(results) {
                    match result {
                        Ok(reply) => answer(job, Ok(reply)),
                        Err(error) => match reach.failed(error, job.attempt) {
                            None => {
                                job.attempt += 1;
                                again.push(job);
                            }
                            Some(error) => answer(job, Err(error)),
                        },
                    }
                }
                pending = again;
                if !pending.is_empty() {
                    reach.backoff().await;
                }
            }
            Round::WriteFailed(index, error) => {
                // From now on each write runs under a savepoint: at most one more transaction
                // (plus retries of deadlocked writes) finishes the batch.
                isolate = true;
                match reach.failed(error, pending[index].attempt) {
                    None => {
                        pending[index].attempt += 1;
                        reach.backoff().await;
                    }
                    Some(error) => answer(pending.remove(index), Err(error)),
                }
            }
            Round::BulkFailed(error) => {
                // Which write made it fail is not known: each runs under a savepoint now, and
                // the one that fails again gets its error alone.
                tracing::debug!(%error, "bulk statement failed; the batch runs again write by write");
                isolate = true;
            }
            Round::Failed(error) => {
                // Not retried: after a failed COMMIT the outcome is unknown, so only an error
                // is an honest answer (the callers retry, every write being conditional).
                let error = reach
                    .failed(error, usize::MAX)
                    .unwrap_or_else(|| StoreError::Unavailable("batch failed".to_owned()));
                return fail_all(pending, &error);
            }
        }
    }
}

/// One transaction over `jobs`, each write under a savepoint when `isolate`.
async fn round(pool: &PgPool, jobs: &[Job], isolate: bool) -> Round {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(error) => return Round::Failed(error),
    };
    let round = transaction(&mut conn, jobs, isolate).await;
    if matches!(round, Round::Failed(_)) {
        // The connection may be broken or inside a transaction it could not end.
        conn.close_on_drop();
    }
    round
}

async fn transaction(conn: &mut PgConnection, jobs: &[Job], isolate: bool) -> Round {
    let bulk = if isolate {
        None
    } else {
        Bulk::of(jobs.iter().map(|job| &job.write))
    };
    if !isolate && let Some(round) = alone(conn, jobs, bulk.as_ref()).await {
        return round;
    }
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(error) => return Round::Failed(error),
    };
    let mut bulk_answers = match &bulk {
        None => Vec::new(),
        Some(bulk) => match bulk.run(&mut tx).await {
            Ok(answers) => answers,
            Err(error) => return rolled_back(tx.rollback().await, Round::BulkFailed(error)),
        },
    }
    .into_iter()
    .peekable();
    let mut results = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.iter().enumerate() {
        if let Some((_, done)) = bulk_answers.next_if(|(member, _)| *member == index) {
            results.push(Ok(Reply::Flag(done)));
        } else if !isolate {
            match job.write.apply(&mut tx).await {
                Ok(reply) => results.push(Ok(reply)),
                Err(error) => return rolled_back(tx.rollback().await, Round::WriteFailed(index, error)),
            }
        } else {
            match under_savepoint(&mut tx, &job.write).await {
                Ok(result) => results.push(result),
                Err(error) => return Round::Failed(error),
            }
        }
    }
    match tx.commit().await {
        Ok(()) => Round::Committed(results),
        Err(error) => Round::Failed(error),
    }
}

/// A batch that is one statement, run by itself: the bulk statement when it covers every
/// write, or a single one-statement write. It commits by itself, one round trip instead of
/// three (its answer arrives after its commit, as COMMIT's would). `None` for any other batch.
async fn alone(conn: &mut PgConnection, jobs: &[Job], bulk: Option<&Bulk<'_>>) -> Option<Round> {
    let result = match (bulk, jobs) {
        (Some(bulk), _) if bulk.len() == jobs.len() => bulk
            .run(conn)
            .await
            .map(|answers| answers.into_iter().map(|(_, done)| Ok(Reply::Flag(done))).collect()),
        (None, [job]) if job.write.single_statement() => job.write.apply(conn).await.map(|reply| vec![Ok(reply)]),
        _ => return None,
    };
    Some(match result {
        Ok(results) => Round::Committed(results),
        // The connection is gone or going: drop it.
        Err(error) if is_connectivity(&error) => Round::Failed(error),
        Err(error @ sqlx::Error::Database(_)) if bulk.is_some() => Round::BulkFailed(error),
        Err(error @ sqlx::Error::Database(_)) => Round::WriteFailed(0, error),
        Err(error) => Round::Failed(error),
    })
}

/// Runs `write` under a savepoint: its own result, or the error that fails the transaction
/// (the savepoint could not be taken, released or rolled back).
async fn under_savepoint(tx: &mut PgConnection, write: &Write) -> Result<Result<Reply, sqlx::Error>, sqlx::Error> {
    let mut savepoint = tx.begin().await?;
    match write.apply(&mut savepoint).await {
        Ok(reply) => savepoint.commit().await.map(|()| Ok(reply)),
        Err(error) => savepoint.rollback().await.map(|()| Err(error)),
    }
}

/// `round` once the rollback it follows succeeded; a failed rollback fails the transaction.
fn rolled_back(rollback: Result<(), sqlx::Error>, round: Round) -> Round {
    match rollback {
        Ok(()) => round,
        Err(error) => Round::Failed(error),
    }
}

fn answer(job: Job, result: Result<Reply>) {
    // The caller may have given up waiting; nothing to do then.
    let _ = job.reply.send(result);
}

fn fail_all(jobs: Vec<Job>, error: &StoreError) {
    for job in jobs {
        answer(job, Err(error.clone()));
    }
}
