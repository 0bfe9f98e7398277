//! The Redis store: several kubetx replicas share one Redis (DTM's high-volume engine).
//!
//! Layout. A transaction lives in one of `shards` shards, chosen by a stable hash of its gid;
//! each shard is one Redis Cluster hash tag `{<prefix>:<shard>}` and holds, under that tag:
//! - `g:<gid>`: a hash of the transaction's fields;
//! - `bd:<gid>` and `bs:<gid>`: its branches, keyed by `<branch_id>\0<op>`: the content a
//!   registration compares (`<url length>:<url><bin_data>`) and the mutable state
//!   (`seq|status|create|update|finish|rollback`);
//! - `due`: a sorted set of the shard's unfinished transactions by `next_cron_time` (which is
//!   the lease expiry while one is leased), the index claiming reads without scanning;
//! - `ids`: every transaction by its id (the order of `/all`);
//! - `done`: finished transactions by their last write (retention).
//!
//! A transaction's keys and its shard's indexes share a slot, so every state change is one
//! server-side script (see `redis_lua`), atomic and fenced on status and owner. The gid itself
//! is not the hash tag: an index entry and the record it indexes must change in one script,
//! which Redis Cluster only allows within one slot. The global id counter (`{<prefix>}:seq`,
//! handed out in blocks per process) and the KV records (`{<prefix>:kv}:…`) have tags of their
//! own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script, ScriptInvocation};
use tracing::{info, warn};

use super::redis_lua as lua;
use super::{
    AddBranches, Guard, KvEntry, Lease, ListQuery, Result, StatusChange, Store, StoreError, StoreOptions,
    check_branches, check_change, check_key, check_new, check_text,
};
use crate::engine::BranchUpdate;
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, TransType};

/// Shards when the URL names none.
pub const DEFAULT_SHARDS: u32 = 16;
/// Most shards a URL may ask for.
pub const MAX_SHARDS: u32 = 1024;
/// Key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "kubetx";
/// Environment variable with the password when the URL carries none.
pub const PASSWORD_ENV: &str = "KUBETX_REDIS_PASSWORD";
/// How long a command may take before it fails (a `list` with filters walks a shard).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Transaction ids reserved per `INCRBY` of the shared counter: a create then rarely waits for a
/// write of its own (with `appendfsync always`, an fsync) before its script.
const ID_BLOCK: i64 = 32;
/// How long reserved ids stay usable, which bounds how far `/all`'s newest-first order across
/// replicas can stray (ids are handed out in blocks per process).
const ID_BLOCK_LIFETIME: Duration = Duration::from_secs(1);
/// Entries of a shard's `due` index one `reclaim_leases` script looks at.
const RECLAIM_PAGE: u64 = 256;
/// Pause between two connection attempts of the probe while Redis is unreachable.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        StoreError::Unavailable(format!("redis: {error}"))
    }
}

/// Where and how the store lives, from a `redis://` or `rediss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// The URL handed to the client (our own query parameters removed).
    url: url::Url,
    /// Key prefix (`?prefix=`).
    pub prefix: String,
    /// Shard count (`?shards=`).
    pub shards: u32,
}

impl RedisTarget {
    /// Parses `redis[s]://[user:password@]host[:port][/db][?prefix=…&shards=…]`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut url = url::Url::parse(text).map_err(|e| StoreError::Invalid(format!("invalid Redis URL: {e}")))?;
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(StoreError::Invalid(
                "a Redis URL starts with redis:// or rediss://".to_owned(),
            ));
        }
        let (mut prefix, mut shards) = (DEFAULT_PREFIX.to_owned(), DEFAULT_SHARDS);
        let mut rest = Vec::new();
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "prefix" => prefix = value.into_owned(),
                "shards" => {
                    shards = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_SHARDS).contains(n))
                        .ok_or_else(|| StoreError::Invalid(format!("shards must be 1 to {MAX_SHARDS}")))?;
                }
                _ => rest.push((name.into_owned(), value.into_owned())),
            }
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(valid) {
            return Err(StoreError::Invalid(
                "prefix must be 1 to 64 letters, digits, '_' or '-'".to_owned(),
            ));
        }
        url.set_query(None);
        if !rest.is_empty() {
            url.query_pairs_mut().extend_pairs(rest);
        }
        Ok(RedisTarget { url, prefix, shards })
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    link: Link,
    prefix: String,
    shards: u32,
    ids: Arc<tokio::sync::Mutex<IdBlock>>,
}

