//! The server-side scripts of the Redis store. Every state change is one script, so it is
//! atomic on the server and conditional on the status and lease owner it expects, like the SQL
//! stores' fenced `UPDATE … WHERE` statements.
//!
//! Every script touches only keys of one hash tag (one transaction shard, or the KV tag), so
//! each runs on one Redis Cluster slot. Keys it reads by name (the transactions a due-index
//! entry names) share the declared keys' tag; a cluster-mode Redis refuses any script that
//! breaks this (see `prelude!`), and `.ci/run` runs the contract suite on one.
//!
//! Values are passed and stored as strings and compared as strings, except times, which are
//! compared as Lua numbers (exact for milliseconds: doubles hold integers up to 2^53).

use std::sync::LazyLock;

use redis::Script;

/// What every script starts with: the `#!lua` shebang, which makes Redis (7 or later) refuse,
/// in cluster mode, a script that touches keys of more than one slot (declared or not), so the
/// cluster-safety of the layout is checked by the server itself; then the helpers.
macro_rules! prelude {
    () => {
        r#"#!lua
local function finished(s) return s == 'succeed' or s == 'failed' end
local function unfinished(s) return s == 'prepared' or s == 'submitted' or s == 'aborting' end
-- An optional argument: '+value' is Some(value), '-' is None.
local function opt(s) if string.sub(s, 1, 1) == '+' then return string.sub(s, 2) end return nil end
-- Keeps the indexes in step with a transaction's status: unfinished ones are due at their
-- next_cron_time, finished ones wait for retention by their last write.
local function index(due, done, gid, status, nct, upd)
  if finished(status) then
    redis.call('ZREM', due, gid)
    redis.call('ZADD', done, upd, gid)
  elseif nct then
    redis.call('ZADD', due, nct, gid)
  end
end
-- Branch outcomes from ARGV[i] on: a count, then (branch key, status, at) triples. A branch
-- state is 'seq|status|create|update|finish|rollback'.
local function apply_updates(bs, i, now)
  local n = tonumber(ARGV[i])
  for k = 0, n - 1 do
    local f, st, at = ARGV[i + 1 + 3 * k], ARGV[i + 2 + 3 * k], ARGV[i + 3 + 3 * k]
    local old = redis.call('HGET', bs, f)
    if old then
      local seq, _, cr, _, fin, rb = string.match(old, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
      if st == 'succeed' then fin = at end
      if st == 'failed' then rb = at end
      redis.call('HSET', bs, f, table.concat({seq, st, cr, now, fin, rb}, '|'))
    end
  end
end
"#
    };
}

/// `create`. KEYS: global, branch data, branch states, due, ids, done. ARGV: gid, id, status,
/// next_cron_time, update_time, number of field pairs, the pairs, number of branches, then
/// (branch key, data, state) triples. Returns 1, or 0 when the gid exists.
pub(super) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local i = 7 + 2 * tonumber(ARGV[6])
local fields = {}
for k = 7, i - 1 do fields[#fields + 1] = ARGV[k] end
redis.call('HSET', KEYS[1], unpack(fields))
for k = 0, tonumber(ARGV[i]) - 1 do
  local at = i + 1 + 3 * k
  redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 1])
  redis.call('HSET', KEYS[3], ARGV[at], ARGV[at + 2])
end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
index(KEYS[4], KEYS[6], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
return 1
"#
    ))
});

/// `change_status`. KEYS: global, branch data, branch states, due, done. ARGV: from, to,
/// required owner (opt), required mode (opt), now, rollback_reason (opt), result (opt),
/// custom_data (opt), new owner (opt), new next_cron_time (opt), load ('1' returns the changed
/// transaction), then the branch updates. Returns {changed, global, branch data, branch states}.
pub(super) static CHANGE_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'status', 'owner', 'trans_type', 'gid')
if cur[1] ~= ARGV[1] then return {0, {}, {}, {}} end
local want_owner, want_type = opt(ARGV[3]), opt(ARGV[4])
if want_owner and cur[2] ~= want_owner then return {0, {}, {}, {}} end
if want_type and cur[3] ~= want_type then return {0, {}, {}, {}} end
local to, now = ARGV[2], ARGV[5]
local set = {'status', to, 'update_time', now}
local names = {'rollback_reason', 'result', 'custom_data', 'owner', 'next_cron_time'}
for k, name in ipairs(names) do
  local v = opt(ARGV[5 + k])
  if v then set[#set + 1] = name; set[#set + 1] = v end
end
if to == 'succeed' then set[#set + 1] = 'finish_time'; set[#set + 1] = now end
if to == 'failed' then set[#set + 1] = 'rollback_time'; set[#set + 1] = now end
redis.call('HSET', KEYS[1], unpack(set))
index(KEYS[4], KEYS[5], cur[4], to, opt(ARGV[10]), now)
apply_updates(KEYS[3], 12, now)
if ARGV[11] == '1' then
  return {1, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
end
return {1, {}, {}, {}}
"#
    ))
});

