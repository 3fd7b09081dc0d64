//! TOML: the `toml` crate's parsed tables walked into the tree builder, behind the line reader.

use super::{ParseError, from_problem, line_of};
use crate::domain::document::{INTEGER_RANGE, Problem, TreeBuilder, exact_float};
use serde_json::Value;

/// TOML as the `toml` crate reads it, through the simple reader when the text is of its kind.
pub fn toml(text: &str) -> Result<Value, ParseError> {
    match super::simple_toml::tree(text) {
        Some(tree) => Ok(tree),
        None => toml_full(text),
    }
}

/// TOML read by the `toml` crate alone: what [`toml`] gives for every text, faster for the TOML
/// our writer and rops produce. toml's parsed tables are walked, not its serde layer: 2% fewer
/// instructions, and the serde layer's datetime key no longer needs a case in the JSON visitor. A
/// refusal names the line of the key or value it is about.
pub fn toml_full(text: &str) -> Result<Value, ParseError> {
    let root = ::toml::de::DeTable::parse(text).map_err(|e| ParseError {
        line: e.span().map(|s| line_of(text, s.start)),
        pointer: None,
        message: e.message().trim().to_string(),
    })?;
    let mut b = TreeBuilder::new();
    toml_table(&mut b, text, root.get_ref(), root.span())?;
    b.finish().map_err(|p| from_problem(p, None))
}

/// The refusal of a TOML item whose text starts at `span.start`.
fn toml_at(text: &str, span: std::ops::Range<usize>) -> impl FnOnce(Problem) -> ParseError {
    move |p| from_problem(p, Some(line_of(text, span.start)))
}

fn toml_table(b: &mut TreeBuilder, text: &str, table: &::toml::de::DeTable<'_>, span: std::ops::Range<usize>) -> Result<(), ParseError> {
    b.begin_map().map_err(toml_at(text, span.clone()))?;
    for (key, value) in table {
        b.key(key.get_ref().to_string()).map_err(toml_at(text, key.span()))?;
        toml_value(b, text, value)?;
    }
    b.end().map_err(toml_at(text, span))
}

fn toml_value(b: &mut TreeBuilder, text: &str, value: &::toml::Spanned<::toml::de::DeValue<'_>>) -> Result<(), ParseError> {
    use ::toml::de::DeValue;
    let at = || toml_at(text, value.span());
    let scalar = match value.get_ref() {
        DeValue::String(s) => Ok(Value::String(s.to_string())),
        DeValue::Integer(i) => toml_integer(i).ok_or_else(|| INTEGER_RANGE.to_string()),
        DeValue::Float(f) => exact_float(&f.as_str().replace('_', "")).map(Value::Number),
        DeValue::Boolean(v) => Ok(Value::Bool(*v)),
        DeValue::Datetime(d) => Ok(Value::String(d.to_string())),
        DeValue::Array(items) => {
            b.begin_seq().map_err(at())?;
            for item in items {
                toml_value(b, text, item)?;
            }
            return b.end().map_err(at());
        }
        DeValue::Table(t) => return toml_table(b, text, t, value.span()),
    };
    match scalar {
        Ok(v) => b.scalar(v).map_err(at()),
        Err(message) => Err(at()(Problem { pointer: b.here(), message })),
    }
}

/// As the `toml` crate's serde layer reads an integer: an i64, else a u64.
fn toml_integer(i: &::toml::de::DeInteger<'_>) -> Option<Value> {
    let (digits, radix) = (i.as_str(), i.radix());
    i64::from_str_radix(digits, radix)
        .map(Value::from)
        .or_else(|_| u64::from_str_radix(digits, radix).map(Value::from))
        .ok()
}
