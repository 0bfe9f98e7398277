-- A branch row is updated once or twice after its insert (its outcome), and none of the columns
-- an update changes is indexed: with room left on the row's page, PostgreSQL writes the new
-- version there (a HOT update) and adds no index entries. Pages filled to 100% (the default)
-- left room only on the last page, so two thirds of the updates added an entry to both indexes
-- (BENCHMARKS.md, issue 15). Applies to pages written from now on.
ALTER TABLE trans_branch_op SET (fillfactor = 70);
