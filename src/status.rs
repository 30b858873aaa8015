//! `slotstream status`, `resync` and `teardown`: what the operator asks of a pipeline's state.

use std::io::{BufRead, IsTerminal, Write};

use serde::Serialize;

use crate::config::Config;
use crate::error::Error;
use crate::metrics::forecast::{Forecaster, Sample, human_seconds};
use crate::metrics::monitor;
use crate::postgres::lock::{self, PipelineLock};
use crate::postgres::{self, PgError, state};
use crate::source::{SourceError, stream};

/// Below this lag the slot is taken as caught up for `lag_seconds` (a running pipeline's idle
/// checkpoint follows the WAL once it moved this far).
const LAG_SECONDS_MIN_BYTES: i64 = 1024 * 1024;

/// The status report (`--json` prints it as is; docs/status.schema.json describes it).
#[derive(Debug, Serialize)]
pub struct Status {
    /// Pipeline name.
    pub pipeline: String,
    /// Slot name.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// Whether a process is reading it.
    pub slot_active: bool,
    /// The walsender streaming from it (`pg_replication_slots.active_pid`).
    pub slot_active_pid: Option<i32>,
    /// The `slotstream run` holding the pipeline's lock: its OS process id, if one runs.
    pub run_pid: Option<u32>,
    /// Whether a `slotstream run` of this pipeline is live (it holds the pipeline lock).
    pub running: bool,
    /// The slot's `wal_status`.
    pub wal_status: Option<String>,
    /// The slot's confirmed flush position.
    pub confirmed_flush_lsn: Option<String>,
    /// Bytes of WAL the slot holds back (`pg_current_wal_lsn() - confirmed_flush_lsn`).
    pub lag_bytes: Option<i64>,
    /// How long the slot has held WAL back: the time since the checkpoint last moved, when the
    /// lag is over 1 MiB (a running pipeline moves it at least every 10 s once the WAL moved
    /// that much); 0 otherwise.
    pub lag_seconds: Option<f64>,
    /// WAL the server keeps for the slot (`pg_current_wal_lsn() - restart_lsn`).
    pub retained_wal_bytes: Option<i64>,
    /// WAL that can still be written before the server invalidates the slot (`None`: no
    /// `max_slot_wal_keep_size`, no limit).
    pub safe_wal_size_bytes: Option<i64>,
    /// WAL written per second on the server, measured over one second (only with a limit).
    pub wal_rate_bytes_per_second: Option<f64>,
    /// Seconds before the slot is invalidated at that rate (`None`: no limit, or no WAL
    /// written).
    pub invalidation_forecast_seconds: Option<f64>,
    /// The stored checkpoint.
    pub checkpoint_lsn: Option<String>,
    /// When the checkpoint was last written (RFC 3339, UTC).
    pub checkpoint_at: Option<String>,
    /// pending / running / done.
    pub full_sync: Option<String>,
    /// Whether a resync was requested.
    pub resync_requested: bool,
    /// The last sync runs, newest first.
    pub recent_runs: Vec<SyncRun>,
    /// Dead letters recorded for this pipeline.
    pub dead_letters: i64,
    /// When windows close (`realtime`, `every 1h from 02:00 UTC`, `cron …`, `manual …`).
    pub schedule: String,
    /// The open window, if the schedule has windows.
    pub window: Option<WindowStatus>,
    /// Rows the sent-state ledger holds (`None`: the ledger is off or not created yet).
    pub ledger_rows: Option<i64>,
}

/// The open schedule window.
#[derive(Debug, Serialize)]
pub struct WindowStatus {
    /// When it opened (RFC 3339).
    pub opened_at: Option<String>,
    /// Its boundary, when the next sync run starts (RFC 3339); `None`: on `slotstream sync`.
    pub closes_at: Option<String>,
    /// Changes read into it so far.
    pub rows_read: i64,
    /// Coalesced rows staged in `_rudderstack.cdc_window_stage` (the slot is acknowledged past
    /// them: the window holds no WAL).
    pub staged_rows: i64,
}

