//! The full sync's reader: `COPY (SELECT …) TO STDOUT` in text format inside a transaction that
//! imported the slot's exported snapshot, parsed row by row as the bytes arrive.
//!
//! Text format is used because its cells are the types' text output, the same bytes pgoutput
//! sends (the session pins the same settings), so one value decoder serves both paths. Memory
//! is bounded by one COPY chunk plus one row, whatever the table size.
//!
//! COPY text format: rows end with `\n`, cells are separated by `\t`, `\N` is NULL, and
//! backslash escapes `\b \f \n \r \t \v \\` (plus octal `\NNN` and hex `\xNN`, which the server
//! does not emit but which are accepted) stand for the raw bytes.

use std::borrow::Cow;

use bytes::{Buf, BytesMut};

use super::SourceError;
use crate::decode::value::TypeCatalog;
use crate::postgres::catalog::Table;
use crate::postgres::{quote_ident, quote_qualified};
use crate::transform::mapping::CellRef;
use crate::transform::{ProjectedRow, Projection};

/// The query that reads the table for a full sync (and for `preview`): the columns the
/// projection needs, then the row key for messageIds and the ledger — the replica identity
/// index, else the primary key ([`Table::row_key_columns`]), else `ctid` (stable only until the row is updated or the table rewritten;
/// with `tableoid` for a partitioned table). A partitioned table is read through its parent,
/// which covers every partition.
#[derive(Debug, Clone)]
pub struct SnapshotQuery {
    select: Vec<String>,
    /// The quoted table name.
    from: String,
    /// The mapping's row filter, if any.
    filter: Option<String>,
    /// Table column position → position in the selected row (`usize::MAX`: not selected).
    position: Vec<usize>,
    key_start: usize,
    /// The key is the table's row key (not `ctid`): it is the ledger's key too.
    row_key: bool,
}

impl SnapshotQuery {
    /// The query for `table` as `projection` reads it, with the row filter if any.
    pub fn new(table: &Table, projection: &Projection, filter: Option<&str>) -> Self {
        let needed = projection.needed_columns();
        let mut key: Vec<String> = table
            .row_key_columns()
            .unwrap_or_default()
            .into_iter()
            .map(quote_ident)
            .collect();
        let row_key = !key.is_empty();
        if key.is_empty() {
            // A partitioned table's ctids repeat across its partitions.
            if table.is_partitioned() {
                key.push("tableoid".into());
            }
            key.push("ctid".into());
        }
        let mut select: Vec<String> = needed
            .iter()
            .filter_map(|i| table.columns.get(*i))
            .map(|c| quote_ident(&c.name))
            .collect();
        let key_start = select.len();
        select.extend(key);
        let mut position = vec![usize::MAX; table.columns.len()];
        for (pos, col) in needed.iter().enumerate() {
            if let Some(p) = position.get_mut(*col) {
                *p = pos;
            }
        }
        SnapshotQuery {
            select,
            from: quote_qualified(&table.schema, &table.name),
            filter: filter.map(str::to_owned),
            position,
            key_start,
            row_key,
        }
    }

    /// Whether the key [`Self::project`] returns is the table's row key (the primary key or
    /// replica identity index), not a physical position.
    pub fn has_row_key(&self) -> bool {
        self.row_key
    }

    /// Cells per row.
    pub fn width(&self) -> usize {
        self.select.len()
    }

    /// `SELECT … FROM … [WHERE …] [LIMIT n]`.
    pub fn select_sql(&self, limit: Option<u32>) -> String {
        self.select_range_sql(None, limit)
    }

    /// `SELECT … FROM … [WHERE (filter) AND ctid range] [LIMIT n]`.
    fn select_range_sql(&self, range: Option<&TidRange>, limit: Option<u32>) -> String {
        let mut conditions: Vec<String> = Vec::new();
        if let Some(f) = &self.filter {
            conditions.push(format!("({f})"));
        }
        if let Some(range) = range {
            conditions.extend(range.conditions());
        }
        let mut sql = format!("SELECT {} FROM {}", self.select.join(", "), self.from);
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        sql
    }

