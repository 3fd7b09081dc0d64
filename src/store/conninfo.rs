//! A connection string shown to people: its password masked wherever the client would read one.
//!
//! The masking follows tokio-postgres's own reading of both spellings (a `postgres://` URL and
//! libpq's `key=value` conninfo), and the result is parsed again: a string that would still give
//! the client a password is not shown at all.

const MASK: &str = "****";

/// `url` with every password the client would use replaced by `****`.
pub fn masked(url: &str) -> String {
    let shown = match url.split_once("://") {
        Some((scheme, rest)) if matches!(scheme, "postgres" | "postgresql") => masked_url(scheme, rest),
        _ => masked_conninfo(url),
    };
    let leaks = match tokio_postgres::Config::from_str(&shown) {
        Ok(cfg) => cfg.get_password().is_some_and(|p| p != MASK.as_bytes()),
        // Unparseable either way: only the masked parts were changed, so show what there is.
        Err(_) => tokio_postgres::Config::from_str(url).is_ok(),
    };
    match leaks {
        true => "(not shown: its password could not be masked)".to_string(),
        false => shown,
    }
}

use std::str::FromStr;

/// `user:password@` ends at the first `@` (as the client reads it); a password with an unencoded
/// `@` reads as more of the host, which is hidden too. Then `password` among the query parameters.
fn masked_url(scheme: &str, rest: &str) -> String {
    let mut out = format!("{scheme}://");
    let mut rest = rest;
    if let Some(at) = rest.find('@') {
        let creds = &rest[..at];
        let tail = &rest[at + 1..];
        let host_end = tail.find(['/', '?']).unwrap_or(tail.len());
        let last_at = tail[..host_end].rfind('@').map_or(0, |i| i + 1);
        match creds.split_once(':') {
            Some((user, _)) => out.extend([user, ":", MASK, "@"]),
            None => out.extend([creds, "@"]),
        }
        rest = &tail[last_at..];
    }
    let Some((head, query)) = rest.split_once('?') else {
        out.push_str(rest);
        return out;
    };
    out.extend([head, "?"]);
    let params: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if percent_decoded(k) == "password" => format!("{k}={MASK}"),
            _ => kv.to_string(),
        })
        .collect();
    out.push_str(&params.join("&"));
    out
}

fn percent_decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// libpq's `key = value` pairs, values bare or single-quoted with backslash escapes, as
/// tokio-postgres reads them; the value of `password` is replaced, the rest kept as written.
fn masked_conninfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'=') {
            i += 1;
            if b[i - 1] == b'=' {
                break;
            }
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(b.len());
        }
        out.push_str(&s[start..value_start]);
        match key {
            "password" => out.push_str(MASK),
            _ => out.push_str(&s[value_start..i]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_password_is_masked() {
        for (url, want) in [
            ("postgres://app:hunter2@db/x", "postgres://app:****@db/x"),
            ("postgresql://app:hun/ter2@db:5432/x", "postgresql://app:****@db:5432/x"),
            ("postgres://app:hun?ter2@db/x", "postgres://app:****@db/x"),
            ("postgres://u:p@ss@h/db", "postgres://u:****@h/db"),
            ("postgres://app:hunter%2F2@db/x?sslmode=require", "postgres://app:****@db/x?sslmode=require"),
            (
                "postgres://app@db/x?password=hunter2&sslmode=require",
                "postgres://app@db/x?password=****&sslmode=require",
            ),
            (
                "postgres://app@db/x?sslmode=require&pass%77ord=hunter2",
                "postgres://app@db/x?sslmode=require&pass%77ord=****",
            ),
            ("postgres://db/x", "postgres://db/x"),
            ("host=/tmp user=x password=pw dbname=y", "host=/tmp user=x password=**** dbname=y"),
            ("host=db password = hunter2 user=x", "host=db password = **** user=x"),
            ("host=db password='hunter 2' user=x", "host=db password=**** user=x"),
            ("host=db password='it\\'s hunter2' user=x", "host=db password=**** user=x"),
            ("host=db password=hun\\ ter2 user=x", "host=db password=**** user=x"),
            ("host=db user=x", "host=db user=x"),
        ] {
            let shown = masked(url);
            assert_eq!(shown, want, "{url}");
            for secret in ["hunter", "ter2", "hun/", "pw "] {
                assert!(!shown.contains(secret), "{url}: {shown}");
            }
        }
    }
}