/// One row of `_rudderstack.cdc_sync_runs`.
#[derive(Debug, Serialize)]
pub struct SyncRun {
    /// snapshot / stream.
    pub kind: String,
    /// Range start.
    pub start_lsn: Option<String>,
    /// Range end.
    pub end_lsn: Option<String>,
    /// Rows read.
    pub rows: i64,
    /// Events delivered.
    pub events: i64,
    /// Changes coalesced away (windows).
    pub coalesced: i64,
    /// Rows whose traits were as last sent (nothing sent).
    pub unchanged: i64,
    /// A full sync's `ctid` ranges read to the end (`None` before migration 5 and for other
    /// kinds).
    pub ranges_done: Option<i64>,
    /// A full sync's ranges in all.
    pub ranges_total: Option<i64>,
    /// Outcome (`running` while a full sync reads).
    pub status: String,
    /// When it finished.
    pub finished_at: Option<String>,
}

/// Gathers the status.
pub async fn gather(config: &Config) -> Result<Status, Error> {
    let client = postgres::connect(&config.source, &config.name)
        .await?
        .client;
    let slot = monitor::read_slot(&client, &config.source.slot, &config.name)
        .await
        .map_err(|e| PgError::query("reading the slot", e))?;
    // With a limit on the WAL a slot may hold, the time left at the current WAL rate.
    let mut forecast = Forecaster::default();
    let started = std::time::Instant::now();
    let sample = |r: &monitor::SlotReading| Sample {
        at_secs: started.elapsed().as_secs_f64(),
        wal_position: r.wal_position.max(0) as u64,
        safe_wal_size: r.safe_wal_size,
    };
    forecast.push(sample(&slot));
    let (rate, slot) = if slot.exists && slot.safe_wal_size.is_some() {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let again = monitor::read_slot(&client, &config.source.slot, &config.name)
            .await
            .map_err(|e| PgError::query("reading the slot", e))?;
        (forecast.push(sample(&again)), again)
    } else {
        (None, slot)
    };
    let left = forecast.seconds_left();
    let checkpoint = state::load(&client, &config.name).await?;
    let checkpoint_at: Option<(String, f64)> = match &checkpoint {
        None => None,
        Some(_) => client
            .query_opt(
                r#"SELECT to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                          extract(epoch FROM now() - updated_at)::float8
                     FROM "_rudderstack".cdc_checkpoints WHERE pipeline = $1"#,
                &[&config.name],
            )
            .await
            .map_err(|e| PgError::query("reading the checkpoint", e))?
            .map(|r| (r.get(0), r.get(1))),
    };
    let lag_seconds = match (slot.lag_bytes, &checkpoint_at) {
        (Some(lag), Some((_, age))) if lag > LAG_SECONDS_MIN_BYTES => Some(age.max(0.0)),
        (Some(_), _) => Some(0.0),
        (None, _) => None,
    };
    let run_pid = lock::holder(&client, &config.name).await?;
    let mut recent_runs = Vec::new();
    let mut dead_letters = 0;
    if checkpoint.is_some() {
        for r in client
            .query(
                r#"SELECT kind, start_lsn::text, end_lsn::text, rows, events, status,
                          to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                          coalesce((to_jsonb(r) ->> 'coalesced')::int8, 0),
                          coalesce((to_jsonb(r) ->> 'unchanged')::int8, 0),
                          (to_jsonb(r) ->> 'ranges_done')::int8,
                          (to_jsonb(r) ->> 'ranges_total')::int8
                     FROM "_rudderstack".cdc_sync_runs r WHERE pipeline = $1
                    ORDER BY id DESC LIMIT 10"#,
                &[&config.name],
            )
            .await
            .map_err(|e| PgError::query("reading the sync runs", e))?
        {
            recent_runs.push(SyncRun {
                kind: r.get(0),
                start_lsn: r.get(1),
                end_lsn: r.get(2),
                rows: r.get(3),
                events: r.get(4),
                status: r.get(5),
                finished_at: r.get(6),
                coalesced: r.get(7),
                unchanged: r.get(8),
                ranges_done: r.get(9),
                ranges_total: r.get(10),
            });
        }
        dead_letters = client
            .query_one(
                r#"SELECT count(*) FROM "_rudderstack".cdc_dead_letters WHERE pipeline = $1"#,
                &[&config.name],
            )
            .await
            .map_err(|e| PgError::query("counting dead letters", e))?
            .get(0);
    }
    let (window, ledger_rows) = if checkpoint.is_some() {
        window_and_ledger(&client, config).await?
    } else {
        (None, None)
    };
    Ok(Status {
        schedule: config.schedule.schedule.describe(),
        window,
        ledger_rows,
        pipeline: config.name.clone(),
        slot: config.source.slot.clone(),
        slot_exists: slot.exists,
        slot_active: slot.active,
        slot_active_pid: slot.active_pid,
        running: run_pid.is_some(),
        run_pid: run_pid.and_then(|h| h.slotstream_pid()),
        wal_status: slot.wal_status.clone(),
        confirmed_flush_lsn: slot.confirmed_flush_lsn.clone(),
        lag_bytes: slot.lag_bytes,
        lag_seconds,
        retained_wal_bytes: slot.retained_bytes,
        safe_wal_size_bytes: slot.safe_wal_size,
        wal_rate_bytes_per_second: rate,
        invalidation_forecast_seconds: (slot.exists && left.is_finite()).then_some(left),
        checkpoint_lsn: checkpoint.as_ref().map(|c| c.lsn.to_string()),
        checkpoint_at: checkpoint_at.map(|(at, _)| at),
        full_sync: checkpoint
            .as_ref()
            .map(|c| c.full_sync_state.as_str().to_owned()),
        resync_requested: checkpoint.as_ref().is_some_and(|c| c.resync_requested),
        recent_runs,
        dead_letters,
    })
}