/// Transaction ids this process reserved from the shared counter and has not used yet.
#[derive(Debug)]
struct IdBlock {
    next: i64,
    end: i64,
    taken: tokio::time::Instant,
}

/// The connection, and whether Redis is known to be unreachable.
#[derive(Clone)]
struct Link {
    conn: ConnectionManager,
    health: Arc<Health>,
}

/// Tracks whether Redis answers. After a connectivity failure a background probe connects
/// outside the shared connection until Redis answers again; meanwhile every call fails at once
/// with `Unavailable` instead of waiting for the connection manager's reconnect attempts.
struct Health {
    down: AtomicBool,
    probing: AtomicBool,
    last_error: Mutex<String>,
    client: redis::Client,
    timeout: Duration,
}

impl Link {
    /// Runs one call on the shared connection, failing fast while Redis is known to be down.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.health.check()?;
        call(self.conn.clone()).await.map_err(|error| {
            if error.is_io_error()
                || error.is_connection_refusal()
                || error.is_timeout()
                || error.is_connection_dropped()
            {
                Health::start_probe(&self.health, error.to_string());
            }
            StoreError::from(error)
        })
    }

    /// Runs a script invocation.
    async fn run<T: redis::FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T> {
        self.call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }
}

impl Health {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::Acquire) {
            let last = self.last_error.lock().map(|e| e.clone()).unwrap_or_default();
            return Err(StoreError::Unavailable(format!(
                "redis is unreachable ({last}); retry later"
            )));
        }
        Ok(())
    }

    /// Answers PING on a fresh connection within the timeout.
    async fn probe(&self) -> Result<(), String> {
        let attempt = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("connection attempt timed out".to_owned()),
        }
    }

    fn start_probe(this: &Arc<Self>, error: String) {
        if let Ok(mut last) = this.last_error.lock() {
            *last = error;
        }
        if this.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(this);
        tokio::spawn(async move {
            let mut reported = false;
            while let Err(error) = this.probe().await {
                if !reported {
                    warn!(%error, "redis unreachable; calls fail fast until it answers");
                    reported = true;
                }
                if let Ok(mut last) = this.last_error.lock() {
                    *last = error;
                }
                this.down.store(true, Ordering::Release);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
            if this.down.swap(false, Ordering::AcqRel) {
                info!("redis reachable again");
            }
            this.probing.store(false, Ordering::Release);
        });
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An optional script argument: `+value` or `-`.
fn opt(value: Option<&str>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("+{v}"))
}

/// A stable hash (FNV-1a): the shard of a gid must never change between versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hash field of a branch row.
fn branch_key(branch_id: &str, op: &str) -> Vec<u8> {
    [branch_id.as_bytes(), b"\0", op.as_bytes()].concat()
}

/// What `registerBranch` compares of a branch: its URL and body.
fn branch_data(branch: &Branch) -> Vec<u8> {
    [
        format!("{}:{}", branch.url.len(), branch.url).as_bytes(),
        &branch.bin_data,
    ]
    .concat()
}

fn opt_time(value: Option<Millis>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("redis record: {what}"))
}

/// The fields of a transaction hash.
fn global_fields(global: &GlobalTrans, id: i64, branches: usize) -> Result<Vec<(&'static str, String)>> {
    let options = serde_json::to_string(&global.options).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(vec![
        ("id", id.to_string()),
        ("gid", global.gid.clone()),
        ("trans_type", global.trans_type.as_str().to_owned()),
        ("status", global.status.as_str().to_owned()),
        ("query_prepared", global.query_prepared.clone()),
        ("protocol", global.protocol.clone()),
        ("custom_data", global.custom_data.clone()),
        ("options", options),
        ("create_time", global.create_time.to_string()),
        ("update_time", global.update_time.to_string()),
        ("finish_time", opt_time(global.finish_time)),
        ("rollback_time", opt_time(global.rollback_time)),
        ("next_cron_time", global.next_cron_time.to_string()),
        ("next_cron_interval", global.next_cron_interval.to_string()),
        ("owner", global.owner.clone()),
        ("result", global.result.clone()),
        ("rollback_reason", global.rollback_reason.clone()),
        ("ext_data", global.ext_data.clone()),
        ("bseq", branches.to_string()),
    ])
}

