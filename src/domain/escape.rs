//! Escaping for where output goes. Every string that came from a file or a row (keys, ids, paths,
//! messages quoting them) passes through one of these before it is printed, so that a hostile
//! name cannot move a terminal's cursor, add lines to a plan, or forge rows in a PR comment.

use std::borrow::Cow;

/// Characters that change how text is displayed rather than what it says: C0/C1 controls
/// (newlines and escape sequences among them) and Unicode's bidirectional and invisible marks.
fn hidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// For a terminal or a log: hidden characters as `\u{..}`.
pub fn text(s: &str) -> Cow<'_, str> {
    // Printable ASCII, nearly everything printed, is told by its bytes without decoding them.
    if s.bytes().all(|b| matches!(b, 0x20..=0x7e)) || !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| if hidden(c) { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() })
            .collect(),
    )
}

/// For a Markdown table cell outside code: no line breaks, no column breaks, no HTML.
pub fn md_cell(s: &str) -> String {
    text(s).replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('|', "\\|")
}

/// An inline code span in a Markdown table: the fence is longer than any run of backticks inside.
pub fn md_code(s: &str) -> String {
    let body = text(s).replace('|', "\\|");
    let longest = body.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    if longest == 0 {
        format!("{fence}{body}{fence}")
    } else {
        format!("{fence} {body} {fence}")
    }
}

/// For HTML text (the `<summary>` of a collapsed block).
pub fn html(s: &str) -> String {
    text(s).replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Scheme, host and port of a URL: never its path, query or userinfo.
pub fn shown_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_loses_its_escapes_and_line_breaks() {
        assert_eq!(text("plain"), "plain");
        assert_eq!(text("a\x1b[2Jb\nc\u{202e}d"), "a\\u{1b}[2Jb\\u{a}c\\u{202e}d");
        assert_eq!(text("tab\there"), "tab\\u{9}here");
        assert_eq!(text("del\x7f"), "del\\u{7f}");
        assert_eq!(text("naïve ~"), "naïve ~");
    }

    #[test]
    fn markdown_cells_cannot_add_columns_rows_or_html() {
        let cell = md_cell("x | y\n|---|\n</details><img src=x>");
        assert!(!cell.contains('\n') && !cell.contains('<') && !cell.contains(" | "), "{cell}");
        assert_eq!(md_code("a`b"), "`` a`b ``");
        assert_eq!(md_code("p|q"), "`p\\|q`");
        assert_eq!(html("<b>&\"</b>"), "&lt;b&gt;&amp;&quot;&lt;/b&gt;");
    }
}