/// The open window and the ledger's size (tolerates a state schema from before windows).
async fn window_and_ledger(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(Option<WindowStatus>, Option<i64>), Error> {
    let row = client
        .query_one(
            r#"SELECT to_regclass('"_rudderstack".cdc_ledger') IS NOT NULL,
                      to_char((to_jsonb(c) ->> 'window_started_at')::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                      to_char((to_jsonb(c) ->> 'window_ends_at')::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                      coalesce((to_jsonb(c) ->> 'window_rows')::int8, 0)
                 FROM "_rudderstack".cdc_checkpoints c WHERE pipeline = $1"#,
            &[&config.name],
        )
        .await
        .map_err(|e| PgError::query("reading the open window", e))?;
    if !row.get::<_, bool>(0) {
        return Ok((None, None));
    }
    let count = |sql: &'static str| async move {
        client
            .query_one(sql, &[&config.name])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| PgError::query("counting the stage and the ledger", e))
    };
    let staged_rows =
        count(r#"SELECT count(*) FROM "_rudderstack".cdc_window_stage WHERE pipeline = $1"#)
            .await?;
    let ledger_rows =
        count(r#"SELECT count(*) FROM "_rudderstack".cdc_ledger WHERE pipeline = $1"#).await?;
    let window =
        (config.schedule.schedule.is_windowed() || staged_rows > 0).then(|| WindowStatus {
            opened_at: row.get(1),
            closes_at: row.get(2),
            rows_read: row.get(3),
            staged_rows,
        });
    Ok((window, config.ledger.then_some(ledger_rows)))
}

fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| {
            crate::sink::SinkError::Io {
                target: "stdout".into(),
                source,
            }
            .into()
        })
}

/// `slotstream status`.
pub async fn run(config: &Config, json: bool) -> Result<(), Error> {
    let s = gather(config).await?;
    if json {
        let text = serde_json::to_string_pretty(&s).map_err(crate::sink::SinkError::from)?;
        return print(&format!("{text}\n"));
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let bytes = |b: Option<i64>| {
        b.map(|b| bytesize::ByteSize::b(b.max(0) as u64).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut t = format!("pipeline      {}\n", s.pipeline);
    t.push_str(&format!(
        "run           {}\n",
        match (s.running, s.run_pid) {
            (true, Some(pid)) => format!("running (pid {pid})"),
            (true, None) => "running".to_owned(),
            (false, _) => "not running".to_owned(),
        }
    ));
    t.push_str(&format!(
        "slot          {} ({})\n",
        s.slot,
        if !s.slot_exists {
            "missing".to_owned()
        } else if s.slot_active {
            format!(
                "active{}, wal_status {}",
                s.slot_active_pid
                    .map(|p| format!(" by walsender pid {p}"))
                    .unwrap_or_default(),
                opt(&s.wal_status)
            )
        } else {
            format!("inactive, wal_status {}", opt(&s.wal_status))
        }
    ));
    t.push_str(&format!("confirmed     {}\n", opt(&s.confirmed_flush_lsn)));
    t.push_str(&format!(
        "lag           {}{}\n",
        bytes(s.lag_bytes),
        s.lag_seconds
            .map(|l| format!(", {}", human_seconds(l.round())))
            .unwrap_or_default()
    ));
    t.push_str(&format!(
        "retained WAL  {} (safe WAL left: {})\n",
        bytes(s.retained_wal_bytes),
        match s.safe_wal_size_bytes {
            None => "no limit".to_owned(),
            Some(b) => bytes(Some(b)),
        }
    ));
    if s.safe_wal_size_bytes.is_some() {
        t.push_str(&format!(
            "invalidation  {}\n",
            match (s.invalidation_forecast_seconds, s.wal_rate_bytes_per_second) {
                (Some(left), Some(rate)) => format!(
                    "in about {} at {}/s of WAL",
                    human_seconds(left.round()),
                    bytesize::ByteSize::b(rate as u64)
                ),
                _ => "not foreseen (no WAL written over the last second)".to_owned(),
            }
        ));
    }
    t.push_str(&format!(
        "checkpoint    {}{}\n",
        opt(&s.checkpoint_lsn),
        s.checkpoint_at
            .as_ref()
            .map(|at| format!(" at {at}"))
            .unwrap_or_default()
    ));
    t.push_str(&format!(
        "full sync     {}{}\n",
        opt(&s.full_sync),
        if s.resync_requested {
            " (resync requested)"
        } else {
            ""
        }
    ));
    t.push_str(&format!("dead letters  {}\n", s.dead_letters));
    t.push_str(&format!("schedule      {}\n", s.schedule));
    if let Some(w) = &s.window {
        t.push_str(&format!(
            "window        opened {}, closes {}: {} changes read, {} rows staged (the slot is acknowledged past them)\n",
            opt(&w.opened_at),
            w.closes_at.clone().unwrap_or_else(|| "on `slotstream sync`".into()),
            w.rows_read,
            w.staged_rows
        ));
    }
    if let Some(n) = s.ledger_rows {
        t.push_str(&format!("ledger        {n} rows\n"));
    }
    if !s.recent_runs.is_empty() {
        t.push_str("recent runs:\n");
        for r in &s.recent_runs {
            let ranges = match (r.ranges_done, r.ranges_total) {
                (Some(done), Some(total)) => format!("  ranges {done}/{total}"),
                _ => String::new(),
            };
            t.push_str(&format!(
                "  {} {:8} {} → {}  rows {}  events {}  coalesced {}  unchanged {}{ranges}  {}\n",
                opt(&r.finished_at),
                r.kind,
                opt(&r.start_lsn),
                opt(&r.end_lsn),
                r.rows,
                r.events,
                r.coalesced,
                r.unchanged,
                r.status
            ));
        }
    }
    print(&t)
}

/// `slotstream sync`: asks the running `slotstream run` of the pipeline to deliver its open
/// window now. Returns false when no run is live (the caller then runs once).
pub async fn request_sync(config: &Config) -> Result<bool, Error> {
    let mut client = postgres::connect(&config.source, &config.name)
        .await?
        .client;
    state::migrate(&mut client).await?;
    let Some(holder) = lock::holder(&client, &config.name).await? else {
        return Ok(false);
    };
    if !state::request_sync(&client, &config.name).await? {
        return Ok(false);
    }
    print(&format!(
        "sync requested: the running slotstream ({}) delivers the open window within a second or two; `slotstream status` shows the sync run\n",
        holder.describe()
    ))?;
    Ok(true)
}

/// `slotstream resync`: the next run does a full sync (with `changed_only`, one that sends only
/// the rows that differ from the ledger).
pub async fn resync(config: &Config, changed_only: bool) -> Result<(), Error> {
    if changed_only && !config.ledger {
        return Err(Error::Config(crate::config::ConfigError::Invalid {
            key: "--changed-only".into(),
            message: "compares the table with the sent-state ledger, which sync.ledger = false switches off: run `slotstream resync` (every row) instead".into(),
        }));
    }
    let mut client = postgres::connect(&config.source, &config.name)
        .await?
        .client;
    state::migrate(&mut client).await?;
    if !state::request_resync(&client, &config.name, changed_only).await? {
        return print(&format!(
            "pipeline {:?} has no state yet: its first run is a full sync anyway\n",
            config.name
        ));
    }
    // Safe while a run is live: the request is read when a session starts.
    let running = match lock::holder(&client, &config.name).await? {
        Some(holder) => format!(
            "; the running slotstream ({}) starts it when its session next starts (a restart or a reconnect): restart it to start it now",
            holder.describe()
        ),
        None => String::new(),
    };
    print(&format!(
        "resync requested: the next `slotstream run` of {:?} sends {} again, then streams{running}\n",
        config.name,
        if changed_only {
            "the rows that differ from what was last sent (and, in mirror mode, deletes for rows gone)"
        } else {
            "every row"
        }
    ))
}

/// `slotstream teardown`: drops the slot and the pipeline's state rows.
pub async fn teardown(config: &Config, yes: bool) -> Result<(), Error> {
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Config(crate::config::ConfigError::Invalid {
                key: "--yes".into(),
                message: "is required when standard input is not a terminal".into(),
            }));
        }
        eprint!(
            "Drop replication slot {:?} and the state of pipeline {:?}? Type the pipeline name to confirm: ",
            config.source.slot, config.name
        );
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if answer.trim() != config.name {
            return print("teardown cancelled\n");
        }
    }
    // Holding the pipeline lock: refuses while a run is live, and no run starts meanwhile.
    let _lock = PipelineLock::acquire(&config.source, &config.name, None).await?;
    let client = postgres::connect(&config.source, &config.name)
        .await?
        .client;
    let slot = &config.source.slot;
    let mut left_alone = None;
    if let Some(other) = state::other_pipeline_using_slot(&client, &config.name, slot).await? {
        left_alone = Some(format!(
            "pipeline {other:?} of this database streams from it"
        ));
    } else if let Some(info) = stream::slot_info(&client, slot).await? {
        match stream::check_slot(slot, &info, &config.source.database, &config.name) {
            Ok(()) | Err(SourceError::SlotUnusable { .. }) => {
                stream::drop_slot(&client, slot).await?;
            }
            Err(SourceError::SlotNotOurs { owner, .. }) => left_alone = Some(owner),
            Err(e) => return Err(e.into()),
        }
    }
    if state::load(&client, &config.name).await?.is_some() {
        state::delete_pipeline(&client, &config.name).await?;
    }
    match left_alone {
        None => print(&format!(
            "dropped slot {slot:?} and the state of {:?}; sql/teardown.sql removes the role, grants and publication\n",
            config.name
        )),
        Some(owner) => print(&format!(
            "dropped the state of {:?}; left replication slot {slot:?} alone, it is not this pipeline's: {owner}\n",
            config.name
        )),
    }
}