/// A transaction hash back into a [`GlobalTrans`]; `None` when empty (no such gid).
fn decode_global(mut fields: HashMap<String, String>) -> Result<Option<GlobalTrans>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut text = |name: &str| fields.remove(name).ok_or_else(|| corrupt(&format!("{name} missing")));
    let int = |value: String, name: &str| value.parse::<i64>().map_err(|_| corrupt(name));
    let opt_int = |value: String, name: &str| match value.is_empty() {
        true => Ok(None),
        false => value.parse::<i64>().map(Some).map_err(|_| corrupt(name)),
    };
    let trans_type = text("trans_type")?;
    let options = text("options")?;
    Ok(Some(GlobalTrans {
        id: int(text("id")?, "id")?,
        gid: text("gid")?,
        trans_type: TransType::parse(&trans_type).ok_or_else(|| corrupt("trans_type"))?,
        status: super::decode::parse_status(&text("status")?)?,
        query_prepared: text("query_prepared")?,
        protocol: text("protocol")?,
        custom_data: text("custom_data")?,
        options: serde_json::from_str(&options).map_err(|e| corrupt(&format!("options: {e}")))?,
        create_time: int(text("create_time")?, "create_time")?,
        update_time: int(text("update_time")?, "update_time")?,
        finish_time: opt_int(text("finish_time")?, "finish_time")?,
        rollback_time: opt_int(text("rollback_time")?, "rollback_time")?,
        next_cron_time: int(text("next_cron_time")?, "next_cron_time")?,
        next_cron_interval: int(text("next_cron_interval")?, "next_cron_interval")?,
        owner: text("owner")?,
        result: text("result")?,
        rollback_reason: text("rollback_reason")?,
        ext_data: text("ext_data")?,
    }))
}

/// A branch state string `seq|status|create|update|finish|rollback`.
fn branch_state(seq: i64, branch: &Branch) -> String {
    format!(
        "{seq}|{}|{}|{}|{}|{}",
        branch.status.as_str(),
        branch.create_time,
        branch.update_time,
        opt_time(branch.finish_time),
        opt_time(branch.rollback_time)
    )
}

/// The branch rows of a transaction from its two branch hashes, in insertion order.
fn decode_branches(
    gid: &str,
    data: HashMap<Vec<u8>, Vec<u8>>,
    states: HashMap<Vec<u8>, Vec<u8>>,
) -> Result<Vec<Branch>> {
    let mut rows = Vec::with_capacity(data.len());
    for (key, state) in states {
        let content = data.get(&key).ok_or_else(|| corrupt("branch without data"))?;
        rows.push(decode_branch(gid, &key, content, &state)?);
    }
    rows.sort_by_key(|row| row.id);
    Ok(rows)
}

fn decode_branch(gid: &str, key: &[u8], content: &[u8], state: &[u8]) -> Result<Branch> {
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("branch text"));
    let at = key.iter().position(|b| *b == 0).ok_or_else(|| corrupt("branch key"))?;
    let colon = content
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| corrupt("branch data"))?;
    let url_len: usize = text(&content[..colon])?.parse().map_err(|_| corrupt("branch data"))?;
    let body = &content[colon + 1..];
    if body.len() < url_len {
        return Err(corrupt("branch data"));
    }
    let state = text(state)?;
    let parts: Vec<&str> = state.split('|').collect();
    let [seq, status, create, update, finish, rollback] = parts[..] else {
        return Err(corrupt("branch state"));
    };
    let int = |v: &str| v.parse::<i64>().map_err(|_| corrupt("branch state"));
    let opt_int = |v: &str| if v.is_empty() { Ok(None) } else { int(v).map(Some) };
    Ok(Branch {
        id: int(seq)?,
        gid: gid.to_owned(),
        url: text(&body[..url_len])?,
        bin_data: body[url_len..].to_vec(),
        branch_id: text(&key[..at])?,
        op: text(&key[at + 1..])?,
        status: BranchStatus::parse(status).ok_or_else(|| corrupt("branch status"))?,
        create_time: int(create)?,
        update_time: int(update)?,
        finish_time: opt_int(finish)?,
        rollback_time: opt_int(rollback)?,
    })
}

/// Adds branch outcomes to a script invocation: a count, then (key, status, at) triples.
fn push_updates(invocation: &mut ScriptInvocation<'_>, updates: &[BranchUpdate]) {
    invocation.arg(updates.len());
    for update in updates {
        invocation
            .arg(branch_key(&update.branch_id, &update.op))
            .arg(update.status.as_str())
            .arg(update.at);
    }
}

