-- Unix milliseconds when the stored profile (displayname, avatar_url, verified) was observed: a save
-- replaces the profile only with one observed at the same time or later, and the presence only with
-- one whose presence_at is not older, so saves that reach the database out of order cannot put an
-- older state back. 0: rows written before this column (any observation replaces them).
ALTER TABLE directory_users ADD COLUMN profile_at BIGINT NOT NULL DEFAULT 0;
