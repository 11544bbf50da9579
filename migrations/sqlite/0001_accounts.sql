-- API keys, their credit balances, daily request counts, and one row per charged request.
-- Plain SQL meant to run on SQLite and Postgres alike: BIGINT money and unix-second timestamps,
-- TEXT ids made by the application, no autoincrement.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,              -- key_XXXXXXXXXXXX, shown by `keys list`
    key_hash    TEXT NOT NULL UNIQUE,          -- sha256 hex of the key; the key itself is never stored
    key_prefix  TEXT NOT NULL,                 -- first characters of the key, to recognise it
    name        TEXT NOT NULL DEFAULT '',
    balance     BIGINT NOT NULL CHECK (balance >= 0),
    daily_quota BIGINT CHECK (daily_quota IS NULL OR daily_quota > 0),  -- NULL: unlimited
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

-- Accepted requests per key and UTC day (YYYY-MM-DD).
CREATE TABLE daily_usage (
    key_id   TEXT NOT NULL REFERENCES api_keys (id),
    day      TEXT NOT NULL,
    requests BIGINT NOT NULL CHECK (requests >= 0),
    PRIMARY KEY (key_id, day)
);

-- One row per request that reserved credits: reserved -> settled | refunded.
CREATE TABLE charges (
    request_id TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL REFERENCES api_keys (id),
    day        TEXT NOT NULL,
    credits    BIGINT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'refunded')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX charges_by_status ON charges (status);
