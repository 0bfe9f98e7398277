//! One statement for the creates and status changes of a PostgreSQL group-commit batch.
//!
//! A saga's hot path writes twice: its create, then the status change that ends it (with its
//! branch outcomes). In a batch, every such write of a distinct transaction goes into one
//! statement of `UNNEST` arrays, so a batch of them costs one round trip and one statement on
//! the server instead of one of each per write (plus BEGIN and COMMIT).
//!
//! - **Distinct transactions only.** The statement's steps all see the snapshot it started
//!   with, so it holds at most one write per gid: the first of each gid in the (stably sorted)
//!   batch. A later write of the same gid runs after it as a statement of its own.
//! - **The same conditions as one write alone.** A create inserts only a new gid (and its branch
//!   rows only then); a status change happens only from the status, owner and mode it names,
//!   and records its branch outcomes only when it happens. Each member is answered by whether
//!   its gid came back.
//! - **Lock order.** The arrays are in gid order, the order in which the plan (an index lookup
//!   per element) takes the row locks; should a plan ever take them otherwise, two replicas'
//!   batches could deadlock, which PostgreSQL detects and the writer retries.
//! - **Failure.** If the statement fails, nothing of it is written: the writer rolls back and
//!   runs the batch again with each write under a savepoint of its own.

use std::collections::HashSet;
use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, PgConnection};

use super::postgres::{BranchRows, Outcomes, Write, outcome_set, status_set};
use crate::model::Millis;

/// The creates and status changes of one batch, as column arrays.
#[derive(Default)]
pub(super) struct Bulk<'a> {
    /// The members' positions in the batch.
    members: Vec<usize>,
    /// The members' gids, in the same order.
    gids: Vec<&'a str>,
    creates: Creates<'a>,
    branches: BranchRows<'a>,
    changes: Changes<'a>,
    outcomes: Outcomes<'a>,
}

/// The global rows of the creates.
#[derive(Default)]
struct Creates<'a> {
    gid: Vec<&'a str>,
    trans_type: Vec<&'static str>,
    status: Vec<&'static str>,
    query_prepared: Vec<&'a str>,
    protocol: Vec<&'a str>,
    custom_data: Vec<&'a str>,
    options: Vec<&'a str>,
    create_time: Vec<Millis>,
    update_time: Vec<Millis>,
    finish_time: Vec<Option<Millis>>,
    rollback_time: Vec<Option<Millis>>,
    next_cron_time: Vec<Millis>,
    next_cron_interval: Vec<i64>,
    owner: Vec<&'a str>,
    result: Vec<&'a str>,
    rollback_reason: Vec<&'a str>,
    ext_data: Vec<&'a str>,
}

/// The status changes, as [`status_set`] and their conditions take them.
#[derive(Default)]
struct Changes<'a> {
    to: Vec<&'static str>,
    now: Vec<Millis>,
    rollback_reason: Vec<Option<&'a str>>,
    result: Vec<Option<&'a str>>,
    custom_data: Vec<Option<&'a str>>,
    new_owner: Vec<Option<String>>,
    next_cron_time: Vec<Option<Millis>>,
    gid: Vec<&'a str>,
    from: Vec<&'static str>,
    owner: Vec<Option<&'a str>>,
    trans_type: Vec<Option<&'static str>>,
}

impl<'a> Bulk<'a> {
    /// The bulk part of a batch sorted by gid, or `None` when fewer than two writes qualify
    /// (one write is as cheap alone).
    pub(super) fn of(writes: impl Iterator<Item = &'a Write>) -> Option<Self> {
        let mut bulk = Bulk::default();
        let mut last_key = None;
        for (index, write) in writes.enumerate() {
            // Writes of one row are adjacent: only the first of them may be a member.
            let key = write.lock_key();
            if last_key == Some(key) {
                continue;
            }
            last_key = Some(key);
            let gid = key.1;
            match write {
                Write::Create(global, options, branches) => {
                    bulk.creates.push(global, options, branches, &mut bulk.branches)
                }
                Write::ChangeStatus(change) => bulk.changes.push(change, &mut bulk.outcomes),
                _ => continue,
            }
            bulk.members.push(index);
            bulk.gids.push(gid);
        }
        (bulk.members.len() >= 2).then_some(bulk)
    }