    /// `COPY (SELECT …) TO STDOUT` (text format).
    pub fn copy_sql(&self) -> String {
        format!("COPY ({}) TO STDOUT", self.select_sql(None))
    }

    /// `COPY (SELECT … WHERE ctid in range) TO STDOUT`: one range of a parallel full sync.
    pub fn copy_range_sql(&self, range: &TidRange) -> String {
        format!(
            "COPY ({}) TO STDOUT",
            self.select_range_sql(Some(range), None)
        )
    }

    /// Projects one selected row; returns the row and its key as JSON text (an array of the
    /// key cells, strings or null).
    pub fn project(
        &self,
        projection: &Projection,
        types: &TypeCatalog,
        row: &(impl Cells + ?Sized),
    ) -> (ProjectedRow, String) {
        let projected = projection.project(types, |i| match self.position.get(i) {
            Some(&p) if p != usize::MAX => match row.cell(p) {
                Some(Some(text)) => CellRef::Text(Cow::Borrowed(text)),
                Some(None) => CellRef::Null,
                None => CellRef::Absent,
            },
            _ => CellRef::Absent,
        });
        (projected, key_text(row, self.key_start))
    }
}

/// A range of heap pages, `[start, end)`, read by one COPY of a parallel full sync: the rows
/// whose `ctid` lies in it (PostgreSQL 14's TID Range Scan reads only those pages). `None` is
/// unbounded on that side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TidRange {
    /// First page, or from the table's start.
    pub start: Option<u64>,
    /// The page after the last, or to the table's end (whatever its size by then).
    pub end: Option<u64>,
}

impl TidRange {
    /// The `WHERE` conditions (none for the whole table). Item offsets start at 1, so
    /// `(page,0)` lies before every row of `page`.
    fn conditions(&self) -> Vec<String> {
        let mut c = Vec::new();
        if let Some(start) = self.start {
            c.push(format!("ctid >= '({start},0)'::tid"));
        }
        if let Some(end) = self.end {
            c.push(format!("ctid < '({end},0)'::tid"));
        }
        c
    }

    /// `pages` (the heap's size when measured) cut into `count` ranges (at least one) of about
    /// equal size, in page order. The first starts at the table's start and the last is
    /// open-ended, and each starts where the one before ends: every row, on whatever page,
    /// lies in exactly one of them (pages added after `pages` was measured fall in the last).
    pub fn split(pages: u64, count: u64) -> Vec<TidRange> {
        let count = count.clamp(1, pages.max(1));
        let bound = |i: u64| (u128::from(pages) * u128::from(i) / u128::from(count)) as u64;
        (0..count)
            .map(|i| TidRange {
                start: (i > 0).then(|| bound(i)),
                end: (i + 1 < count).then(|| bound(i + 1)),
            })
            .collect()
    }
}

/// The cells from `start` on as a JSON array of strings and nulls (the row key in messageIds).
fn key_text(row: &(impl Cells + ?Sized), start: usize) -> String {
    let mut text = Vec::with_capacity(32);
    text.push(b'[');
    for p in start..row.width() {
        if p > start {
            text.push(b',');
        }
        match row.cell(p).flatten() {
            Some(cell) => crate::json::write_str(&mut text, cell),
            None => text.extend_from_slice(b"null"),
        }
    }
    text.push(b']');
    String::from_utf8(text).unwrap_or_default()
}

/// The cells of one selected row: `None` past the end, `Some(None)` for NULL.
pub trait Cells {
    /// Number of cells.
    fn width(&self) -> usize;
    /// The cell at `i`.
    fn cell(&self, i: usize) -> Option<Option<&str>>;
}

impl Cells for [Option<String>] {
    fn width(&self) -> usize {
        self.len()
    }

    fn cell(&self, i: usize) -> Option<Option<&str>> {
        self.get(i).map(Option::as_deref)
    }
}

impl Cells for Vec<Option<String>> {
    fn width(&self) -> usize {
        self.len()
    }

    fn cell(&self, i: usize) -> Option<Option<&str>> {
        self.get(i).map(Option::as_deref)
    }
}