/// A KV record `id|version|create|update|value`.
fn decode_kv(cat: &str, key: String, record: &[u8]) -> Result<KvEntry> {
    let record = String::from_utf8(record.to_vec()).map_err(|_| corrupt("kv record"))?;
    let mut parts = record.splitn(5, '|');
    let mut int = || {
        parts
            .next()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| corrupt("kv record"))
    };
    let (id, version, create_time, update_time) = (int()?, int()?, int()?, int()?);
    Ok(KvEntry {
        id,
        cat: cat.to_owned(),
        key,
        value: parts.next().ok_or_else(|| corrupt("kv record"))?.to_owned(),
        version,
        create_time,
        update_time,
    })
}

impl RedisStore {
    /// Connects. The password comes from the URL or, when it has none, from
    /// `KUBETX_REDIS_PASSWORD`.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let target = RedisTarget::parse(url)?;
        if target.url.scheme() == "rediss" {
            // The TLS client uses the process's rustls provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut info = target
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError::Invalid(format!("invalid Redis URL: {e}")))?;
        if info.redis_settings().password().is_none()
            && let Ok(password) = std::env::var(PASSWORD_ENV)
            && !password.is_empty()
        {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let health = Arc::new(Health {
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            client: client.clone(),
            timeout: options.acquire_timeout,
        });
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.acquire_timeout))
            .set_response_timeout(Some(RESPONSE_TIMEOUT.max(options.acquire_timeout)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let store = RedisStore {
            link: Link { conn, health },
            prefix: target.prefix,
            shards: target.shards,
            ids: Arc::new(tokio::sync::Mutex::new(IdBlock {
                next: 0,
                end: 0,
                taken: tokio::time::Instant::now(),
            })),
        };
        store.pin_shards().await?;
        for warning in store.durability_warnings().await {
            warn!("{warning}");
        }
        Ok(store)
    }

    /// Records the shard count on first use and refuses another one later: gids would map to
    /// other shards and their transactions would be lost to the indexes.
    async fn pin_shards(&self) -> Result<()> {
        let key = format!("{{{}}}:shards", self.prefix);
        let shards = self.shards;
        let stored: u32 = self
            .link
            .call(|mut conn| async move {
                let _: bool = conn.set_nx(&key, shards).await?;
                conn.get(&key).await
            })
            .await?;
        if stored != self.shards {
            return Err(StoreError::Invalid(format!(
                "this Redis data set was created with shards={stored}; the URL says shards={}",
                self.shards
            )));
        }
        Ok(())
    }

    /// What `/readyz` and the start-up log say about the server's durability.
    async fn durability_warnings(&self) -> Vec<String> {
        let mut conn = self.link.conn.clone();
        let info: String = match redis::cmd("INFO").arg("persistence").query_async(&mut conn).await {
            Ok(info) => info,
            Err(error) => return vec![format!("redis: cannot read INFO persistence ({error})")],
        };
        let aof = info
            .lines()
            .find_map(|line| line.strip_prefix("aof_enabled:"))
            .map(str::trim);
        if aof != Some("1") {
            return vec![
                "redis runs without AOF (appendonly no): acknowledged transactions can be lost when Redis \
                 restarts; set appendonly yes and appendfsync always"
                    .to_owned(),
            ];
        }
        // CONFIG may be disabled (managed services); then only AOF is known to be on.
        let fsync: Option<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(&mut conn)
            .await
            .ok();
        match fsync.as_ref().and_then(|v| v.get(1)).map(String::as_str) {
            Some("always") | None => Vec::new(),
            Some(other) => vec![format!(
                "redis runs with appendfsync {other}: a Redis crash can lose recently acknowledged \
                 transactions; set appendfsync always"
            )],
        }
    }

    /// The next transaction id: from this process's block, or a fresh block of the shared
    /// counter (`{<prefix>}:seq`) when it is used up or older than [`ID_BLOCK_LIFETIME`].
    async fn next_id(&self) -> Result<i64> {
        let mut block = self.ids.lock().await;
        if block.next >= block.end || block.taken.elapsed() >= ID_BLOCK_LIFETIME {
            let seq = format!("{{{}}}:seq", self.prefix);
            let last: i64 = self
                .link
                .call(|mut conn| async move { conn.incr(seq, ID_BLOCK).await })
                .await?;
            *block = IdBlock {
                next: last - ID_BLOCK + 1,
                end: last + 1,
                taken: tokio::time::Instant::now(),
            };
        }
        block.next += 1;
        Ok(block.next - 1)
    }

    fn shard_of(&self, gid: &str) -> u32 {
        (fnv1a(gid.as_bytes()) % u64::from(self.shards)) as u32
    }

    /// The key prefix of a shard: `{<prefix>:<shard>}:`.
    fn base(&self, shard: u32) -> String {
        format!("{{{}:{shard}}}:", self.prefix)
    }

    /// The keys of a transaction: (base, global, branch data, branch states).
    fn keys(&self, gid: &str) -> (String, String, String, String) {
        let base = self.base(self.shard_of(gid));
        let keys = (
            format!("{base}g:{gid}"),
            format!("{base}bd:{gid}"),
            format!("{base}bs:{gid}"),
        );
        (base, keys.0, keys.1, keys.2)
    }

    fn kv_keys(&self, cat: &str) -> (String, String, String) {
        let base = format!("{{{}:kv}}:", self.prefix);
        (format!("{base}h:{cat}"), format!("{base}z:{cat}"), format!("{base}seq"))
    }

    /// The `limit` lowest-scored entries of one index over all shards, as (shard, gid), read
    /// in one pipelined round trip: the first step of claiming, resetting and purging, whose
    /// second step re-checks each entry in a script on its shard.
    async fn earliest(&self, index: &str, min: &str, max: &str, limit: i64) -> Result<Vec<(u32, String)>> {
        let limit = limit.max(0);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for shard in 0..self.shards {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(format!("{}{index}", self.base(shard)))
                .arg(min)
                .arg(max)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let per_shard: Vec<Vec<(String, f64)>> = self
            .link
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut all: Vec<(f64, u32, String)> = per_shard
            .into_iter()
            .zip(0..)
            .flat_map(|(entries, shard)| entries.into_iter().map(move |(gid, score)| (score, shard, gid)))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        all.truncate(limit as usize);
        Ok(all.into_iter().map(|(_, shard, gid)| (shard, gid)).collect())
    }

    /// Runs `script` once per shard named in `entries`, concurrently (the connection pipelines
    /// them), with `args` then the shard's key prefix and gids (or only the gids when
    /// `with_base` is false); `keys` gives each shard's declared keys.
    async fn per_shard<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        entries: Vec<(u32, String)>,
        keys: impl Fn(&str) -> Vec<String>,
        args: &[String],
    ) -> Result<Vec<T>> {
        let mut by_shard: HashMap<u32, Vec<String>> = HashMap::new();
        for (shard, gid) in entries {
            by_shard.entry(shard).or_default().push(gid);
        }
        let calls = by_shard.into_iter().map(|(shard, gids)| {
            let base = self.base(shard);
            let mut invocation = script.prepare_invoke();
            for key in keys(&base) {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            invocation.arg(&base).arg(gids);
            async move { self.link.run::<T>(&invocation).await }
        });
        futures::future::try_join_all(calls).await
    }

    /// Loads transactions by gid in one pipelined round trip, skipping deleted ones.
    async fn load_globals(&self, gids: &[String]) -> Result<Vec<GlobalTrans>> {
        if gids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for gid in gids {
            pipe.hgetall(self.keys(gid).1);
        }
        let rows: Vec<HashMap<String, String>> = self
            .link
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.extend(decode_global(row)?);
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> Result<()> {
        let _: String = self
            .link
            .call(|mut conn| async move { redis::cmd("PING").query_async(&mut conn).await })
            .await?;
        Ok(())
    }

    async fn warnings(&self) -> Vec<String> {
        self.durability_warnings().await
    }

    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        check_new(global, branches)?;
        let id = self.next_id().await?;
        let (base, g, bd, bs) = self.keys(&global.gid);
        let fields = global_fields(global, id, branches.len())?;
        let mut invocation = lua::CREATE.prepare_invoke();
        invocation
            .key(&g)
            .key(&bd)
            .key(&bs)
            .key(format!("{base}due"))
            .key(format!("{base}ids"))
            .key(format!("{base}done"))
            .arg(&global.gid)
            .arg(id)
            .arg(global.status.as_str())
            .arg(global.next_cron_time)
            .arg(global.update_time)
            .arg(fields.len());
        for (name, value) in &fields {
            invocation.arg(*name).arg(value);
        }
        invocation.arg(branches.len());
        for (seq, branch) in (1..).zip(branches) {
            invocation
                .arg(branch_key(&branch.branch_id, &branch.op))
                .arg(branch_data(branch))
                .arg(branch_state(seq, branch));
        }
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        let key = self.keys(gid).1;
        decode_global(
            self.link
                .call(|mut conn| async move { conn.hgetall(key).await })
                .await?,
        )
    }

    async fn branches(&self, gid: &str) -> Result<Vec<Branch>> {
        let (_, _, bd, bs) = self.keys(gid);
        let (data, states): (HashMap<Vec<u8>, Vec<u8>>, HashMap<Vec<u8>, Vec<u8>>) = self
            .link
            .call(|mut conn| async move { redis::pipe().hgetall(bd).hgetall(bs).query_async(&mut conn).await })
            .await?;
        decode_branches(gid, data, states)
    }

    async fn change_status(&self, change: &StatusChange) -> Result<bool> {
        Ok(self.change(change, false).await?.0)
    }

    async fn change_status_and_load(&self, change: &StatusChange) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
        Ok(self.change(change, true).await?.1)
    }

    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
        check_key("gid", gid)?;
        check_branches(branches)?;
        let (_, g, bd, bs) = self.keys(gid);
        let mut invocation = lua::ADD_BRANCHES.prepare_invoke();
        invocation.key(g).key(bd).key(bs).arg(branches.len());
        for branch in branches {
            invocation
                .arg(branch_key(&branch.branch_id, &branch.op))
                .arg(branch_data(branch))
                .arg(branch.status.as_str())
                .arg(branch.create_time)
                .arg(branch.update_time)
                .arg(opt_time(branch.finish_time))
                .arg(opt_time(branch.rollback_time));
        }
        let answer: Vec<Vec<u8>> = self.link.run(&invocation).await?;
        let text =
            |i: usize| String::from_utf8_lossy(answer.get(i).map(Vec::as_slice).unwrap_or_default()).into_owned();
        Ok(match text(0).as_str() {
            "added" => AddBranches::Added,
            "same" => AddBranches::AlreadyRegistered,
            "conflict" => {
                let key = text(1);
                let (branch_id, op) = key.split_once('\0').unwrap_or((key.as_str(), ""));
                AddBranches::Conflict(format!(
                    "branch {branch_id} op {op} is already registered with other content"
                ))
            }
            "status" => match text(1).as_str() {
                "" => AddBranches::WrongStatus(None),
                status => AddBranches::WrongStatus(Some(super::decode::parse_status(status)?)),
            },
            other => return Err(corrupt(&format!("add_branches answered {other:?}"))),
        })
    }

    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool> {
        let (_, g, _, bs) = self.keys(&guard.gid);
        let mut invocation = lua::UPDATE_BRANCHES.prepare_invoke();
        invocation
            .key(g)
            .key(bs)
            .arg(&guard.owner)
            .arg(guard.status.as_str())
            .arg(now);
        push_updates(&mut invocation, updates);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool> {
        let (base, g, _, _) = self.keys(gid);
        let mut invocation = lua::CLAIM.prepare_invoke();
        invocation
            .key(g)
            .key(format!("{base}due"))
            .arg(&lease.owner)
            .arg(lease.until)
            .arg(now)
            .arg(gid);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        let due = self.earliest("due", "-inf", &now.to_string(), limit).await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let args = [lease.owner.clone(), lease.until.to_string(), now.to_string()];
        let taken: Vec<Vec<String>> = self
            .per_shard(&lua::CLAIM_LISTED, due, |base| vec![format!("{base}due")], &args)
            .await?;
        Ok(taken.into_iter().flatten().collect())
    }

    async fn reclaim_leases(&self, instance: &str, owner: &str, now: Millis) -> Result<u64> {
        // As on the SQL stores: a process of the same instance is gone (one identity runs once).
        // Each shard is walked a page per script, so Redis never runs one long script; a
        // released entry leaves the range walked (it becomes due now), so the next page starts
        // after the entries kept. Entries other processes move meanwhile may be seen twice
        // (harmless) or missed (their leases then expire as they would have).
        let prefix = super::instance_prefix(instance);
        let mut released = 0;
        for shard in 0..self.shards {
            let base = self.base(shard);
            let mut offset = 0;
            loop {
                let mut invocation = lua::RECLAIM.prepare_invoke();
                invocation
                    .key(format!("{base}due"))
                    .arg(&prefix)
                    .arg(owner)
                    .arg(now)
                    .arg(&base)
                    .arg(offset)
                    .arg(RECLAIM_PAGE);
                let (done, seen): (u64, u64) = self.link.run(&invocation).await?;
                released += done;
                offset += seen.saturating_sub(done);
                if seen < RECLAIM_PAGE {
                    break;
                }
            }
        }
        Ok(released)
    }

    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool> {
        let (base, g, _, _) = self.keys(&guard.gid);
        let mut invocation = lua::EXTEND.prepare_invoke();
        invocation
            .key(g)
            .key(format!("{base}due"))
            .arg(&guard.owner)
            .arg(guard.status.as_str())
            .arg(until)
            .arg(&guard.gid);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        let (base, g, _, _) = self.keys(&guard.gid);
        let mut invocation = lua::RELEASE.prepare_invoke();
        invocation
            .key(g)
            .key(format!("{base}due"))
            .arg(&guard.owner)
            .arg(guard.status.as_str())
            .arg(next_cron_time)
            .arg(interval)
            .arg(now)
            .arg(&guard.gid);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        let limit = query.limit.max(0);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let max = query.before_id.map_or_else(|| "+inf".to_owned(), |id| format!("({id}"));
        let filter = |v: Option<&str>| v.unwrap_or_default().to_owned();
        let calls = (0..self.shards).map(|shard| {
            let base = self.base(shard);
            let mut invocation = lua::LIST_SHARD.prepare_invoke();
            invocation
                .key(format!("{base}ids"))
                .arg(&max)
                .arg(limit)
                .arg(filter(query.status.map(TransStatus::as_str)))
                .arg(filter(query.trans_type.map(TransType::as_str)))
                .arg(query.created_from.map(|t| t.to_string()).unwrap_or_default())
                .arg(query.created_to.map(|t| t.to_string()).unwrap_or_default())
                .arg(&base)
                .arg(query.gid_prefix.as_deref().unwrap_or_default());
            async move { self.link.run::<Vec<(String, i64)>>(&invocation).await }
        });
        let mut found: Vec<(String, i64)> = futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .flatten()
            .collect();
        found.sort_by_key(|row| std::cmp::Reverse(row.1));
        found.truncate(limit as usize);
        let gids: Vec<String> = found.into_iter().map(|(gid, _)| gid).collect();
        self.load_globals(&gids).await
    }

    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool> {
        let (base, g, _, _) = self.keys(gid);
        let mut invocation = lua::RESET_ONE.prepare_invoke();
        invocation.key(g).key(format!("{base}due")).arg(now).arg(gid);
        Ok(self.link.run::<i64>(&invocation).await? >= 0)
    }

    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        let parked = self.earliest("due", &format!("({after}"), "+inf", limit).await?;
        if parked.is_empty() {
            return Ok(0);
        }
        let args = [now.to_string(), after.to_string()];
        let moved: Vec<u64> = self
            .per_shard(&lua::RESET_LISTED, parked, |base| vec![format!("{base}due")], &args)
            .await?;
        Ok(moved.into_iter().sum())
    }

    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>> {
        let (hash, _, _) = self.kv_keys(cat);
        let field = key.to_owned();
        let record: Option<Vec<u8>> = self
            .link
            .call(|mut conn| async move { conn.hget(hash, field).await })
            .await?;
        record.map(|r| decode_kv(cat, key.to_owned(), &r)).transpose()
    }

    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>> {
        let (hash, ids, _) = self.kv_keys(cat);
        let mut invocation = lua::KV_SCAN.prepare_invoke();
        invocation.key(hash).key(ids).arg(after_id).arg(limit.max(0));
        let rows: Vec<(String, Vec<u8>)> = self.link.run(&invocation).await?;
        rows.into_iter()
            .map(|(key, record)| decode_kv(cat, key, &record))
            .collect()
    }

    async fn kv_create(&self, cat: &str, key: &str, value: &str, now: Millis) -> Result<bool> {
        check_key("category", cat)?;
        check_key("key", key)?;
        check_text("value", value)?;
        let (hash, ids, seq) = self.kv_keys(cat);
        let mut invocation = lua::KV_CREATE.prepare_invoke();
        invocation.key(hash).key(ids).key(seq).arg(key).arg(value).arg(now);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool> {
        check_text("value", value)?;
        let (hash, _, _) = self.kv_keys(cat);
        let mut invocation = lua::KV_UPDATE.prepare_invoke();
        invocation.key(hash).arg(key).arg(value).arg(version).arg(now);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool> {
        let (hash, ids, _) = self.kv_keys(cat);
        let mut invocation = lua::KV_DELETE.prepare_invoke();
        invocation.key(hash).key(ids).arg(key);
        Ok(self.link.run::<i64>(&invocation).await? == 1)
    }

    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64> {
        let old = self.earliest("done", "-inf", &format!("({before}"), limit).await?;
        if old.is_empty() {
            return Ok(0);
        }
        let args = [before.to_string()];
        let deleted: Vec<u64> = self
            .per_shard(
                &lua::PURGE_LISTED,
                old,
                |base| vec![format!("{base}done"), format!("{base}ids")],
                &args,
            )
            .await?;
        Ok(deleted.into_iter().sum())
    }
}

impl RedisStore {
    /// `change_status`: whether it changed and, when `load`, the changed transaction and its
    /// branches, read by the same script.
    async fn change(&self, change: &StatusChange, load: bool) -> Result<(bool, Option<(GlobalTrans, Vec<Branch>)>)> {
        check_change(change)?;
        let (owner, next_cron_time) = change.owner_and_expiry();
        let (base, g, bd, bs) = self.keys(&change.gid);
        let mut invocation = lua::CHANGE_STATUS.prepare_invoke();
        invocation
            .key(g)
            .key(bd)
            .key(bs)
            .key(format!("{base}due"))
            .key(format!("{base}done"))
            .arg(change.from.as_str())
            .arg(change.to.as_str())
            .arg(opt(change.owner.as_deref()))
            .arg(opt(change.trans_type.map(TransType::as_str)))
            .arg(change.now)
            .arg(opt(change.rollback_reason.as_deref()))
            .arg(opt(change.result.as_deref()))
            .arg(opt(change.custom_data.as_deref()))
            .arg(opt(owner.as_deref()))
            .arg(opt(next_cron_time.map(|t| t.to_string()).as_deref()))
            .arg(if load { "1" } else { "0" });
        push_updates(&mut invocation, &change.branch_updates);
        type Changed = (
            i64,
            HashMap<String, String>,
            HashMap<Vec<u8>, Vec<u8>>,
            HashMap<Vec<u8>, Vec<u8>>,
        );
        let (changed, global, data, states): Changed = self.link.run(&invocation).await?;
        if changed != 1 || !load {
            return Ok((changed == 1, None));
        }
        let global = decode_global(global)?.ok_or_else(|| corrupt("changed transaction vanished"))?;
        let branches = decode_branches(&change.gid, data, states)?;
        Ok((true, Some((global, branches))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_prefix_and_shards_and_keep_the_rest() {
        let target = RedisTarget::parse("redis://:pw@127.0.0.1:6379/3?prefix=kt_a&shards=8").unwrap();
        assert_eq!((target.prefix.as_str(), target.shards), ("kt_a", 8));
        assert_eq!(target.url.as_str(), "redis://:pw@127.0.0.1:6379/3");
        let plain = RedisTarget::parse("rediss://h/0?protocol=resp3").unwrap();
        assert_eq!((plain.prefix.as_str(), plain.shards), (DEFAULT_PREFIX, DEFAULT_SHARDS));
        assert_eq!(plain.url.as_str(), "rediss://h/0?protocol=resp3");
        for bad in [
            "redis://h/0?shards=0",
            "redis://h/0?shards=x",
            "redis://h/0?prefix=a{b}",
            "http://h",
        ] {
            assert!(matches!(RedisTarget::parse(bad), Err(StoreError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn shards_are_stable() {
        // The gid-to-shard map is part of the stored layout: it must never change.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn branch_rows_round_trip() {
        let mut branch = Branch::new("g", "01", "action", "http://x/a:b", vec![0, 58, 255], 5);
        branch.finish_time = Some(9);
        let state = branch_state(3, &branch);
        let decoded = decode_branch(
            "g",
            &branch_key("01", "action"),
            &branch_data(&branch),
            state.as_bytes(),
        )
        .unwrap();
        assert_eq!(decoded, Branch { id: 3, ..branch });
        assert!(decode_branch("g", b"01", b"x", b"1|prepared|0|0||").is_err());
    }

    #[test]
    fn kv_records_keep_bars_in_values() {
        let entry = decode_kv("c", "k".into(), b"4|2|10|20|a|b").unwrap();
        assert_eq!((entry.id, entry.version, entry.value.as_str()), (4, 2, "a|b"));
    }
}
