-- Whether the displayname proves the user id's address, as computed when the row was written
-- (1 or 0), so that a restart need not recover every signature again. NULL: not known (rows written
-- before this column); computed when loaded. BIGINT like the other integers: one type for sqlx's Any
-- driver on both backends.
ALTER TABLE directory_users ADD COLUMN verified BIGINT;
