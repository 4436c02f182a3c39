//! The default store: one SQLite file under the fleet directory (`<fleet dir>/collector.db`).
//!
//! WAL mode with `synchronous=FULL`: a commit returns only once its WAL frames are on disk, so
//! an upload the collector acknowledged survives a power cut. Every `commit` runs in an
//! `IMMEDIATE` transaction (the write lock is taken before the device row is read), so two
//! collector processes sharing the file cannot both advance the same position; the second waits
//! for the lock (`busy_timeout`), then sees the moved position and answers `Conflict`.
//!
//! In both backends `commit` also answers `Conflict` for a device flagged suspect (by
//! `mark_suspect`, possibly from another process after the state was read): re-reading shows the
//! flag, and the upload is refused there, so a suspect device's position never moves.
//!
//! The helpers at the end (integer conversions, the tree-node codec, report ordering) are shared
//! with the PostgreSQL backend, which keeps the same logical schema.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use edgelora_ledger::merkle::Hash;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use super::store::{
    Commit, CommitOutcome, ContributorRow, DeviceLog, DeviceRow, KindRow, Report, Store, Totals,
};

/// How long a writer waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device          TEXT PRIMARY KEY NOT NULL,
    epoch           INTEGER NOT NULL,
    epoch_first_seq INTEGER NOT NULL,
    next_seq        INTEGER NOT NULL,
    tree_size       INTEGER NOT NULL,
    tree_nodes      BLOB NOT NULL,
    checkpoint      TEXT,
    suspect         TEXT,
    suspect_ms      INTEGER,
    updated_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    device            TEXT NOT NULL,
    seq               INTEGER NOT NULL,
    epoch             INTEGER NOT NULL,
    time_ms           INTEGER NOT NULL,
    leaf_hash         BLOB NOT NULL,
    body              BLOB NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    outcome           INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credits (
    device            TEXT NOT NULL,
    seq               INTEGER NOT NULL,
    contributor       TEXT NOT NULL,
    kind              TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (device, seq, contributor, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    device      TEXT NOT NULL,
    from_seq    INTEGER NOT NULL,
    to_seq      INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    recorded_ms INTEGER NOT NULL,
    PRIMARY KEY (device, epoch, from_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    device      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    tree_size   INTEGER NOT NULL,
    root        BLOB NOT NULL,
    note        TEXT NOT NULL,
    accepted_ms INTEGER NOT NULL,
    PRIMARY KEY (device, epoch, tree_size)
) WITHOUT ROWID;
";

/// The collector's store in one SQLite file. One connection behind a mutex: SQLite has a single
/// writer anyway, and the collector's handlers hold it only for one short transaction.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the collector database {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        enable_wal(&conn, path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // IMMEDIATE: collectors starting at once on a new file take turns instead of failing
        // with a stale snapshot (which SQLite reports as busy without waiting).
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
            .with_context(|| format!("creating the collector schema in {}", path.display()))?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction dropped (rolled back) the transaction; the connection is fine.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Switches the file to WAL mode. On a new file shared by processes starting at once, the
/// switch can answer "busy" without consulting the busy timeout, so it is retried here.
fn enable_wal(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) => {
                ensure!(
                    mode.eq_ignore_ascii_case("wal"),
                    "{}: SQLite refused WAL mode (journal_mode is {mode}); is it on a network \
                     filesystem?",
                    path.display()
                );
                return Ok(());
            }
            Err(e)
                if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{}: switching to WAL mode", path.display()));
            }
        }
    }
}

