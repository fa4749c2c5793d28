//! The report as JUnit XML, which CI systems show per case: a test suite
//! per file, a test case per case, the diff as the failure's text.

use std::fmt::Write as _;

use super::Report;

/// The JUnit XML document of `report`.
pub fn xml(report: &Report) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let total_time: f64 = report.cases().map(|c| c.duration.as_secs_f64()).sum();
    let _ = writeln!(
        out,
        "<testsuites name=\"countersign test\" tests=\"{}\" failures=\"{}\" time=\"{total_time:.6}\">",
        report.total(),
        report.failed()
    );
    for file in &report.files {
        let path = escape(&file.path.display().to_string());
        let failures = file.cases.iter().filter(|c| c.failure.is_some()).count();
        let time: f64 = file.cases.iter().map(|c| c.duration.as_secs_f64()).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{path}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{time:.6}\">",
            file.cases.len()
        );
        for case in &file.cases {
            let name = escape(&case.name);
            let time = case.duration.as_secs_f64();
            match &case.failure {
                None => {
                    let _ = writeln!(
                        out,
                        "    <testcase name=\"{name}\" classname=\"{path}\" time=\"{time:.6}\"/>"
                    );
                }
                Some(diff) => {
                    let _ = writeln!(
                        out,
                        "    <testcase name=\"{name}\" classname=\"{path}\" time=\"{time:.6}\">\n      <failure message=\"the call got another outcome than expected\">{}</failure>\n    </testcase>",
                        escape(diff)
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Text as XML character data or an attribute value. Characters XML 1.0
/// cannot carry at all (controls other than tab and line ends) become `?`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_controls_are_escaped() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;?");
    }
}
