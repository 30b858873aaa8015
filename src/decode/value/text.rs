//! Parsers of the composite text output forms: `array_out` (`{…}`), `record_out` (`(…)`) and
//! `hstore_out` (`"k"=>"v"`). Each returns `None` on text that is not in its form, and the
//! caller falls back to the text string.

use std::borrow::Cow;

use serde_json::Value;

use super::{MAX_DEPTH, TypeCatalog, jsonb_key_cmp};

/// One field of `record_out` text: `None` for NULL (nothing between delimiters), the
/// unquoted/unescaped value otherwise, and the text after the `,` (`None` at the end).
#[allow(clippy::type_complexity)]
pub(super) fn record_field(text: &str) -> Option<(Option<Cow<'_, str>>, Option<&str>)> {
    let bytes = text.as_bytes();
    let end = {
        let mut in_quotes = false;
        let mut i = 0;
        loop {
            match bytes.get(i) {
                None if in_quotes => return None,
                None => break i,
                Some(b'\\') => i += 2,
                Some(b'"') if in_quotes && bytes.get(i + 1) == Some(&b'"') => i += 2,
                Some(b'"') => {
                    in_quotes = !in_quotes;
                    i += 1;
                }
                Some(b',') if !in_quotes => break i,
                Some(_) => i += 1,
            }
        }
    };
    let end = end.min(bytes.len());
    let raw = &text[..end];
    let next = if end < bytes.len() {
        Some(&text[end + 1..])
    } else {
        None
    };
    if raw.is_empty() {
        return Some((None, next));
    }
    if !raw.contains(['"', '\\']) {
        return Some((Some(Cow::Borrowed(raw)), next));
    }
    let mut out = String::with_capacity(raw.len());
    let mut in_quotes = false;
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' if in_quotes && chars.peek() == Some(&'"') => {
                chars.next();
                out.push('"');
            }
            '"' => in_quotes = !in_quotes,
            c => out.push(c),
        }
    }
    Some((Some(Cow::Owned(out)), next))
}

/// `hstore_out` text `"a"=>"1", "b"=>NULL` → the object `to_jsonb` gets through
/// `hstore_to_json`.
pub(super) fn hstore(text: &str) -> Option<Value> {
    let mut entries: Vec<(String, Value)> = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, _, after) = hstore_token(rest)?;
        rest = after.trim_start().strip_prefix("=>")?.trim_start();
        let (value, quoted, after) = hstore_token(rest)?;
        let value = if !quoted && value.eq_ignore_ascii_case("NULL") {
            Value::Null
        } else {
            Value::String(value)
        };
        entries.push((key, value));
        rest = after.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.is_empty() {
            return None;
        }
    }
    entries.sort_by(|a, b| jsonb_key_cmp(&a.0, &b.0));
    entries.dedup_by(|a, b| a.0 == b.0);
    Some(Value::Object(entries.into_iter().collect()))
}

/// One hstore key or value: (text, was quoted, rest).
fn hstore_token(text: &str) -> Option<(String, bool, &str)> {
    let mut out = String::new();
    if let Some(body) = text.strip_prefix('"') {
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?.1),
                '"' => return Some((out, true, &body[i + 1..])),
                c => out.push(c),
            }
        }
        return None;
    }
    let end = text
        .find(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .unwrap_or(text.len());
    if end == 0 {
        return None;
    }
    out.push_str(&text[..end]);
    Some((out, false, &text[end..]))
}

/// Parses `array_out` text (`{…}`, optional `[l:u]=` bounds) into nested JSON arrays.
pub(super) struct ArrayParser<'a> {
    catalog: &'a TypeCatalog,
    text: &'a str,
    pos: usize,
    element: u32,
    delimiter: u8,
    depth: usize,
}

impl<'a> ArrayParser<'a> {
    pub(super) fn new(
        catalog: &'a TypeCatalog,
        text: &'a str,
        element: u32,
        delimiter: u8,
        depth: usize,
    ) -> Self {
        Self {
            catalog,
            text,
            pos: 0,
            element,
            delimiter,
            depth,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    pub(super) fn parse(mut self) -> Option<Value> {
        self.skip_ws();
        if self.peek() == Some(b'[') {
            // Dimension decoration `[0:1][1:2]=`: to_jsonb drops the bounds.
            self.pos += self.text[self.pos..].find('=')? + 1;
            self.skip_ws();
        }
        let value = self.level(0)?;
        self.skip_ws();
        (self.pos == self.text.len()).then_some(value)
    }

    fn level(&mut self, nesting: usize) -> Option<Value> {
        if self.peek() != Some(b'{') || nesting > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let item = match self.peek()? {
                b'{' => self.level(nesting + 1)?,
                b'"' => {
                    let element = self.quoted()?;
                    self.catalog.render(self.element, &element, self.depth)
                }
                _ => {
                    let (element, escaped) = self.unquoted()?;
                    if !escaped && element.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        self.catalog.render(self.element, &element, self.depth)
                    }
                }
            };
            items.push(item);
            self.skip_ws();
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                b if b == self.delimiter => self.pos += 1,
                _ => return None,
            }
        }
    }

    /// A `"…"` element with `\` escapes; borrowed when it has none.
    fn quoted(&mut self) -> Option<Cow<'a, str>> {
        let text: &'a str = self.text;
        let bytes = text.as_bytes();
        let start = self.pos + 1;
        let mut i = start;
        let mut owned: Option<String> = None;
        let mut chunk = start;
        loop {
            match bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(&text[chunk..i]);
                    let c = text.get(i + 1..)?.chars().next()?;
                    s.push(c);
                    i += 1 + c.len_utf8();
                    chunk = i;
                }
                _ => i += 1,
            }
        }
        self.pos = i + 1;
        Some(match owned {
            Some(mut s) => {
                s.push_str(&text[chunk..i]);
                Cow::Owned(s)
            }
            None => Cow::Borrowed(&text[start..i]),
        })
    }

    /// An unquoted element up to the delimiter or `}`, trailing whitespace trimmed; whether it
    /// had `\` escapes (an escaped `NULL` is the string).
    fn unquoted(&mut self) -> Option<(Cow<'a, str>, bool)> {
        let text: &'a str = self.text;
        let bytes = text.as_bytes();
        let start = self.pos;
        let mut i = start;
        let mut escaped = false;
        loop {
            match bytes.get(i)? {
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                b'}' | b'{' | b'"' => break,
                &b if b == self.delimiter => break,
                _ => i += 1,
            }
        }
        let i = i.min(bytes.len());
        self.pos = i;
        let raw = text.get(start..i)?.trim_end();
        if raw.is_empty() {
            return None;
        }
        if !escaped {
            return Some((Cow::Borrowed(raw), false));
        }
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            out.push(if c == '\\' { chars.next()? } else { c });
        }
        Some((Cow::Owned(out), true))
    }
}
