-- Transactions keyed by a plain rowid instead of AUTOINCREMENT, as 0004 did for branch rows:
-- AUTOINCREMENT makes every create scan and rewrite sqlite_sequence (a b-tree more written per
-- saga). Its one promise, that the id of a deleted row is never handed out again, is not needed:
-- a new row still gets an id above every row in the table, and ids only order transactions
-- (lists page by them) among the rows that exist. The table is rebuilt with the same columns,
-- rows, ids and indexes.
CREATE TABLE trans_global_new (
    id                 INTEGER PRIMARY KEY,
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
INSERT INTO trans_global_new (id, gid, trans_type, status, query_prepared, protocol, custom_data, options,
    create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, owner, result,
    rollback_reason, ext_data)
SELECT id, gid, trans_type, status, query_prepared, protocol, custom_data, options, create_time, update_time,
    finish_time, rollback_time, next_cron_time, next_cron_interval, owner, result, rollback_reason, ext_data
FROM trans_global;
DROP TABLE trans_global;
ALTER TABLE trans_global_new RENAME TO trans_global;
CREATE INDEX trans_global_create_time ON trans_global (create_time);
CREATE INDEX trans_global_finished ON trans_global (update_time) WHERE status IN ('succeed', 'failed');
CREATE INDEX trans_global_due ON trans_global (next_cron_time) WHERE status NOT IN ('succeed', 'failed');
DELETE FROM sqlite_sequence WHERE name = 'trans_global';
