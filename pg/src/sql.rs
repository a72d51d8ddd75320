//! SQL text: identifiers and literals quoted the way PostgreSQL reads them
//! (tokio-postgres has no `quote_ident`). Every name Ferry puts into SQL text goes
//! through here, whatever it looks like: quoting only when "needed" would make
//! upper-case names fold to lower case and keywords fail.

/// `"name"`, embedded quotes doubled (PostgreSQL's `quote_ident`, always quoting).
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A SQL string literal, as `PQescapeLiteral` writes it.
pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("person"), r#""person""#);
        assert_eq!(quote_ident("Person"), r#""Person""#);
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_ident(r#""""#), r#""""""""#);
        assert_eq!(quote_ident("first name"), r#""first name""#);
        assert_eq!(quote_ident("户籍 人口"), r#""户籍 人口""#);
        assert_eq!(quote_ident("select"), r#""select""#);
        assert_eq!(qualified("Ferry", r#"a"b"#), r#""Ferry"."a""b""#);
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(quote_literal("户籍"), "'户籍'");
    }
}
