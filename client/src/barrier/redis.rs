//! The barrier over Redis: DTM's keys and rules in one Lua script, so the check, the barrier
//! keys and the amount change are atomic.
//!
//! Keys are `<gid>-<branch_id>-<op>-<barrier_id>`, as DTM's Redis barrier writes them.
//!
//! ```no_run
//! # async fn run(mut conn: redis::aio::MultiplexedConnection, params: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
//! use kubetx_client::barrier::BranchBarrier;
//! // TransOut: take 30 from alice, once, and never after its compensation.
//! BranchBarrier::from_params(&params)?.redis_check_adjust_amount(&mut conn, "balance:alice", -30, 86_400).await?;
//! # Ok(()) }
//! ```

use super::{BranchBarrier, Decision, origin_op};
use crate::error::{Error, Result};

/// KEYS: the amount, this call's barrier key, the origin op's barrier key.
/// ARGV: the amount change, the origin op ("" when none), the barrier keys' expiry (seconds).
/// Answers "FAILURE" (missing or insufficient amount), "DUPLICATE", "SKIP" (null compensation)
/// or "" when the amount changed.
const CHECK_ADJUST: &str = r#"
local v = redis.call('GET', KEYS[1])
local current = redis.call('GET', KEYS[2])
if v == false or v + ARGV[1] < 0 then
  return 'FAILURE'
end
if current ~= false then
  return 'DUPLICATE'
end
redis.call('SET', KEYS[2], 'op', 'EX', ARGV[3])
if ARGV[2] ~= '' then
  local origin = redis.call('GET', KEYS[3])
  if origin == false then
    redis.call('SET', KEYS[3], 'rollback', 'EX', ARGV[3])
    return 'SKIP'
  end
end
redis.call('INCRBY', KEYS[1], ARGV[1])
return ''
"#;

/// KEYS: the msg's barrier key. ARGV: expiry. Marks the msg rolled back unless its local
/// transaction got there first; answers the key's value.
const QUERY_PREPARED: &str = r#"
redis.call('SET', KEYS[1], 'rollback', 'NX', 'EX', ARGV[1])
return redis.call('GET', KEYS[1])
"#;

impl BranchBarrier {
    fn redis_key(&self, op: &str, barrier_id: &str) -> String {
        let p = &self.params;
        format!("{}-{}-{}-{barrier_id}", p.gid, p.branch_id, op)
    }

    /// Adds `amount` (may be negative) to the integer at `key` behind the barrier, atomically:
    /// [`Error::Failure`] when `key` is missing or would go below zero, [`Decision::Skip`] for a
    /// repeated call, a null compensation or a late action; `expire_secs` bounds the barrier keys.
    ///
    /// ```no_run
    /// # async fn run(mut conn: redis::aio::MultiplexedConnection, b: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// b.redis_check_adjust_amount(&mut conn, "balance:alice", -30, 86_400).await?;
    /// # Ok(()) }
    /// ```
    pub async fn redis_check_adjust_amount<C>(
        &self,
        conn: &mut C,
        key: &str,
        amount: i64,
        expire_secs: u64,
    ) -> Result<Decision>
    where
        C: redis::aio::ConnectionLike + Send,
    {
        let barrier_id = self.next_barrier_id();
        let op = self.params.op.as_str();
        let origin = origin_op(op).unwrap_or("");
        let answer: String = redis::Script::new(CHECK_ADJUST)
            .key(key)
            .key(self.redis_key(op, &barrier_id))
            .key(self.redis_key(origin, &barrier_id))
            .arg(amount)
            .arg(origin)
            .arg(expire_secs.max(1))
            .invoke_async(conn)
            .await?;
        match answer.as_str() {
            "FAILURE" => Err(Error::Failure(format!("{key} is missing or has less than {}", -amount))),
            "DUPLICATE" if op == "msg" => Err(Error::Duplicated),
            "DUPLICATE" | "SKIP" => Ok(Decision::Skip),
            _ => Ok(Decision::Run),
        }
    }

    /// A msg back-check over Redis: `Err(Failure)` means the local transaction did not happen
    /// (and now never will).
    ///
    /// ```no_run
    /// # async fn run(mut conn: redis::aio::MultiplexedConnection, b: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// b.redis_query_prepared(&mut conn, 86_400).await?;
    /// # Ok(()) }
    /// ```
    pub async fn redis_query_prepared<C>(&self, conn: &mut C, expire_secs: u64) -> Result<()>
    where
        C: redis::aio::ConnectionLike + Send,
    {
        let key = format!("{}-00-msg-01", self.params.gid);
        let value: Option<String> = redis::Script::new(QUERY_PREPARED)
            .key(key)
            .arg(expire_secs.max(1))
            .invoke_async(conn)
            .await?;
        match value.as_deref() {
            Some("rollback") => Err(Error::Failure("the msg's local transaction was rolled back".to_owned())),
            _ => Ok(()),
        }
    }
}