/// `add_branches`. KEYS: global, branch data, branch states. ARGV: number of branches, then
/// (branch key, data, status, create, update, finish, rollback) tuples. Returns
/// {'added'}, {'same'}, {'conflict', branch key} or {'status', current status or ''}.
pub(super) static ADD_BRANCHES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'prepared' then return {'status', status or ''} end
local n, missing = tonumber(ARGV[1]), {}
for k = 0, n - 1 do
  local at = 2 + 7 * k
  local data = redis.call('HGET', KEYS[2], ARGV[at])
  if not data then
    missing[#missing + 1] = at
  else
    local state = redis.call('HGET', KEYS[3], ARGV[at]) or ''
    local st = string.match(state, '^[^|]*|([^|]*)|')
    if data ~= ARGV[at + 1] or st ~= ARGV[at + 2] then return {'conflict', ARGV[at]} end
  end
end
if #missing == 0 then return {'same'} end
for _, at in ipairs(missing) do
  local seq = redis.call('HINCRBY', KEYS[1], 'bseq', 1)
  redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 1])
  redis.call('HSET', KEYS[3], ARGV[at], table.concat({seq, ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]}, '|'))
end
return {'added'}
"#
    ))
});

/// `update_branches`. KEYS: global, branch states. ARGV: owner, status, now, then the updates.
pub(super) static UPDATE_BRANCHES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'status')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
apply_updates(KEYS[2], 4, ARGV[3])
return 1
"#
    ))
});

/// `claim`. KEYS: global, due. ARGV: owner, until, now, gid.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'status', 'owner', 'next_cron_time')
if not unfinished(cur[1]) then return 0 end
if cur[2] ~= '' and tonumber(cur[3]) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'next_cron_time', ARGV[2], 'update_time', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"#
    ))
});

/// The second step of `claim_due` on one shard: takes the named transactions that are still
/// unfinished and due. KEYS: due. ARGV: owner, until, now, key prefix of the shard, gids.
/// Returns the gids taken. A due entry of a finished or deleted transaction is dropped.
pub(super) static CLAIM_LISTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local out = {}
for k = 5, #ARGV do
  local gid = ARGV[k]
  local g = ARGV[4] .. 'g:' .. gid
  local cur = redis.call('HMGET', g, 'status', 'next_cron_time')
  if unfinished(cur[1]) then
    if tonumber(cur[2]) <= tonumber(ARGV[3]) then
      redis.call('HSET', g, 'owner', ARGV[1], 'next_cron_time', ARGV[2], 'update_time', ARGV[3])
      redis.call('ZADD', KEYS[1], ARGV[2], gid)
      out[#out + 1] = gid
    end
  else
    redis.call('ZREM', KEYS[1], gid)
  end
end
return out
"#
    ))
});

/// One page of `reclaim_leases` in a shard: of the `due` entries after `now` (leases and
/// parked retries), from position `offset`, at most `limit`, releases (due `now`) the unfinished
/// ones whose owner starts with `prefix` and is not `owner`. Returns {released, looked at}.
/// KEYS: due. ARGV: prefix, owner, now, base, offset, limit.
pub(super) static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '+inf', 'LIMIT', ARGV[5], ARGV[6])
local released = 0
for _, gid in ipairs(entries) do
  local g = ARGV[4] .. 'g:' .. gid
  local cur = redis.call('HMGET', g, 'owner', 'status')
  local owner = cur[1] or ''
  if unfinished(cur[2]) and owner ~= ARGV[2] and string.sub(owner, 1, #ARGV[1]) == ARGV[1] then
    redis.call('HSET', g, 'owner', '', 'next_cron_time', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[3], gid)
    released = released + 1
  end
end
return {released, #entries}
"#
    ))
});

/// `extend_lease`. KEYS: global, due. ARGV: owner, status, until, gid.
pub(super) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'status')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'next_cron_time', ARGV[3])
if unfinished(cur[2]) then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4]) end
return 1
"#
    ))
});

/// `release`. KEYS: global, due. ARGV: owner, status, next_cron_time, interval, now, gid.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'status')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '', 'next_cron_time', ARGV[3], 'next_cron_interval', ARGV[4], 'update_time', ARGV[5])
if unfinished(cur[2]) then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6]) end
return 1
"#
    ))
});

