-- What the directory knows of each Raiden user, as last seen: the profile as the homeserver gave it
-- (verification and capabilities are derived from it when loaded) and the presence.
CREATE TABLE directory_users (
    user_id        TEXT PRIMARY KEY NOT NULL,
    displayname    TEXT,
    avatar_url     TEXT,
    presence       TEXT NOT NULL, -- 'online' | 'unavailable' | 'offline'
    presence_at    BIGINT NOT NULL, -- unix milliseconds when the presence was learnt
    last_active_ms BIGINT -- unix milliseconds of the user's last activity, when known
);