impl Store for SqliteStore {
    fn device_log(&self, device: &str) -> anyhow::Result<Option<DeviceLog>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT epoch, epoch_first_seq, next_seq, tree_size, tree_nodes, checkpoint, suspect
                 FROM devices WHERE device = ?1",
                [device],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((epoch, first, next, size, nodes, checkpoint, suspect)) = row else {
            return Ok(None);
        };
        Ok(Some(DeviceLog {
            device: device.to_string(),
            epoch: sql_u32(epoch, "epoch")?,
            epoch_first_seq: sql_u64(first, "epoch_first_seq")?,
            next_seq: sql_u64(next, "next_seq")?,
            tree_size: sql_u64(size, "tree_size")?,
            tree_nodes: nodes_from_blob(&nodes)?,
            checkpoint,
            suspect,
        }))
    }

    fn leaf_hashes(&self, device: &str, from: u64, to: u64) -> anyhow::Result<Vec<(u64, Hash)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, leaf_hash FROM events
             WHERE device = ?1 AND seq >= ?2 AND seq < ?3 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![device, sql_bound(from), sql_bound(to)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|row| {
            let (seq, hash) = row?;
            Ok((sql_u64(seq, "seq")?, hash_from_blob(&hash)?))
        })
        .collect()
    }

    fn commit(&self, commit: &Commit) -> anyhow::Result<CommitOutcome> {
        check_commit(commit)?;
        let state = &commit.new_state;
        let now = now_ms();
        let mut conn = self.conn();
        // IMMEDIATE: take the write lock now, so the position read below cannot change before
        // this transaction ends.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<(i64, Option<String>)> = tx
            .query_row(
                "SELECT next_seq, suspect FROM devices WHERE device = ?1",
                [&state.device],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let position = match (commit.expected_next_seq, current) {
            (None, None) => {
                "INSERT INTO devices (device, epoch, epoch_first_seq, next_seq, tree_size,
                     tree_nodes, checkpoint, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            }
            (Some(expected), Some((next, None))) if sql_u64(next, "next_seq")? == expected => {
                "UPDATE devices SET epoch = ?2, epoch_first_seq = ?3, next_seq = ?4,
                     tree_size = ?5, tree_nodes = ?6, checkpoint = ?7, updated_ms = ?8
                 WHERE device = ?1"
            }
            // Moved, created by someone else, or flagged suspect since it was read: the caller
            // re-reads. Dropping `tx` rolls back (nothing was written).
            _ => return Ok(CommitOutcome::Conflict),
        };
        tx.execute(
            position,
            params![
                state.device,
                state.epoch,
                u64_sql(state.epoch_first_seq, "epoch_first_seq")?,
                u64_sql(state.next_seq, "next_seq")?,
                u64_sql(state.tree_size, "tree_size")?,
                nodes_to_blob(&state.tree_nodes),
                state.checkpoint,
                now,
            ],
        )?;
        {
            let mut event = tx.prepare_cached(
                "INSERT INTO events (device, seq, epoch, time_ms, leaf_hash, body,
                     prompt_tokens, completion_tokens, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut credit = tx.prepare_cached(
                "INSERT INTO credits (device, seq, contributor, kind, prompt_tokens,
                     completion_tokens)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in &commit.events {
                let seq = u64_sql(e.seq, "seq")?;
                // Plain INSERT: the (device, seq) key refuses a second copy, failing the commit.
                event
                    .execute(params![
                        state.device,
                        seq,
                        e.epoch,
                        u64_sql(e.time_ms, "time_ms")?,
                        &e.leaf_hash[..],
                        e.body,
                        e.prompt_tokens,
                        e.completion_tokens,
                        e.outcome,
                    ])
                    .with_context(|| {
                        format!(
                            "storing event {} of {} (already stored?)",
                            e.seq, state.device
                        )
                    })?;
                for (contributor, kind) in &e.credits {
                    credit.execute(params![
                        state.device,
                        seq,
                        contributor,
                        kind.name(),
                        e.prompt_tokens,
                        e.completion_tokens,
                    ])?;
                }
            }
        }
        if let Some(gap) = &commit.gap {
            tx.execute(
                "INSERT INTO gaps (device, from_seq, to_seq, epoch, recorded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    state.device,
                    u64_sql(gap.from_seq, "gap start")?,
                    u64_sql(gap.to_seq, "gap end")?,
                    gap.epoch,
                    now,
                ],
            )
            .with_context(|| format!("recording the gap {gap:?} of {}", state.device))?;
        }
        if let Some((epoch, size, root, note)) = &commit.checkpoint {
            let size = u64_sql(*size, "checkpoint tree size")?;
            let inserted = tx.execute(
                "INSERT INTO checkpoints (device, epoch, tree_size, root, note, accepted_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![state.device, epoch, size, &root[..], note, now],
            )?;
            if inserted == 0 {
                let stored: Vec<u8> = tx.query_row(
                    "SELECT root FROM checkpoints WHERE device = ?1 AND epoch = ?2 AND tree_size = ?3",
                    params![state.device, epoch, size],
                    |r| r.get(0),
                )?;
                check_same_root(&state.device, *epoch, &stored, root)?;
            }
        }
        tx.commit()
            .with_context(|| format!("committing an upload of {}", state.device))?;
        Ok(CommitOutcome::Stored(commit.events.len() as u64))
    }

    fn mark_suspect(&self, device: &str, reason: &str) -> anyhow::Result<()> {
        let now = now_ms();
        self.conn().execute(
            "INSERT INTO devices (device, epoch, epoch_first_seq, next_seq, tree_size, tree_nodes,
                 suspect, suspect_ms, updated_ms)
             VALUES (?1, 0, 0, 0, 0, X'', ?2, ?3, ?3)
             ON CONFLICT (device) DO UPDATE SET suspect = excluded.suspect,
                 suspect_ms = excluded.suspect_ms, updated_ms = excluded.updated_ms
             WHERE devices.suspect IS NULL",
            params![device, reason, now],
        )?;
        Ok(())
    }

    fn report(&self, device: Option<&str>) -> anyhow::Result<Report> {
        let conn = self.conn();
        let mut report = Report::default();
        let mut stmt = conn.prepare_cached(
            "SELECT contributor, kind, COUNT(*), COALESCE(SUM(prompt_tokens), 0),
                 COALESCE(SUM(completion_tokens), 0)
             FROM credits WHERE ?1 IS NULL OR device = ?1 GROUP BY contributor, kind",
        )?;
        let rows = stmt.query_map([device], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        for row in rows {
            let (contributor, kind, n, p, c) = row?;
            report.contributors.push(ContributorRow {
                contributor,
                kind,
                totals: totals(n, p, c)?,
            });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT d.device, d.next_seq, d.epoch, d.suspect, COALESCE(e.n, 0), COALESCE(e.p, 0),
                 COALESCE(e.c, 0), COALESCE(g.lost, 0)
             FROM devices d
             LEFT JOIN (SELECT device, COUNT(*) AS n, SUM(prompt_tokens) AS p,
                            SUM(completion_tokens) AS c
                        FROM events WHERE ?1 IS NULL OR device = ?1 GROUP BY device) e
                 ON e.device = d.device
             LEFT JOIN (SELECT device, SUM(to_seq - from_seq) AS lost
                        FROM gaps WHERE ?1 IS NULL OR device = ?1 GROUP BY device) g
                 ON g.device = d.device
             WHERE ?1 IS NULL OR d.device = ?1",
        )?;
        let rows = stmt.query_map([device], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (device, next, epoch, suspect, events, p, c, lost) = row?;
            report.devices.push(DeviceRow {
                device,
                events: sql_u64(events, "event count")?,
                next_seq: sql_u64(next, "next_seq")?,
                epoch: sql_u32(epoch, "epoch")?,
                lost: sql_u64(lost, "lost events")?,
                suspect,
                prompt_tokens: sql_u64(p, "prompt tokens")?,
                completion_tokens: sql_u64(c, "completion tokens")?,
            });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT kind, COUNT(*), COALESCE(SUM(prompt_tokens), 0),
                 COALESCE(SUM(completion_tokens), 0)
             FROM credits WHERE ?1 IS NULL OR device = ?1 GROUP BY kind",
        )?;
        let rows = stmt.query_map([device], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        for row in rows {
            let (kind, n, p, c) = row?;
            report.kinds.push(KindRow {
                kind,
                totals: totals(n, p, c)?,
            });
        }
        sort_report(&mut report);
        Ok(report)
    }

    fn event_count(&self, device: &str) -> anyhow::Result<(u64, u64)> {
        let (n, distinct): (i64, i64) = self.conn().query_row(
            "SELECT COUNT(*), COUNT(DISTINCT seq) FROM events WHERE device = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((
            sql_u64(n, "event count")?,
            sql_u64(distinct, "event count")?,
        ))
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }
}

