//! `slotstream preview`: the first N rows of the table as the exact events a full sync would
//! send (same query builder, same projection, same event factory as the pipeline), and a short
//! table of columns → trait key → type.
//!
//! Preview reads with the role's own rights and writes nothing: no slot, no state.

use std::io::Write;

use crate::Lsn;
use crate::config::Config;
use crate::decode::value::TypeCatalog;
use crate::error::Error;
use crate::postgres::{self, PgError, catalog, quote_qualified};
use crate::source::SourceError;
use crate::source::snapshot::{SnapshotQuery, snapshot_row_message_id};
use crate::source::stream::current_wal_lsn;
use crate::transform::event::{
    EventFactory, Stamp, now_pg_micros, now_rfc3339, pg_micros_to_rfc3339,
};
use crate::transform::{Op, Projection};

/// Runs the preview, printing to stdout.
pub async fn run(config: &Config, limit: u32) -> Result<(), Error> {
    let src = &config.source;
    let conn = postgres::connect(src, &config.name).await?;
    let client = conn.client;
    let table = catalog::table(&client, &src.schema, &src.table, &src.publication)
        .await?
        .ok_or_else(|| SourceError::TableMissing {
            table: quote_qualified(&src.schema, &src.table),
            user: src.user.clone(),
        })?;
    let qualified = format!("{}.{}", src.schema, src.table);
    let projection = Projection::resolve_without(
        &config.mapping,
        &qualified,
        table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        &table.unsent_generated(),
    )
    .map_err(|e| Error::Mapping {
        hint: e.hint(),
        message: e.to_string(),
    })?;
    let mut types = TypeCatalog::builtin();
    let oids: Vec<u32> = table.columns.iter().map(|c| c.type_oid).collect();
    postgres::types::load_types(&client, &mut types, &oids)
        .await
        .map_err(|e| PgError::query("loading the table's column types", e))?;
    let lsn = current_wal_lsn(&client).await.unwrap_or(Lsn::ZERO);
    // The messageIds of the next full sync (the first one when the pipeline has no state yet).
    let hash = crate::pipeline::mapping_hash(config);
    let generation = crate::postgres::state::load(&client, &config.name)
        .await?
        .map_or(1, |c| c.next_full_sync_generation(&hash));
    let query = SnapshotQuery::new(&table, &projection, config.mapping.filter.as_deref());
    let messages = client
        .simple_query(&query.select_sql(Some(limit)))
        .await
        .map_err(|e| PgError::query("reading the preview rows", e))?;
    let factory = EventFactory::new(&config.name, &src.schema, &src.table);
    let stamp = Stamp::new(lsn, &pg_micros_to_rfc3339(now_pg_micros()));

    let mut out = String::new();
    out.push_str(&format!("Mapping of {qualified}:\n"));
    let width = table
        .columns
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "  {:width$}  {:24}  type\n",
        "column", "trait key"
    ));
    for t in &projection.traits {
        let type_name = table
            .columns
            .get(t.index)
            .map(|c| c.type_name.as_str())
            .unwrap_or("?");
        out.push_str(&format!(
            "  {:width$}  {:24}  {type_name}\n",
            t.column, t.key
        ));
    }
    let role = |pos: Option<usize>| {
        pos.and_then(|i| table.columns.get(i))
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "(none)".into())
    };
    out.push_str(&format!(
        "  userId ← {}, anonymousId ← {}, email ← {}\n",
        role(projection.user_id),
        role(projection.anonymous_id),
        role(projection.email)
    ));
    if config.mapping.columns.is_none() {
        for generated in table.unsent_generated() {
            out.push_str(&format!(
                "  ! generated column {generated:?} is left out: logical replication does not send it\n"
            ));
        }
    }
    for missing in &projection.missing_columns {
        out.push_str(&format!(
            "  ! selected column {missing:?} is not in the table\n"
        ));
    }
    out.push('\n');

    let mut shown = 0;
    let mut skipped = 0;
    for message in messages {
        let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let cells: Vec<Option<String>> = (0..query.width())
            .map(|i| row.get(i).map(str::to_owned))
            .collect();
        let (projected, key_text) = query.project(&projection, &types, &cells);
        if !projected.is_identified() {
            skipped += 1;
            continue;
        }
        let id = snapshot_row_message_id(&config.name, generation, &key_text, &projected);
        let mut event = factory.identify(projected, Op::Snapshot, &stamp, id);
        event.sent_at = Some(now_rfc3339().into());
        let json = serde_json::to_string_pretty(&event).map_err(crate::sink::SinkError::from)?;
        out.push_str(&json);
        out.push('\n');
        shown += 1;
    }
    out.push_str(&format!("{shown} events"));
    if skipped > 0 {
        out.push_str(&format!(
            "; {skipped} rows without any identifier value would go to _rudderstack.cdc_dead_letters"
        ));
    }
    out.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| crate::sink::SinkError::Io {
            target: "stdout".into(),
            source,
        })?;
    Ok(())
}