/// `messageId` of a snapshot row: the pipeline, the full sync's generation, the row key and its
/// content. Re-running an interrupted full sync (same generation) re-sends unchanged rows under
/// the same ids, while a row changed in between gets a new id (a deduplicating destination must
/// not drop the newer version); a new full sync (`slotstream resync`, a mapping change) sends
/// every row under a new id, so that such a destination takes them all again.
pub fn snapshot_row_message_id(
    pipeline: &str,
    generation: i64,
    key_text: &str,
    row: &ProjectedRow,
) -> uuid::Uuid {
    let mut traits = Vec::with_capacity(256);
    row.traits.write_json(&mut traits);
    snapshot_row_message_id_of_json(pipeline, generation, key_text, &traits)
}

/// [`snapshot_row_message_id`] of a row whose traits serialize as `traits_json`.
pub fn snapshot_row_message_id_of_json(
    pipeline: &str,
    generation: i64,
    key_text: &str,
    traits_json: &[u8],
) -> uuid::Uuid {
    // The identity `key \0 traits as JSON`, fed to the hasher in pieces.
    let mut hasher = crate::transform::event::snapshot_id_hasher(pipeline, generation);
    hasher.update(key_text.as_bytes());
    hasher.update(&[0]);
    hasher.update(traits_json);
    hasher.finish()
}

/// One row of a COPY text stream: its cells, unescaped, in one buffer that the parser reuses
/// for every row (no allocation per row or per cell).
#[derive(Debug, Default)]
pub struct CopyRow {
    /// The unescaped cells, each followed by a tab (so that validating the whole buffer as
    /// UTF-8 validates each cell on its own).
    text: String,
    /// Byte range of each cell in `text`; `None` is NULL.
    cells: Vec<Option<(usize, usize)>>,
}

impl CopyRow {
    /// The cells as owned strings (tests, debugging).
    pub fn to_vec(&self) -> Vec<Option<String>> {
        (0..self.cells.len())
            .map(|i| self.cell(i).flatten().map(str::to_owned))
            .collect()
    }
}

impl Cells for CopyRow {
    fn width(&self) -> usize {
        self.cells.len()
    }

    fn cell(&self, i: usize) -> Option<Option<&str>> {
        self.cells
            .get(i)
            .map(|c| c.and_then(|(start, end)| self.text.get(start..end)))
    }
}

/// Splits a COPY text stream into rows of cells.
#[derive(Debug, Default)]
pub struct CopyTextParser {
    buf: BytesMut,
    columns: usize,
    row: CopyRow,
}

impl CopyTextParser {
    /// A parser for rows of `columns` cells.
    pub fn new(columns: usize) -> Self {
        CopyTextParser {
            buf: BytesMut::new(),
            columns,
            row: CopyRow {
                text: String::new(),
                cells: Vec::with_capacity(columns),
            },
        }
    }

    /// Appends a chunk of the COPY stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete row, if one is buffered. It is valid until the next call.
    pub fn next_row(&mut self) -> Result<Option<&CopyRow>, SourceError> {
        let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let parsed = parse_line(&self.buf[..end], &mut self.row);
        self.buf.advance(end + 1);
        parsed?;
        if self.row.cells.len() != self.columns {
            return Err(SourceError::Copy(format!(
                "a COPY row has {} cells, expected {}",
                self.row.cells.len(),
                self.columns
            )));
        }
        Ok(Some(&self.row))
    }

    /// Checks that the stream ended on a row boundary.
    pub fn finish(&self) -> Result<(), SourceError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(SourceError::Copy(format!(
                "the COPY stream ended inside a row ({} bytes left)",
                self.buf.len()
            )))
        }
    }
}

