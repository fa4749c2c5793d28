//! One name, one place. Many frameworks read a call's parts as one bag of
//! parameters: Rails' `params` lets the path win over the query and the
//! query over the body; Laravel's `input()` lets the body win over the
//! query; PHP's `$_REQUEST` without a php.ini lets cookies win over both. So
//! a value the person is shown from one part must not also be given in
//! another, or the API may act on the other one.
//!
//! Names are compared as those frameworks fold them ([`merge_key`]).

use http::header::{CONTENT_TYPE, COOKIE};
use http::HeaderMap;

use super::body::fold_case;

/// A part of a call a framework may read a named value from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Path,
    Query,
    Body,
    Cookie,
}

impl Part {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Path => "the path",
            Self::Query => "the query",
            Self::Body => "the body",
            Self::Cookie => "a cookie",
        }
    }
}

/// The name as a merging framework files it: PHP ends a name at a NUL
/// (`qty%00x` is `qty`: it registers names as C strings), drops leading
/// spaces and turns `.` and spaces into `_`; `qty[]` and `qty[a]` are `qty`
/// to PHP, Rails and qs; and letter case is folded (Unicode), as the strict
/// body parser folds keys.
pub(crate) fn merge_key(name: &str) -> String {
    let name = name.split('\0').next().unwrap_or(name);
    let name = name.trim_start();
    let name = name.split('[').next().unwrap_or(name);
    fold_case(&name.replace(['.', ' '], "_"))
}

/// The merge keys every part of one call gives, read only as far as needed.
pub(crate) struct CallParts<'a> {
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    body: Option<&'a [u8]>,
    path: &'a [(String, String)],
}

impl<'a> CallParts<'a> {
    pub(crate) fn new(
        headers: &'a HeaderMap,
        query: Option<&'a str>,
        body: Option<&'a [u8]>,
        path: &'a [(String, String)],
    ) -> Self {
        Self {
            headers,
            query,
            body,
            path,
        }
    }

    /// The `Content-Encoding` of a body that has one (other than
    /// `identity`): its names cannot be read here, while Express's body
    /// parsers inflate gzip and deflate and read them.
    pub(crate) fn encoding(&self) -> Option<String> {
        self.body.filter(|b| !b.is_empty())?;
        super::body::content_encoding(self.headers)
    }

    /// The first part other than `shown_in` that also gives `name`.
    pub(crate) fn also_given(&self, name: &str, shown_in: Part) -> Option<Part> {
        let key = merge_key(name);
        [Part::Path, Part::Query, Part::Body, Part::Cookie]
            .into_iter()
            .filter(|part| *part != shown_in)
            .find(|part| self.keys(*part).contains(&key))
    }

    fn keys(&self, part: Part) -> Vec<String> {
        match part {
            Part::Path => self.path.iter().map(|(k, _)| merge_key(k)).collect(),
            // Rack 2 (Rails 7.0 and older) and Go before 1.17 also split a
            // query at `;`.
            Part::Query => form_keys(self.query.unwrap_or("").replace(';', "&").as_bytes()),
            Part::Body => self
                .body
                .map_or_else(Vec::new, |b| body_keys(self.headers, b)),
            Part::Cookie => cookie_keys(self.headers),
        }
    }
}

fn form_keys(text: &[u8]) -> Vec<String> {
    url::form_urlencoded::parse(text)
        .map(|(name, _)| merge_key(&name))
        .collect()
}

/// Field names of a body in every format some framework merges into
/// parameters for its headers: the members of a body that is a JSON object,
/// whatever its Content-Type (Laravel reads JSON when the Content-Type
/// merely contains `/json` or `+json`, Express's `json({ type: '*/*' })`
/// and FastAPI without a Content-Type read any); the fields of an
/// urlencoded form, also without a Content-Type (Rack reads a POST body so);
/// the parts of a multipart body. Every Content-Type header counts.
/// Bodies none of them reads give none.
fn body_keys(headers: &HeaderMap, body: &[u8]) -> Vec<String> {
    let mut keys: Vec<String> = json_member_names(body)
        .iter()
        .map(|k| merge_key(k))
        .collect();
    let (form, multipart) = form_formats(headers);
    if form {
        // Go before 1.17 splits a form at ';' too (and its r.FormValue
        // lets the body win over the query).
        let body = String::from_utf8_lossy(body).replace(';', "&");
        keys.extend(form_keys(body.as_bytes()));
    }
    if multipart {
        keys.extend(multipart_names(body));
    }
    keys
}

