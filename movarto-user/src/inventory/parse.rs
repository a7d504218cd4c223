//! From text to typed entries, with positions. toml_edit keeps every key's and value's
//! span; each entry (`[defaults]`, `[sites.a]`, `[services.web]`,
//! `[services.web.at.b]`) is deserialized on its own, and an entry that fails is read
//! again key by key, so every bad key is named, not only the first.

use std::{collections::BTreeMap, ops::Range, path::Path, str::FromStr, time::Duration};

use serde::de::IntoDeserializer as _;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use toml_edit::{ImDocument, InlineTable, Item, TableLike, Value};

use super::{Defaults, Inventory, Problem, Service, ServiceAt, Site};

pub(super) type Doc = ImDocument<String>;

/// Byte offset to 1-based line and column (in characters).
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

pub(super) fn problem(
    doc: &Doc,
    key: &str,
    span: Option<Range<usize>>,
    message: String,
) -> Problem {
    let (line, column) = position(doc.raw(), span.map_or(0, |s| s.start));
    Problem {
        key: key.to_owned(),
        line,
        column,
        message,
    }
}

/// The span of `path` (keys from the root): its value's, or its table header's; else
/// the nearest parent's that has one.
pub(super) fn span_of(doc: &Doc, path: &[&str]) -> Option<Range<usize>> {
    let mut item = doc.as_item();
    let mut best = None;
    for key in path {
        let Some(table) = item.as_table_like() else {
            break;
        };
        let Some((k, next)) = table.get_key_value(key) else {
            break;
        };
        best = next.span().or_else(|| k.span()).or(best);
        item = next;
    }
    best
}

/// Parses the document and types its entries: the document (for the checks' positions),
/// the inventory, and the problems found so far. A syntax error is the only problem
/// that stops everything.
pub(super) fn typed(
    text: &str,
    base_dir: &Path,
) -> Result<(Doc, Inventory, Vec<Problem>), Problem> {
    let doc: Doc = ImDocument::parse(text.to_owned()).map_err(|err| {
        let (line, column) = position(text, err.span().map_or(0, |s| s.start));
        Problem {
            key: String::new(),
            line,
            column,
            message: format!("not TOML: {}", err.message()),
        }
    })?;
    let mut problems = Vec::new();
    let mut inventory = Inventory {
        base_dir: base_dir.to_owned(),
        ..Default::default()
    };
    for (key, item) in doc.iter() {
        match key {
            "defaults" => {
                if let Some(defaults) = entry::<Defaults>(&doc, "defaults", item, &mut problems) {
                    inventory.defaults = defaults;
                }
            }
            "sites" => inventory.sites = entries::<Site>(&doc, "sites", item, &mut problems),
            "services" => {
                inventory.services = services(&doc, item, &mut problems);
            }
            other => problems.push(problem(
                &doc,
                other,
                span_of(&doc, &[other]),
                format!("unknown table `{other}`: expected `defaults`, `sites` or `services`"),
            )),
        }
    }
    Ok((doc, inventory, problems))
}

/// `[services.<name>]`, each with its `at.<site>` entries.
fn services(doc: &Doc, item: &Item, problems: &mut Vec<Problem>) -> BTreeMap<String, Service> {
    let mut out = BTreeMap::new();
    let Some(table) = table_like(doc, "services", item, problems) else {
        return out;
    };
    for (name, item) in table.iter() {
        let path = format!("services.{name}");
        let Some(keys) = table_like(doc, &path, item, problems) else {
            continue;
        };
        // `at` is typed entry by entry below; the rest as one entry.
        let mut own = InlineTable::new();
        let mut at = None;
        for (key, value) in keys.iter() {
            if key == "at" {
                at = Some(value);
            } else if let Ok(value) = value.clone().into_value() {
                own.insert(key, value);
            }
        }
        let Some(mut service) = entry_of::<Service>(doc, &path, keys, own, problems) else {
            continue;
        };
        if let Some(at) = at {
            service.at = entries::<ServiceAt>(doc, &format!("{path}.at"), at, problems);
        }
        out.insert(name.to_owned(), service);
    }
    out
}

/// A table of entries, each typed on its own (`[sites.<name>]`).
fn entries<T: DeserializeOwned>(
    doc: &Doc,
    path: &str,
    item: &Item,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, T> {
    let Some(table) = table_like(doc, path, item, problems) else {
        return BTreeMap::new();
    };
    table
        .iter()
        .filter_map(|(name, item)| {
            entry::<T>(doc, &format!("{path}.{name}"), item, problems)
                .map(|typed| (name.to_owned(), typed))
        })
        .collect()
}

fn table_like<'a>(
    doc: &Doc,
    path: &str,
    item: &'a Item,
    problems: &mut Vec<Problem>,
) -> Option<&'a dyn TableLike> {
    let table = item.as_table_like();
    if table.is_none() {
        problems.push(problem(
            doc,
            path,
            item.span(),
            "expected a table".to_owned(),
        ));
    }
    table
}

/// One entry typed as a whole.
fn entry<T: DeserializeOwned>(
    doc: &Doc,
    path: &str,
    item: &Item,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let keys = table_like(doc, path, item, problems)?;
    let mut all = InlineTable::new();
    for (key, value) in keys.iter() {
        if let Ok(value) = value.clone().into_value() {
            all.insert(key, value);
        }
    }
    entry_of(doc, path, keys, all, problems)
}

/// Types `all` (the entry's keys, in an inline table that keeps their values' spans);
/// when that fails, each key again on its own, for a problem per bad key.
fn entry_of<T: DeserializeOwned>(
    doc: &Doc,
    path: &str,
    keys: &dyn TableLike,
    all: InlineTable,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    if let Ok(typed) = T::deserialize(Value::InlineTable(all.clone()).into_deserializer()) {
        return Some(typed);
    }
    let before = problems.len();
    let mut good = InlineTable::new();
    for (key, value) in all.iter() {
        let mut one = InlineTable::new();
        one.insert(key, value.clone());
        match T::deserialize(Value::InlineTable(one).into_deserializer()) {
            Ok(_) => {
                good.insert(key, value.clone());
            }
            Err(err) => {
                let at = format!("{path}.{key}");
                // An unknown key's error has no span of its own: point at the key.
                let span = err
                    .span()
                    .or_else(|| keys.get_key_value(key).and_then(|(k, _)| k.span()));
                problems.push(problem(doc, &at, span, err.message().to_owned()));
            }
        }
    }
    if problems.len() == before {
        // Only the whole failed (e.g. a key given twice): say so, at the entry.
        problems.push(problem(
            doc,
            path,
            span_of(doc, &path.split('.').collect::<Vec<_>>()),
            "invalid entry".to_owned(),
        ));
    }
    // The keys that are good, so that the checks after this one still see them.
    T::deserialize(Value::InlineTable(good).into_deserializer()).ok()
}

/// A duration with its unit (`300ms`, `5s`), as the flags take it.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    crate::units::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// MiB/s as an integer (or `"125MiB/s"`), to bytes per second.
pub(super) fn mib_per_s<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mib {
        Number(u64),
        Text(String),
    }
    let text = match Mib::deserialize(d)? {
        Mib::Number(n) => n.to_string(),
        Mib::Text(text) => text,
    };
    crate::units::parse_bandwidth(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Anything the flags parse from text (`postcopy`, `address_mode`).
pub(super) fn from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}