    /// How many writes are members.
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    /// Runs the statement; answers each member's position in the batch with whether its write
    /// happened.
    pub(super) async fn run(&self, conn: &mut PgConnection) -> Result<Vec<(usize, bool)>, sqlx::Error> {
        let done: Vec<String> = self
            .bind(sqlx::query_scalar(AssertSqlSafe(BULK.as_str())))
            .fetch_all(conn)
            .await?;
        let done: HashSet<&str> = done.iter().map(String::as_str).collect();
        Ok(self
            .members
            .iter()
            .zip(&self.gids)
            .map(|(&index, gid)| (index, done.contains(gid)))
            .collect())
    }

    fn bind<'q>(&'q self, query: BulkQuery<'q>) -> BulkQuery<'q> {
        let c = &self.creates;
        let b = &self.branches;
        let s = &self.changes;
        let o = &self.outcomes;
        query
            .bind(&c.gid)
            .bind(&c.trans_type)
            .bind(&c.status)
            .bind(&c.query_prepared)
            .bind(&c.protocol)
            .bind(&c.custom_data)
            .bind(&c.options)
            .bind(&c.create_time)
            .bind(&c.update_time)
            .bind(&c.finish_time)
            .bind(&c.rollback_time)
            .bind(&c.next_cron_time)
            .bind(&c.next_cron_interval)
            .bind(&c.owner)
            .bind(&c.result)
            .bind(&c.rollback_reason)
            .bind(&c.ext_data)
            .bind(&b.gid)
            .bind(&b.url)
            .bind(&b.bin_data)
            .bind(&b.branch_id)
            .bind(&b.op)
            .bind(&b.status)
            .bind(&b.create_time)
            .bind(&b.update_time)
            .bind(&b.finish_time)
            .bind(&b.rollback_time)
            .bind(&s.to)
            .bind(&s.now)
            .bind(&s.rollback_reason)
            .bind(&s.result)
            .bind(&s.custom_data)
            .bind(&s.new_owner)
            .bind(&s.next_cron_time)
            .bind(&s.gid)
            .bind(&s.from)
            .bind(&s.owner)
            .bind(&s.trans_type)
            .bind(&o.gid)
            .bind(&o.branch_id)
            .bind(&o.op)
            .bind(&o.status)
            .bind(&o.at)
    }
}

type BulkQuery<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

impl<'a> Creates<'a> {
    fn push(
        &mut self,
        global: &'a crate::model::GlobalTrans,
        options: &'a str,
        branches: &'a [crate::model::Branch],
        rows: &mut BranchRows<'a>,
    ) {
        self.gid.push(&global.gid);
        self.trans_type.push(global.trans_type.as_str());
        self.status.push(global.status.as_str());
        self.query_prepared.push(&global.query_prepared);
        self.protocol.push(&global.protocol);
        self.custom_data.push(&global.custom_data);
        self.options.push(options);
        self.create_time.push(global.create_time);
        self.update_time.push(global.update_time);
        self.finish_time.push(global.finish_time);
        self.rollback_time.push(global.rollback_time);
        self.next_cron_time.push(global.next_cron_time);
        self.next_cron_interval.push(global.next_cron_interval);
        self.owner.push(&global.owner);
        self.result.push(&global.result);
        self.rollback_reason.push(&global.rollback_reason);
        self.ext_data.push(&global.ext_data);
        rows.push(&global.gid, branches);
    }
}

impl<'a> Changes<'a> {
    fn push(&mut self, change: &'a super::StatusChange, outcomes: &mut Outcomes<'a>) {
        let (new_owner, next_cron_time) = change.owner_and_expiry();
        self.to.push(change.to.as_str());
        self.now.push(change.now);
        self.rollback_reason.push(change.rollback_reason.as_deref());
        self.result.push(change.result.as_deref());
        self.custom_data.push(change.custom_data.as_deref());
        self.new_owner.push(new_owner);
        self.next_cron_time.push(next_cron_time);
        self.gid.push(&change.gid);
        self.from.push(change.from.as_str());
        self.owner.push(change.owner.as_deref());
        self.trans_type.push(change.trans_type.map(|t| t.as_str()));
        outcomes.push(&change.gid, &change.branch_updates);
    }
}