/// The member names of a body some JSON reader takes for an object, as
/// sent. A UTF-8 BOM before it is dropped (Express's body-parser decodes
/// through iconv-lite, which drops one; .NET's readers skip it). A body
/// serde_json reads as an object gives its top-level members; one it cannot
/// read but that looks like an object (`{` first) is read as lenient parsers
/// read JSON (Python's `NaN`, comments, trailing commas): every string
/// followed by `:` counts, at any depth. Conservative: more names, never
/// fewer.
pub(crate) fn json_member_names(body: &[u8]) -> Vec<String> {
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(fields)) => return fields.keys().cloned().collect(),
        Ok(_) => return Vec::new(),
        Err(_) => {}
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Vec::new();
    }
    json_string_literals(body)
        .into_iter()
        .filter(|(_, after)| after.trim_ascii_start().first() == Some(&b':'))
        .map(|(name, _)| name)
        .collect()
}

/// Every string literal of a JSON-like text, decoded (escapes resolved
/// where they can be), each with the text that follows it.
pub(crate) fn json_string_literals(body: &[u8]) -> Vec<(String, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < body.len() && body[i] != b'"' {
            i += if body[i] == b'\\' { 2 } else { 1 };
        }
        let end = (i + 1).min(body.len());
        i = end;
        let literal = &body[start..end];
        let decoded = serde_json::from_slice::<String>(literal).unwrap_or_else(|_| {
            String::from_utf8_lossy(
                literal
                    .get(1..literal.len().saturating_sub(1))
                    .unwrap_or_default(),
            )
            .into_owned()
        });
        out.push((decoded, &body[end..]));
    }
    out
}

/// Whether some framework reads a body with these headers as an urlencoded
/// form (also without a Content-Type: Rack reads a POST so), and whether
/// as multipart. Every Content-Type header counts, and a media type ends at
/// ',' as well as ';' (Rack 2 splits at `\s*[;,]\s*`, so
/// `application/x-www-form-urlencoded, text/plain` is a form to Rails), and
/// at a space or tab (PHP's SAPI cuts it at ';', ',' or ' ', so Laravel
/// fills `$_POST` from `application/x-www-form-urlencoded text/plain`).
pub(crate) fn form_formats(headers: &HeaderMap) -> (bool, bool) {
    let types = headers.get_all(CONTENT_TYPE);
    let mut form = types.iter().next().is_none();
    let mut multipart = false;
    for value in types {
        let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        let media = value
            .trim()
            .split([';', ',', ' ', '\t'])
            .next()
            .unwrap_or_default();
        form |= media.is_empty() || media == "application/x-www-form-urlencoded";
        multipart |= media.starts_with("multipart/");
    }
    (form, multipart)
}

fn multipart_names(body: &[u8]) -> Vec<String> {
    multipart_raw_names(body)
        .iter()
        .map(|name| merge_key(name))
        .collect()
}

/// The part names of a multipart body, as sent. Conservative: every `name=`
/// parameter anywhere in the body counts, quoted or not, as a part's name
/// (a NUL or `[` in it included: readers differ on where a name ends), and
/// so does RFC 8187's `name*=utf-8''…`, percent-decoded.
pub(crate) fn multipart_raw_names(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let mut names = Vec::new();
    let mut rest = 0;
    while let Some(found) = lower[rest..].find("name") {
        let mut start = rest + found + "name".len();
        rest = start;
        let extended = lower[start..].starts_with('*');
        if extended {
            start += 1;
        }
        if !lower[start..].starts_with('=') {
            continue;
        }
        start += 1;
        let value = &text[start..];
        let name = match value.chars().next() {
            Some(quote @ ('"' | '\'')) => value[1..].split(quote).next().unwrap_or(""),
            _ => value
                .split(|c: char| c == ';' || c.is_whitespace())
                .next()
                .unwrap_or(""),
        };
        let name = if extended {
            let encoded = name.rsplit("''").next().unwrap_or(name);
            percent_encoding::percent_decode_str(encoded)
                .decode_utf8_lossy()
                .into_owned()
        } else {
            name.to_owned()
        };
        names.push(name);
    }
    names
}

