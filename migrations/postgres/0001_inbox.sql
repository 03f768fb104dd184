-- Every appservice transaction the homeserver delivered. A retry (same id, same fingerprint) is not
-- processed again. An id reused for other content (a homeserver whose database was reset) is stored
-- under `<txn_id>~<fingerprint>`.
CREATE TABLE appservice_transactions (
    txn_id      TEXT PRIMARY KEY NOT NULL,
    fingerprint TEXT NOT NULL, -- hash of the event ids (or other items) carried
    received_at BIGINT NOT NULL -- unix milliseconds
);

-- What the transactions carried, one row per event, ephemeral item or to-device message, in arrival
-- order. `body` is the JSON object exactly as the homeserver sent it.
CREATE TABLE inbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    kind        TEXT NOT NULL, -- 'event' | 'ephemeral' | 'to_device'
    event_type  TEXT NOT NULL,
    sender      TEXT,
    room_id     TEXT,
    event_id    TEXT,
    to_user_id  TEXT,
    body        TEXT NOT NULL
);

-- A room event is stored once even if it ever came in two transactions.
CREATE UNIQUE INDEX inbox_event_id ON inbox (event_id) WHERE event_id IS NOT NULL;

-- How far each consumer has handled the inbox; items after last_id are handed to it again at start.
CREATE TABLE inbox_cursors (
    consumer TEXT PRIMARY KEY NOT NULL,
    last_id  BIGINT NOT NULL
);
