-- Global transactions. Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS trans_global (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    gid                TEXT    NOT NULL UNIQUE,
    trans_type         TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    query_prepared     TEXT    NOT NULL DEFAULT '',
    protocol           TEXT    NOT NULL DEFAULT '',
    custom_data        TEXT    NOT NULL DEFAULT '',
    options            TEXT    NOT NULL DEFAULT '',
    create_time        INTEGER NOT NULL,
    update_time        INTEGER NOT NULL,
    finish_time        INTEGER,
    rollback_time      INTEGER,
    next_cron_time     INTEGER NOT NULL,
    next_cron_interval INTEGER NOT NULL,
    owner              TEXT    NOT NULL DEFAULT '',
    result             TEXT    NOT NULL DEFAULT '',
    rollback_reason    TEXT    NOT NULL DEFAULT '',
    ext_data           TEXT    NOT NULL DEFAULT ''
);

-- Only unfinished transactions are ever due: keep finished ones out of the scheduler's index.
CREATE INDEX IF NOT EXISTS trans_global_due ON trans_global (next_cron_time)
    WHERE status IN ('prepared', 'submitted', 'aborting');
CREATE INDEX IF NOT EXISTS trans_global_create_time ON trans_global (create_time);

-- Branch operations; several rows share a branch_id (action and compensate, confirm and cancel).
CREATE TABLE IF NOT EXISTS trans_branch_op (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    gid           TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    bin_data      BLOB    NOT NULL,
    branch_id     TEXT    NOT NULL,
    op            TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    create_time   INTEGER NOT NULL,
    update_time   INTEGER NOT NULL,
    finish_time   INTEGER,
    rollback_time INTEGER,
    UNIQUE (gid, branch_id, op)
);

-- Key-value records; topics are category 'topics'.
CREATE TABLE IF NOT EXISTS kv (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    cat         TEXT    NOT NULL,
    k           TEXT    NOT NULL,
    v           TEXT    NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    UNIQUE (cat, k)
);