// ---- Shared with the PostgreSQL backend (`super::postgres`): the same logical schema. ----

/// Sanity checks on what the verifier hands over; a failure is a collector bug, not a conflict.
pub(super) fn check_commit(commit: &Commit) -> anyhow::Result<()> {
    let state = &commit.new_state;
    ensure!(!state.device.is_empty(), "commit without a device name");
    if let Some(expected) = commit.expected_next_seq {
        ensure!(
            state.next_seq >= expected,
            "commit for {} moves next_seq backwards ({expected} -> {})",
            state.device,
            state.next_seq
        );
    }
    let mut last = None;
    for e in &commit.events {
        ensure!(
            last.is_none_or(|l| e.seq > l) && e.seq < state.next_seq,
            "commit for {}: event {} out of order or beyond next_seq {}",
            state.device,
            e.seq,
            state.next_seq
        );
        last = Some(e.seq);
    }
    Ok(())
}

/// A checkpoint for a tree size already accepted must have the same root: two roots for one
/// size is a fork the verifier should have caught.
pub(super) fn check_same_root(
    device: &str,
    epoch: u32,
    stored: &[u8],
    root: &Hash,
) -> anyhow::Result<()> {
    if stored != &root[..] {
        bail!(
            "device {device}: a different checkpoint root for an already accepted tree size \
             (epoch {epoch}); refusing the upload"
        );
    }
    Ok(())
}