fn cookie_keys(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split('=').next())
        .map(|name| {
            let decoded = percent_encoding::percent_decode_str(name.trim()).decode_utf8_lossy();
            merge_key(&decoded)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn names_fold_as_merging_frameworks_file_them() {
        for spelling in ["qty", "QTY", " qty", "qty[]", "qty[a]", "Qty[0]", "qty\0x"] {
            assert_eq!(merge_key(spelling), "qty", "{spelling}");
        }
        assert_eq!(merge_key("price.limit"), "price_limit");
        assert_eq!(merge_key("price limit"), "price_limit");
    }

    #[test]
    fn a_name_given_in_another_part_is_found() {
        let json = headers(&[("content-type", "application/json")]);
        let parts = CallParts::new(&json, Some("qty[]=100&x=1"), Some(b"{\"qty\":2}"), &[]);
        assert_eq!(parts.also_given("qty", Part::Body), Some(Part::Query));
        assert_eq!(parts.also_given("qty", Part::Query), Some(Part::Body));
        assert_eq!(parts.also_given("product", Part::Body), None);

        let parts = CallParts::new(&json, Some("x=1;qty=100"), None, &[]);
        assert_eq!(parts.also_given("qty", Part::Body), Some(Part::Query));

        let cookie = headers(&[("cookie", "a=1; QTY=100")]);
        let parts = CallParts::new(&cookie, None, None, &[]);
        assert_eq!(parts.also_given("qty", Part::Body), Some(Part::Cookie));

        let path = [("orderId".to_owned(), "7".to_owned())];
        let form = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        let parts = CallParts::new(&form, None, Some(b"orderid=8"), &path);
        assert_eq!(parts.also_given("orderId", Part::Path), Some(Part::Body));
        assert_eq!(parts.also_given("orderId", Part::Body), Some(Part::Path));
    }

    #[test]
    fn multipart_part_names_are_found() {
        let multipart = headers(&[("content-type", "multipart/form-data; boundary=b")]);
        let body = b"--b\r\nContent-Disposition: form-data; name=\"qty\"\r\n\r\n100\r\n--b--";
        let parts = CallParts::new(&multipart, None, Some(body), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), Some(Part::Body));
        let unquoted = b"--b\r\nContent-Disposition: form-data; name=QTY\r\n\r\n1\r\n--b--";
        let parts = CallParts::new(&multipart, None, Some(unquoted), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), Some(Part::Body));
    }

    #[test]
    fn bodies_no_framework_merges_give_no_names() {
        let text = headers(&[("content-type", "text/plain")]);
        let parts = CallParts::new(&text, None, Some(b"qty=100"), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), None);
        let json = headers(&[("content-type", "application/json")]);
        let parts = CallParts::new(&json, None, Some(b"{\"a\":\"&qty=100\"}"), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), None);
    }

    #[test]
    fn json_and_forms_are_read_whatever_the_content_type_says() {
        // Laravel (`/json` anywhere in the header), Express's
        // json({ type: '*/*' }), FastAPI without a Content-Type.
        for content_type in [
            Some("text/plain"),
            Some("text/plain; x=/json"),
            Some("text/json"),
            Some("application/octet-stream"),
            None,
        ] {
            let map = match content_type {
                Some(t) => headers(&[("content-type", t)]),
                None => HeaderMap::new(),
            };
            let parts = CallParts::new(&map, None, Some(b"{\"qty\":100}"), &[]);
            assert_eq!(
                parts.also_given("qty", Part::Query),
                Some(Part::Body),
                "{content_type:?}"
            );
        }
        // Rack reads a body without a Content-Type as a form.
        let none = HeaderMap::new();
        let parts = CallParts::new(&none, None, Some(b"qty=100"), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), Some(Part::Body));
        // Of two Content-Types, either may be the one read.
        let two = headers(&[
            ("content-type", "application/json"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        let parts = CallParts::new(&two, None, Some(b"qty=100"), &[]);
        assert_eq!(parts.also_given("qty", Part::Query), Some(Part::Body));
    }
}
