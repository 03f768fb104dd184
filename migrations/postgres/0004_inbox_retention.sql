-- Inbox retention: when each item was stored, so that items every consumer has handled can be
-- deleted once they are older than [database] inbox_retention_secs. Rows stored before this
-- migration count as stored long ago.
ALTER TABLE inbox ADD COLUMN stored_at BIGINT NOT NULL DEFAULT 0; -- unix milliseconds

-- How far each consumer has handled the inbox, per instance sharing the database: items after
-- last_id are handed to it again at start. last_id only moves forward. updated_at (unix
-- milliseconds) is when it last moved: a position not moved for [database]
-- inbox_consumer_timeout_secs belongs to a consumer gone for good and no longer holds items back.
CREATE TABLE inbox_positions (
    consumer   TEXT NOT NULL,
    instance   TEXT NOT NULL,
    last_id    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, instance)
);
-- Positions recorded before instances had names belong to the default instance, 'main'.
INSERT INTO inbox_positions (consumer, instance, last_id, updated_at)
    SELECT consumer, 'main', last_id, CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) FROM inbox_cursors;
DROP TABLE inbox_cursors;

-- Transactions are pruned by age.
CREATE INDEX appservice_transactions_received_at ON appservice_transactions (received_at);
