-- Retention deletes finished transactions by age (their last write): index only those.
CREATE INDEX IF NOT EXISTS trans_global_finished ON trans_global (update_time)
    WHERE status IN ('succeed', 'failed');
