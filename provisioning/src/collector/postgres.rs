//! The shared store: a PostgreSQL database that several collector processes write at once.
//!
//! Exactly-once across processes: `commit` is one READ COMMITTED transaction that first moves the
//! device's position with `UPDATE devices ... WHERE device = $1 AND next_seq = <expected>` (or,
//! for a device never seen, `INSERT ... ON CONFLICT (device) DO NOTHING`). The row lock that
//! statement takes orders concurrent uploads of one device: the loser waits for the winner's
//! commit, re-checks the condition against the new row, updates nothing and answers `Conflict`
//! with nothing written. Events go in with a plain `INSERT`, so the `(device, seq)` key still
//! refuses a second copy if everything else failed.
//!
//! Transport: `NoTls`. Meant for a database on the same host (loopback or a unix socket, e.g.
//! `postgres://collector@%2Frun%2Fpostgresql/fleet`); a database reached over a network needs TLS
//! (a rustls connector), which is a follow-up. A non-local host is accepted with a warning.
//!
//! `postgres::Client` is blocking and runs its own small tokio runtime: call this store from
//! plain threads or `spawn_blocking`, as the collector does. Connecting and dropping are moved to
//! a scoped thread of their own, so `open_store` and dropping the store are safe anywhere.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ::postgres::config::Host;
use ::postgres::error::SqlState;
use ::postgres::{Client, Config, NoTls};
use anyhow::Context;
use edgelora_ledger::merkle::Hash;

use super::sqlite::{
    check_commit, check_same_root, hash_from_blob, nodes_from_blob, nodes_to_blob, now_ms,
    sort_report, sql_bound, sql_u32, sql_u64, totals, u64_sql,
};
use super::store::{
    Commit, CommitOutcome, ContributorRow, DeviceLog, DeviceRow, KindRow, Report, Store,
};

/// Connections kept per store: enough for a few handlers to commit at once.
const POOL_SIZE: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `pg_advisory_xact_lock` key serialising schema creation between processes ("edgelora").
const SCHEMA_LOCK: i64 = 0x6564_6765_6c6f_7261;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device          TEXT PRIMARY KEY,
    epoch           BIGINT NOT NULL,
    epoch_first_seq BIGINT NOT NULL,
    next_seq        BIGINT NOT NULL,
    tree_size       BIGINT NOT NULL,
    tree_nodes      BYTEA NOT NULL,
    checkpoint      TEXT,
    suspect         TEXT,
    suspect_ms      BIGINT,
    updated_ms      BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    device            TEXT NOT NULL,
    seq               BIGINT NOT NULL,
    epoch             BIGINT NOT NULL,
    time_ms           BIGINT NOT NULL,
    leaf_hash         BYTEA NOT NULL,
    body              BYTEA NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    outcome           SMALLINT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS credits (
    device            TEXT NOT NULL,
    seq               BIGINT NOT NULL,
    contributor       TEXT NOT NULL,
    kind              TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (device, seq, contributor, kind)
);
CREATE TABLE IF NOT EXISTS gaps (
    device      TEXT NOT NULL,
    from_seq    BIGINT NOT NULL,
    to_seq      BIGINT NOT NULL,
    epoch       BIGINT NOT NULL,
    recorded_ms BIGINT NOT NULL,
    PRIMARY KEY (device, epoch, from_seq)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    device      TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    tree_size   BIGINT NOT NULL,
    root        BYTEA NOT NULL,
    note        TEXT NOT NULL,
    accepted_ms BIGINT NOT NULL,
    PRIMARY KEY (device, epoch, tree_size)
);
";

/// The collector's store in a PostgreSQL database, with a small pool of connections.
pub struct PgStore {
    config: Config,
    target: String,
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Client>,
    /// Connections alive: idle plus lent out.
    open: usize,
}