/// The statement: `c` inserts the new global rows and `cb` their branch rows; `s` changes the
/// statuses and `so` records the outcomes of the changes that happened; the gids of the
/// creates and changes that happened come back.
static BULK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS (INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, custom_data, \
         options, create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, \
         owner, result, rollback_reason, ext_data) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::text[], \
         $15::text[], $16::text[], $17::text[]) \
         ON CONFLICT (gid) DO NOTHING RETURNING gid), \
         cb AS (INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, \
         update_time, finish_time, rollback_time) \
         SELECT v.gid, v.url, v.bin_data, v.branch_id, v.op, v.status, v.create_time, v.update_time, \
         v.finish_time, v.rollback_time FROM UNNEST($18::text[], $19::text[], $20::bytea[], $21::text[], \
         $22::text[], $23::text[], $24::int8[], $25::int8[], $26::int8[], $27::int8[]) WITH ORDINALITY \
         AS v(gid, url, bin_data, branch_id, op, status, create_time, update_time, finish_time, \
         rollback_time, n) WHERE v.gid IN (SELECT gid FROM c) ORDER BY v.n), \
         s AS (UPDATE trans_global t SET {} \
         FROM UNNEST($28::text[], $29::int8[], $30::text[], $31::text[], $32::text[], $33::text[], \
         $34::int8[], $35::text[], $36::text[], $37::text[], $38::text[]) \
         AS v(v_to, v_now, v_reason, v_result, v_custom_data, v_new_owner, v_next_cron_time, v_gid, \
         v_from, v_owner, v_type) \
         WHERE t.gid = v_gid AND t.status = v_from AND (v_owner IS NULL OR t.owner = v_owner) \
         AND (v_type IS NULL OR t.trans_type = v_type) RETURNING t.gid, v_now), \
         so AS (UPDATE trans_branch_op b SET {} \
         FROM UNNEST($39::text[], $40::text[], $41::text[], $42::text[], $43::int8[]) \
         AS o(gid, branch_id, op, status, at) JOIN s ON s.gid = o.gid \
         WHERE b.gid = o.gid AND b.branch_id = o.branch_id AND b.op = o.op RETURNING 1) \
         SELECT gid FROM c UNION ALL SELECT gid FROM s",
        status_set([
            "v_to",
            "v_now",
            "v_reason",
            "v_result",
            "v_custom_data",
            "v_new_owner",
            "v_next_cron_time"
        ]),
        outcome_set("o", "s.v_now")
    )
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TransStatus;
    use crate::store::{Lease, StatusChange};

    fn finish(gid: &str) -> Write {
        Write::ChangeStatus(StatusChange::new(gid, TransStatus::Submitted, TransStatus::Succeed, 2))
    }

    #[test]
    fn members_are_the_first_write_of_each_transaction_when_it_is_a_create_or_a_change() {
        let lease = Lease {
            owner: "me".to_owned(),
            until: 9,
        };
        let writes = [
            finish("g1"),
            // A second write of g1 runs after the statement.
            finish("g1"),
            // g2's first write is not a member, so neither is its change (it must run after).
            Write::Claim("g2".to_owned(), lease, 1),
            finish("g2"),
            finish("g3"),
            // A key named like a transaction is another row.
            Write::KvDelete("g3".to_owned(), String::new()),
        ];
        let bulk = Bulk::of(writes.iter()).expect("two members");
        assert_eq!(bulk.members, [0, 4]);
        assert_eq!(bulk.gids, ["g1", "g3"]);
        assert_eq!(bulk.changes.gid, ["g1", "g3"]);
    }

    #[test]
    fn a_single_member_is_no_bulk_statement() {
        assert!(Bulk::of([finish("g1"), Write::KvDelete("c".to_owned(), "k".to_owned())].iter()).is_none());
    }
}