/// Parses one line (without its newline) into `row`, reusing its buffers.
fn parse_line(line: &[u8], row: &mut CopyRow) -> Result<(), SourceError> {
    row.cells.clear();
    let mut bytes = std::mem::take(&mut row.text).into_bytes();
    bytes.clear();
    for field in line.split(|b| *b == b'\t') {
        if field == b"\\N" {
            row.cells.push(None);
            continue;
        }
        let start = bytes.len();
        if field.contains(&b'\\') {
            if let Err(e) = unescape(field, &mut bytes) {
                row.text = String::from_utf8(bytes).unwrap_or_default();
                return Err(e);
            }
        } else {
            bytes.extend_from_slice(field);
        }
        row.cells.push(Some((start, bytes.len())));
        bytes.push(b'\t');
    }
    match String::from_utf8(bytes) {
        Ok(text) => {
            row.text = text;
            Ok(())
        }
        Err(e) => {
            let mut bytes = e.into_bytes();
            bytes.clear();
            row.text = String::from_utf8(bytes).unwrap_or_default();
            row.cells.clear();
            Err(SourceError::Copy("a COPY cell is not valid UTF-8".into()))
        }
    }
}

/// Appends `field` with its backslash escapes decoded to `out`.
fn unescape(field: &[u8], out: &mut Vec<u8>) -> Result<(), SourceError> {
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&next) = field.get(i + 1) else {
            return Err(SourceError::Copy(
                "a COPY cell ends with a lone backslash".into(),
            ));
        };
        i += 2;
        match next {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v: u32 = u32::from(next - b'0');
                let mut n = 1;
                while n < 3 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                            n += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let mut v: u32 = 0;
                let mut n = 0;
                while n < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                if n == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_row_message_id_is_the_uuid_of_key_and_traits() {
        let row = ProjectedRow {
            user_id: Some("u1".into()),
            anonymous_id: None,
            traits: crate::transform::Traits::from_entries([
                ("name".to_owned(), Some(serde_json::json!("Ann \"A\""))),
                ("age".to_owned(), Some(serde_json::json!(42))),
            ]),
        };
        let json = serde_json::to_string(&row.traits).expect("json");
        let id = snapshot_row_message_id("p", 3, "[\"1\"]", &row);
        assert_eq!(
            id,
            crate::transform::event::snapshot_message_id("p", 3, &format!("[\"1\"]\u{0}{json}"))
        );
        assert_eq!(
            id,
            snapshot_row_message_id_of_json("p", 3, "[\"1\"]", json.as_bytes())
        );
    }

    #[test]
    fn tid_ranges_cover_every_page_once_and_the_last_is_open_ended() {
        for (pages, count) in [(0u64, 4u64), (1, 4), (7, 3), (1000, 12), (10, 10), (5, 40)] {
            let ranges = TidRange::split(pages, count);
            assert!(!ranges.is_empty() && ranges.len() as u64 <= count.max(1));
            assert_eq!(
                ranges.first().and_then(|r| r.start),
                None,
                "{pages}/{count}"
            );
            assert_eq!(ranges.last().and_then(|r| r.end), None, "{pages}/{count}");
            for pair in ranges.windows(2) {
                let (end, start) = (
                    pair[0].end.expect("bounded"),
                    pair[1].start.expect("bounded"),
                );
                assert_eq!(end, start, "contiguous: {ranges:?}");
                assert!(pair[0].start.unwrap_or(0) < end, "not empty: {ranges:?}");
            }
        }
        assert_eq!(
            TidRange::split(100, 1),
            vec![TidRange {
                start: None,
                end: None
            }]
        );
    }

    #[test]
    fn range_copy_keeps_the_row_filter() {
        let range = TidRange {
            start: Some(10),
            end: Some(20),
        };
        assert_eq!(
            range.conditions(),
            vec!["ctid >= '(10,0)'::tid", "ctid < '(20,0)'::tid"]
        );
        let open = TidRange {
            start: Some(20),
            end: None,
        };
        assert_eq!(open.conditions(), vec!["ctid >= '(20,0)'::tid"]);
        let query = SnapshotQuery {
            select: vec!["\"email\"".into(), "\"id\"".into()],
            from: "\"public\".\"users\"".into(),
            filter: Some("deleted_at IS NULL OR plan = 'x'".into()),
            position: vec![0],
            key_start: 1,
            row_key: true,
        };
        assert_eq!(
            query.copy_range_sql(&range),
            "COPY (SELECT \"email\", \"id\" FROM \"public\".\"users\" WHERE (deleted_at IS NULL OR plan = 'x') AND ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid) TO STDOUT"
        );
        assert_eq!(
            query.copy_sql(),
            "COPY (SELECT \"email\", \"id\" FROM \"public\".\"users\" WHERE (deleted_at IS NULL OR plan = 'x')) TO STDOUT"
        );
        let unfiltered = SnapshotQuery {
            filter: None,
            ..query
        };
        assert_eq!(
            unfiltered.copy_range_sql(&open),
            "COPY (SELECT \"email\", \"id\" FROM \"public\".\"users\" WHERE ctid >= '(20,0)'::tid) TO STDOUT"
        );
        assert_eq!(
            unfiltered.select_sql(Some(5)),
            "SELECT \"email\", \"id\" FROM \"public\".\"users\" LIMIT 5"
        );
    }

    #[test]
    fn rows_split_across_chunks_are_reassembled() {
        let mut p = CopyTextParser::new(3);
        p.push(b"1\tann\t\\N\n2\tb");
        let first = p.next_row().expect("ok").expect("row").to_vec();
        assert_eq!(first, vec![Some("1".into()), Some("ann".into()), None]);
        assert!(p.next_row().expect("ok").is_none());
        p.push(b"ob\tx\n");
        let second = p.next_row().expect("ok").expect("row").to_vec();
        assert_eq!(
            second,
            vec![Some("2".into()), Some("bob".into()), Some("x".into())]
        );
        p.finish().expect("clean end");
    }

    #[test]
    fn escapes_are_decoded() {
        let mut p = CopyTextParser::new(1);
        p.push(b"a\\tb\\nc\\\\d\\101\\x42\n");
        let row = p.next_row().expect("ok").expect("row").to_vec();
        assert_eq!(row, vec![Some("a\tb\nc\\dAB".into())]);
    }

    #[test]
    fn empty_cells_are_not_null_and_invalid_utf8_is_an_error() {
        let mut p = CopyTextParser::new(3);
        p.push(b"\t\\N\t\\xC3\\xA9\n");
        let row = p.next_row().expect("ok").expect("row").to_vec();
        assert_eq!(row, vec![Some(String::new()), None, Some("é".into())]);
        // Each cell is checked on its own: halves of a character in two cells do not pass.
        let mut p = CopyTextParser::new(2);
        p.push(b"\\xC3\t\\xA9\nok\tok\n");
        assert!(p.next_row().is_err());
        assert_eq!(
            p.next_row().expect("ok").expect("row").to_vec(),
            vec![Some("ok".into()), Some("ok".into())]
        );
    }

    #[test]
    fn key_text_is_the_json_array_of_the_key_cells() {
        let cells: Vec<Option<String>> = vec![
            Some("ann".into()),
            Some("1".into()),
            None,
            Some("q\"\\\u{1}é".into()),
        ];
        let expected: Vec<Option<&str>> = cells[1..].iter().map(|c| c.as_deref()).collect();
        assert_eq!(
            key_text(&cells, 1),
            serde_json::to_string(&expected).expect("json")
        );
        assert_eq!(key_text(&cells, 4), "[]");
    }

    #[test]
    fn snapshot_message_ids_keep_their_scheme() {
        // UUID v5 in slotstream's namespace of
        // `pipeline \0 snapshot \0 generation \0 key \0 traits JSON`, computed independently
        // (Python's uuid.uuid5): re-sent rows keep their ids across versions only while this
        // holds.
        let id = crate::transform::event::snapshot_message_id(
            "p",
            7,
            "[\"1\"]\u{0}{\"email\":\"a@b.c\",\"n\":5}",
        );
        assert_eq!(id.to_string(), "b0527c8f-f10f-50b7-ad1c-f459eb50e570");
    }

    #[test]
    fn wrong_cell_count_and_truncation_are_errors() {
        let mut p = CopyTextParser::new(2);
        p.push(b"1\n");
        assert!(p.next_row().is_err());
        let mut p = CopyTextParser::new(1);
        p.push(b"partial");
        assert!(p.finish().is_err());
        let mut p = CopyTextParser::new(1);
        p.push(b"bad\\\n");
        assert!(p.next_row().is_err());
    }
}