/// A connection lent by the pool; goes back (or, if broken, is forgotten) when dropped.
struct Lease<'a> {
    store: &'a PgStore,
    client: Option<Client>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a lease holds its client until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("a lease holds its client until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let mut pool = self.store.pool();
        if client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(client);
        }
        drop(pool);
        self.store.returned.notify_one();
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and creates the schema if missing.
    /// Safe to run from several processes at once.
    pub fn connect(url: &str) -> anyhow::Result<PgStore> {
        let mut config: Config = url
            .parse()
            .context("parsing the PostgreSQL URL (expected postgres://user@host:port/db)")?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("edgelora-fleet collector");
        }
        let target = describe_target(&config);
        if !is_local(&config) {
            tracing::warn!(
                "{target}: connecting without TLS; the collector's database should be on this \
                 host (TLS to a remote database is not supported yet)"
            );
        }
        let client = off_runtime(|| -> anyhow::Result<Client> {
            let mut client = config
                .connect(NoTls)
                .with_context(|| format!("connecting to {target}"))?;
            let mut tx = client.transaction()?;
            // Two processes creating the same table at once can fail on the catalog's unique
            // index even with IF NOT EXISTS; the lock makes the second wait and find it done.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            tx.batch_execute(SCHEMA)?;
            tx.commit()
                .with_context(|| format!("creating the collector schema in {target}"))?;
            Ok(client)
        })?;
        Ok(PgStore {
            config,
            target,
            pool: Mutex::new(Pool {
                idle: vec![client],
                open: 1,
            }),
            returned: Condvar::new(),
        })
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection, a new one if fewer than `POOL_SIZE` are open, else waits for one.
    fn lease(&self) -> anyhow::Result<Lease<'_>> {
        let mut pool = self.pool();
        loop {
            if let Some(client) = pool.idle.pop() {
                if client.is_closed() {
                    pool.open -= 1;
                    continue;
                }
                return Ok(Lease {
                    store: self,
                    client: Some(client),
                });
            }
            if pool.open < POOL_SIZE {
                pool.open += 1;
                drop(pool);
                return match self.config.connect(NoTls) {
                    Ok(client) => Ok(Lease {
                        store: self,
                        client: Some(client),
                    }),
                    Err(e) => {
                        self.pool().open -= 1;
                        self.returned.notify_one();
                        Err(e).with_context(|| format!("connecting to {}", self.target))
                    }
                };
            }
            pool = self
                .returned
                .wait(pool)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// `commit` without the mapping of database errors to outcomes.
    fn try_commit(&self, commit: &Commit) -> anyhow::Result<CommitOutcome> {
        let state = &commit.new_state;
        let now = now_ms();
        let epoch = i64::from(state.epoch);
        let first = u64_sql(state.epoch_first_seq, "epoch_first_seq")?;
        let next = u64_sql(state.next_seq, "next_seq")?;
        let size = u64_sql(state.tree_size, "tree_size")?;
        let nodes = nodes_to_blob(&state.tree_nodes);
        let mut client = self.lease()?;
        let mut tx = client.transaction()?;
        let moved = match commit.expected_next_seq {
            None => tx.execute(
                "INSERT INTO devices (device, epoch, epoch_first_seq, next_seq, tree_size,
                     tree_nodes, checkpoint, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (device) DO NOTHING",
                &[
                    &state.device,
                    &epoch,
                    &first,
                    &next,
                    &size,
                    &nodes,
                    &state.checkpoint,
                    &now,
                ],
            )?,
            Some(expected) => tx.execute(
                "UPDATE devices SET epoch = $2, epoch_first_seq = $3, next_seq = $4,
                     tree_size = $5, tree_nodes = $6, checkpoint = $7, updated_ms = $8
                 WHERE device = $1 AND next_seq = $9 AND suspect IS NULL",
                &[
                    &state.device,
                    &epoch,
                    &first,
                    &next,
                    &size,
                    &nodes,
                    &state.checkpoint,
                    &now,
                    &sql_bound(expected),
                ],
            )?,
        };
        if moved == 0 {
            // Moved, created by another process, or flagged suspect since it was read.
            tx.rollback()?;
            return Ok(CommitOutcome::Conflict);
        }
        if !commit.events.is_empty() {
            let n = commit.events.len();
            let (mut seqs, mut epochs, mut times, mut leaves, mut bodies) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut prompt, mut completion, mut outcomes) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut c_seqs, mut c_names, mut c_kinds, mut c_prompt, mut c_completion) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for e in &commit.events {
                // `check_commit` made sure `seq < next_seq`, which fits.
                let seq = sql_bound(e.seq);
                seqs.push(seq);
                epochs.push(i64::from(e.epoch));
                times.push(u64_sql(e.time_ms, "time_ms")?);
                leaves.push(&e.leaf_hash[..]);
                bodies.push(&e.body[..]);
                prompt.push(i64::from(e.prompt_tokens));
                completion.push(i64::from(e.completion_tokens));
                outcomes.push(i16::from(e.outcome));
                for (contributor, kind) in &e.credits {
                    c_seqs.push(seq);
                    c_names.push(contributor.as_str());
                    c_kinds.push(kind.name());
                    c_prompt.push(i64::from(e.prompt_tokens));
                    c_completion.push(i64::from(e.completion_tokens));
                }
            }
            // One statement per table per upload. Plain INSERT: a second copy of an event
            // violates the (device, seq) key and fails the whole transaction.
            tx.execute(
                "INSERT INTO events (device, seq, epoch, time_ms, leaf_hash, body,
                     prompt_tokens, completion_tokens, outcome)
                 SELECT $1::TEXT, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                     $5::BYTEA[], $6::BYTEA[], $7::BIGINT[], $8::BIGINT[], $9::SMALLINT[])",
                &[
                    &state.device,
                    &seqs,
                    &epochs,
                    &times,
                    &leaves,
                    &bodies,
                    &prompt,
                    &completion,
                    &outcomes,
                ],
            )?;
            if !c_seqs.is_empty() {
                tx.execute(
                    "INSERT INTO credits (device, seq, contributor, kind, prompt_tokens,
                         completion_tokens)
                     SELECT $1::TEXT, * FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[],
                         $5::BIGINT[], $6::BIGINT[])",
                    &[
                        &state.device,
                        &c_seqs,
                        &c_names,
                        &c_kinds,
                        &c_prompt,
                        &c_completion,
                    ],
                )?;
            }
        }
        if let Some(gap) = &commit.gap {
            tx.execute(
                "INSERT INTO gaps (device, from_seq, to_seq, epoch, recorded_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &state.device,
                    &u64_sql(gap.from_seq, "gap start")?,
                    &u64_sql(gap.to_seq, "gap end")?,
                    &i64::from(gap.epoch),
                    &now,
                ],
            )?;
        }
        if let Some((cp_epoch, cp_size, root, note)) = &commit.checkpoint {
            let cp_epoch_sql = i64::from(*cp_epoch);
            let cp_size_sql = u64_sql(*cp_size, "checkpoint tree size")?;
            let inserted = tx.execute(
                "INSERT INTO checkpoints (device, epoch, tree_size, root, note, accepted_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &state.device,
                    &cp_epoch_sql,
                    &cp_size_sql,
                    &&root[..],
                    note,
                    &now,
                ],
            )?;
            if inserted == 0 {
                let row = tx.query_one(
                    "SELECT root FROM checkpoints
                     WHERE device = $1 AND epoch = $2 AND tree_size = $3",
                    &[&state.device, &cp_epoch_sql, &cp_size_sql],
                )?;
                let stored: Vec<u8> = row.try_get(0)?;
                // On error `tx` is dropped, which rolls back.
                check_same_root(&state.device, *cp_epoch, &stored, root)?;
            }
        }
        tx.commit()?;
        Ok(CommitOutcome::Stored(commit.events.len() as u64))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Each client closes its connection on its own runtime; that must not happen on an
        // async worker thread (tokio panics), so close them off it.
        let idle = std::mem::take(&mut self.pool().idle);
        off_runtime(move || drop(idle));
    }
}

