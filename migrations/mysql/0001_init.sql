-- kubetx schema for MySQL 8 and MariaDB 10.6+. Times are milliseconds since the Unix epoch.
-- Keys are VARBINARY so that they compare byte for byte (no case folding, no trailing-space
-- padding), as on SQLite and PostgreSQL. Generated columns stand in for partial indexes: only
-- unfinished transactions have a due_time, only finished ones a finished_time.

CREATE TABLE IF NOT EXISTS trans_global (
    id                 BIGINT          NOT NULL AUTO_INCREMENT,
    gid                VARBINARY(128)  NOT NULL,
    trans_type         VARCHAR(16)     CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status             VARCHAR(16)     CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    query_prepared     LONGTEXT        NOT NULL,
    protocol           LONGTEXT        NOT NULL,
    custom_data        LONGTEXT        NOT NULL,
    options            LONGTEXT        NOT NULL,
    create_time        BIGINT          NOT NULL,
    update_time        BIGINT          NOT NULL,
    finish_time        BIGINT          NULL,
    rollback_time      BIGINT          NULL,
    next_cron_time     BIGINT          NOT NULL,
    next_cron_interval BIGINT          NOT NULL,
    owner              VARBINARY(128)  NOT NULL DEFAULT '',
    result             LONGTEXT        NOT NULL,
    rollback_reason    LONGTEXT        NOT NULL,
    ext_data           LONGTEXT        NOT NULL,
    due_time           BIGINT GENERATED ALWAYS AS
        (CASE WHEN status IN ('prepared', 'submitted', 'aborting') THEN next_cron_time END) STORED,
    finished_time      BIGINT GENERATED ALWAYS AS
        (CASE WHEN status IN ('succeed', 'failed') THEN update_time END) STORED,
    PRIMARY KEY (id),
    UNIQUE KEY trans_global_gid (gid),
    KEY trans_global_due (due_time),
    KEY trans_global_finished (finished_time),
    KEY trans_global_create_time (create_time)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Branch operations; several rows share a branch_id (action and compensate, confirm and cancel).
CREATE TABLE IF NOT EXISTS trans_branch_op (
    id            BIGINT         NOT NULL AUTO_INCREMENT,
    gid           VARBINARY(128) NOT NULL,
    url           LONGTEXT       NOT NULL,
    bin_data      LONGBLOB       NOT NULL,
    branch_id     VARBINARY(128) NOT NULL,
    op            VARBINARY(128) NOT NULL,
    status        VARCHAR(16)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    create_time   BIGINT         NOT NULL,
    update_time   BIGINT         NOT NULL,
    finish_time   BIGINT         NULL,
    rollback_time BIGINT         NULL,
    PRIMARY KEY (id),
    UNIQUE KEY trans_branch_op_uniq (gid, branch_id, op)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Key-value records; topics are category 'topics'.
CREATE TABLE IF NOT EXISTS kv (
    id          BIGINT         NOT NULL AUTO_INCREMENT,
    cat         VARBINARY(128) NOT NULL,
    k           VARBINARY(128) NOT NULL,
    v           LONGTEXT       NOT NULL,
    version     BIGINT         NOT NULL DEFAULT 1,
    create_time BIGINT         NOT NULL,
    update_time BIGINT         NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY kv_uniq (cat, k)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