/// Now, Unix milliseconds, for the bookkeeping columns (`updated_ms`, `recorded_ms`, ...).
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A u64 stored as the databases' signed 64-bit integer. Sequence numbers, times and token sums
/// stay far below 2^63; anything above is refused rather than wrapped.
pub(super) fn u64_sql(v: u64, what: &str) -> anyhow::Result<i64> {
    i64::try_from(v).map_err(|_| anyhow!("{what} {v} does not fit a signed 64-bit column"))
}

/// A range bound (`leaf_hashes`): saturates, since "up to u64::MAX" means "to the end".
pub(super) fn sql_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer back to u64; a negative value means the database was edited by hand.
pub(super) fn sql_u64(v: i64, what: &str) -> anyhow::Result<u64> {
    u64::try_from(v)
        .map_err(|_| anyhow!("stored {what} is negative ({v}); the database is damaged"))
}

pub(super) fn sql_u32(v: i64, what: &str) -> anyhow::Result<u32> {
    u32::try_from(v)
        .map_err(|_| anyhow!("stored {what} {v} is out of range; the database is damaged"))
}

pub(super) fn totals(requests: i64, prompt: i64, completion: i64) -> anyhow::Result<Totals> {
    Ok(Totals {
        requests: sql_u64(requests, "request count")?,
        prompt_tokens: sql_u64(prompt, "prompt tokens")?,
        completion_tokens: sql_u64(completion, "completion tokens")?,
    })
}

/// The tree's right-edge nodes as one blob of 32-byte hashes.
pub(super) fn nodes_to_blob(nodes: &[Hash]) -> Vec<u8> {
    nodes.concat()
}

pub(super) fn nodes_from_blob(blob: &[u8]) -> anyhow::Result<Vec<Hash>> {
    ensure!(
        blob.len().is_multiple_of(32),
        "stored tree nodes are {} bytes, not a multiple of 32; the database is damaged",
        blob.len()
    );
    blob.chunks_exact(32).map(hash_from_blob).collect()
}

pub(super) fn hash_from_blob(blob: &[u8]) -> anyhow::Result<Hash> {
    Hash::try_from(blob).map_err(|_| {
        anyhow!(
            "stored hash is {} bytes, not 32; the database is damaged",
            blob.len()
        )
    })
}

/// Puts the rows in the order `Report` promises, by byte order of the names (SQL collations
/// differ between backends and locales, so the order is not left to `ORDER BY`).
pub(super) fn sort_report(report: &mut Report) {
    report
        .contributors
        .sort_by(|a, b| (&a.contributor, &a.kind).cmp(&(&b.contributor, &b.kind)));
    report.devices.sort_by(|a, b| a.device.cmp(&b.device));
    report.kinds.sort_by(|a, b| a.kind.cmp(&b.kind));
}