/// `reset_next_cron_time`. KEYS: global, due. ARGV: now, gid. Returns -1 for an unknown gid.
pub(super) static RESET_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'status')
if not cur[2] then return -1 end
if cur[1] ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'next_cron_time', ARGV[1])
if unfinished(cur[2]) then redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2]) end
return 1
"#
    ))
});

/// The second step of `reset_cron_times` on one shard. KEYS: due. ARGV: now, after, key
/// prefix, gids. Returns how many moved.
pub(super) static RESET_LISTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local moved = 0
for k = 4, #ARGV do
  local g = ARGV[3] .. 'g:' .. ARGV[k]
  local cur = redis.call('HMGET', g, 'owner', 'status', 'next_cron_time')
  if cur[1] == '' and unfinished(cur[2]) and tonumber(cur[3]) > tonumber(ARGV[2]) then
    redis.call('HSET', g, 'next_cron_time', ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[k])
    moved = moved + 1
  end
end
return moved
"#
    ))
});

/// The second step of `purge_finished` on one shard. KEYS: done, ids. ARGV: before, key
/// prefix, gids. Deletes the named transactions still finished and older than `before`.
pub(super) static PURGE_LISTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local deleted = 0
for k = 3, #ARGV do
  local gid = ARGV[k]
  local g = ARGV[2] .. 'g:' .. gid
  local cur = redis.call('HMGET', g, 'status', 'update_time')
  if not cur[1] then
    redis.call('ZREM', KEYS[1], gid)
  elseif finished(cur[1]) and tonumber(cur[2]) < tonumber(ARGV[1]) then
    redis.call('DEL', g, ARGV[2] .. 'bd:' .. gid, ARGV[2] .. 'bs:' .. gid)
    redis.call('ZREM', KEYS[1], gid)
    redis.call('ZREM', KEYS[2], gid)
    deleted = deleted + 1
  end
end
return deleted
"#
    ))
});

/// One shard's page of `list`, newest first. KEYS: ids. ARGV: max id (a ZSET bound), limit,
/// status, mode, created from, created to ('' for no filter), key prefix, gid prefix ('' for
/// none). Returns (gid, id) pairs, flat. Walks the shard's id index in chunks until `limit` rows match.
pub(super) static LIST_SHARD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local limit, out, found, offset = tonumber(ARGV[2]), {}, 0, 0
local from, to = tonumber(ARGV[5]), tonumber(ARGV[6])
while found < limit do
  local chunk = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES', 'LIMIT', offset, 256)
  if #chunk == 0 then break end
  offset = offset + #chunk / 2
  for k = 1, #chunk, 2 do
    local cur = redis.call('HMGET', ARGV[7] .. 'g:' .. chunk[k], 'status', 'trans_type', 'create_time')
    local created = tonumber(cur[3])
    if cur[1] and (ARGV[3] == '' or cur[1] == ARGV[3]) and (ARGV[4] == '' or cur[2] == ARGV[4])
      and (not from or created >= from) and (not to or created <= to)
      and (ARGV[8] == '' or string.sub(chunk[k], 1, #ARGV[8]) == ARGV[8]) and found < limit then
      out[#out + 1] = chunk[k]
      out[#out + 1] = chunk[k + 1]
      found = found + 1
    end
  end
end
return out
"#
    ))
});

/// `kv_create`. KEYS: category hash, category ids, id counter. ARGV: key, value, now.
pub(super) static KV_CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], table.concat({id, 1, ARGV[3], ARGV[3]}, '|') .. '|' .. ARGV[2])
redis.call('ZADD', KEYS[2], id, ARGV[1])
return 1
"#
    ))
});

/// `kv_update`. KEYS: category hash. ARGV: key, value, version, now.
pub(super) static KV_UPDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local id, version, created = string.match(old, '^([^|]*)|([^|]*)|([^|]*)|')
if version ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], table.concat({id, tonumber(version) + 1, created, ARGV[4]}, '|') .. '|' .. ARGV[2])
return 1
"#
    ))
});

/// `kv_delete`. KEYS: category hash, category ids. ARGV: key.
pub(super) static KV_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"#
    ))
});

/// `kv_scan`. KEYS: category hash, category ids. ARGV: after id, limit. Returns (key, record)
/// pairs, flat, by id.
pub(super) static KV_SCAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        prelude!(),
        r#"
local keys = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {}
for _, k in ipairs(keys) do
  local v = redis.call('HGET', KEYS[1], k)
  if v then out[#out + 1] = k; out[#out + 1] = v end
end
return out
"#
    ))
});
