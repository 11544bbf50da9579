-- Written and deleted in one transaction by the health check while the database reports a failed
-- write: it commits only once the database can grow again. Always empty.
CREATE TABLE write_probe (
    id     BIGINT PRIMARY KEY,
    filler TEXT NOT NULL
);