impl Store for PgStore {
    fn device_log(&self, device: &str) -> anyhow::Result<Option<DeviceLog>> {
        let row = self.lease()?.query_opt(
            "SELECT epoch, epoch_first_seq, next_seq, tree_size, tree_nodes, checkpoint, suspect
             FROM devices WHERE device = $1",
            &[&device],
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(DeviceLog {
            device: device.to_string(),
            epoch: sql_u32(row.try_get(0)?, "epoch")?,
            epoch_first_seq: sql_u64(row.try_get(1)?, "epoch_first_seq")?,
            next_seq: sql_u64(row.try_get(2)?, "next_seq")?,
            tree_size: sql_u64(row.try_get(3)?, "tree_size")?,
            tree_nodes: nodes_from_blob(row.try_get(4)?)?,
            checkpoint: row.try_get(5)?,
            suspect: row.try_get(6)?,
        }))
    }

    fn leaf_hashes(&self, device: &str, from: u64, to: u64) -> anyhow::Result<Vec<(u64, Hash)>> {
        let rows = self.lease()?.query(
            "SELECT seq, leaf_hash FROM events
             WHERE device = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
            &[&device, &sql_bound(from), &sql_bound(to)],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    sql_u64(r.try_get(0)?, "seq")?,
                    hash_from_blob(r.try_get(1)?)?,
                ))
            })
            .collect()
    }

    fn commit(&self, commit: &Commit) -> anyhow::Result<CommitOutcome> {
        check_commit(commit)?;
        let device = &commit.new_state.device;
        let err = match self.try_commit(commit) {
            Ok(outcome) => return Ok(outcome),
            Err(err) => err,
        };
        let code = err
            .downcast_ref::<::postgres::Error>()
            .and_then(|e| e.code())
            .cloned();
        match code {
            // Only under stricter isolation than ours, but harmless to honour: another
            // transaction won and nothing of this one was written.
            Some(c)
                if c == SqlState::T_R_SERIALIZATION_FAILURE
                    || c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                Ok(CommitOutcome::Conflict)
            }
            Some(c) if c == SqlState::UNIQUE_VIOLATION => Err(err.context(format!(
                "storing an upload of {device}: an event or gap of it is already stored \
                 (nothing of this upload was written)"
            ))),
            _ => Err(err.context(format!("storing an upload of {device}"))),
        }
    }

    fn mark_suspect(&self, device: &str, reason: &str) -> anyhow::Result<()> {
        self.lease()?.execute(
            "INSERT INTO devices (device, epoch, epoch_first_seq, next_seq, tree_size, tree_nodes,
                 suspect, suspect_ms, updated_ms)
             VALUES ($1, 0, 0, 0, 0, '\\x', $2, $3, $3)
             ON CONFLICT (device) DO UPDATE SET suspect = excluded.suspect,
                 suspect_ms = excluded.suspect_ms, updated_ms = excluded.updated_ms
             WHERE devices.suspect IS NULL",
            &[&device, &reason, &now_ms()],
        )?;
        Ok(())
    }

    fn report(&self, device: Option<&str>) -> anyhow::Result<Report> {
        let mut client = self.lease()?;
        // One snapshot for the three queries, so the sections agree with each other.
        let mut tx = client
            .build_transaction()
            .isolation_level(::postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let mut report = Report::default();
        for r in tx.query(
            "SELECT contributor, kind, COUNT(*), COALESCE(SUM(prompt_tokens), 0)::BIGINT,
                 COALESCE(SUM(completion_tokens), 0)::BIGINT
             FROM credits WHERE $1::TEXT IS NULL OR device = $1::TEXT
             GROUP BY contributor, kind",
            &[&device],
        )? {
            report.contributors.push(ContributorRow {
                contributor: r.try_get(0)?,
                kind: r.try_get(1)?,
                totals: totals(r.try_get(2)?, r.try_get(3)?, r.try_get(4)?)?,
            });
        }
        for r in tx.query(
            "SELECT d.device, d.next_seq, d.epoch, d.suspect, COALESCE(e.n, 0),
                 COALESCE(e.p, 0)::BIGINT, COALESCE(e.c, 0)::BIGINT, COALESCE(g.lost, 0)::BIGINT
             FROM devices d
             LEFT JOIN (SELECT device, COUNT(*) AS n, SUM(prompt_tokens) AS p,
                            SUM(completion_tokens) AS c
                        FROM events WHERE $1::TEXT IS NULL OR device = $1::TEXT
                        GROUP BY device) e
                 ON e.device = d.device
             LEFT JOIN (SELECT device, SUM(to_seq - from_seq) AS lost
                        FROM gaps WHERE $1::TEXT IS NULL OR device = $1::TEXT
                        GROUP BY device) g
                 ON g.device = d.device
             WHERE $1::TEXT IS NULL OR d.device = $1::TEXT",
            &[&device],
        )? {
            report.devices.push(DeviceRow {
                device: r.try_get(0)?,
                next_seq: sql_u64(r.try_get(1)?, "next_seq")?,
                epoch: sql_u32(r.try_get(2)?, "epoch")?,
                suspect: r.try_get(3)?,
                events: sql_u64(r.try_get(4)?, "event count")?,
                prompt_tokens: sql_u64(r.try_get(5)?, "prompt tokens")?,
                completion_tokens: sql_u64(r.try_get(6)?, "completion tokens")?,
                lost: sql_u64(r.try_get(7)?, "lost events")?,
            });
        }
        for r in tx.query(
            "SELECT kind, COUNT(*), COALESCE(SUM(prompt_tokens), 0)::BIGINT,
                 COALESCE(SUM(completion_tokens), 0)::BIGINT
             FROM credits WHERE $1::TEXT IS NULL OR device = $1::TEXT GROUP BY kind",
            &[&device],
        )? {
            report.kinds.push(KindRow {
                kind: r.try_get(0)?,
                totals: totals(r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)?,
            });
        }
        tx.commit()?;
        sort_report(&mut report);
        Ok(report)
    }

    fn event_count(&self, device: &str) -> anyhow::Result<(u64, u64)> {
        let row = self.lease()?.query_one(
            "SELECT COUNT(*), COUNT(DISTINCT seq) FROM events WHERE device = $1",
            &[&device],
        )?;
        Ok((
            sql_u64(row.try_get(0)?, "event count")?,
            sql_u64(row.try_get(1)?, "event count")?,
        ))
    }

    fn describe(&self) -> String {
        format!("postgres {}", self.target)
    }
}

/// Runs `f` on a scoped thread of its own: `postgres::Client` blocks on a private runtime,
/// which tokio forbids on an async worker thread.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// "user@host:port/db", without the password.
fn describe_target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

/// Loopback or a unix socket: the only places `NoTls` is acceptable.
fn is_local(config: &Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => true,
    }) && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}
