-- Branch rows keyed by a plain rowid instead of AUTOINCREMENT. AUTOINCREMENT makes every insert
-- read and rewrite the table's row of sqlite_sequence (a second b-tree written per saga); its one
-- promise, that ids of deleted rows are never reused, is not needed: ids only order a
-- transaction's rows, and a new row still gets an id above every row in the table. SQLite cannot
-- drop AUTOINCREMENT in place, so the table is rebuilt with the same columns, rows and ids.
CREATE TABLE trans_branch_op_new (
    id            INTEGER PRIMARY KEY,
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
INSERT INTO trans_branch_op_new (id, gid, url, bin_data, branch_id, op, status, create_time, update_time,
    finish_time, rollback_time)
SELECT id, gid, url, bin_data, branch_id, op, status, create_time, update_time, finish_time, rollback_time
FROM trans_branch_op;
DROP TABLE trans_branch_op;
ALTER TABLE trans_branch_op_new RENAME TO trans_branch_op;
DELETE FROM sqlite_sequence WHERE name = 'trans_branch_op';
