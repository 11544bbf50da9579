-- Several servers sharing one database: each registers an instance row and heart-beats it; a
-- reservation names the instance that made it, so a live instance can refund the open
-- reservations of one that stopped heart-beating. (Timestamps are the database's clock.)
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

ALTER TABLE charges ADD COLUMN instance_id TEXT;
CREATE INDEX charges_by_instance ON charges (instance_id, status);

-- Idempotency-Key: the first request with a key (per API key) runs, a repeat with the same body
-- gets its response. 'running' until the first one ends; rows older than 24 h are deleted.
CREATE TABLE idempotency (
    owner       TEXT NOT NULL,               -- api_keys.id, or '' in open mode
    idem_key    TEXT NOT NULL,
    body_hash   TEXT NOT NULL,               -- sha256 hex of the request body
    request_id  TEXT NOT NULL,               -- the first request's ID
    instance_id TEXT NOT NULL,               -- the instance running it
    status      TEXT NOT NULL CHECK (status IN ('running', 'done')),
    response    TEXT,                        -- the first response's body (JSON), once done
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
