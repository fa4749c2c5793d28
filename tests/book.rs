//! The documentation as a reader follows it: every relative link and
//! `#anchor` in README.md, ARCHITECTURE.md and the book (`docs/`, an mdBook)
//! leads to a file that exists and a heading it has, every chapter is in
//! docs/SUMMARY.md, and the README's minimal configuration and policy pass
//! `countersign check` as printed. No network: `.ci/run` builds the book
//! with `mdbook build docs`.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The Markdown files whose links are checked, relative to `root`: README.md,
/// ARCHITECTURE.md and every `*.md` under docs/.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("README.md"), PathBuf::from("ARCHITECTURE.md")];
    found.extend(chapters(root));
    found
}

/// Every `*.md` under docs/, relative to `root`, sorted.
fn chapters(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let entry = entry.unwrap();
            let relative = dir.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                walk(root, &relative, out);
            } else if relative.extension().is_some_and(|e| e == "md") {
                out.push(relative);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new("docs"), &mut out);
    out.sort();
    out
}

/// The text outside fenced code blocks, line by line (a fence's lines
/// blanked, so line numbers stay), with inline code spans blanked too.
fn prose(markdown: &str) -> Vec<String> {
    let mut fence: Option<String> = None;
    let mut lines = Vec::new();
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        if marker.len() >= 3 && marker.chars().all(|c| c == marker.chars().next().unwrap()) {
            match &fence {
                None => fence = Some(marker),
                Some(open) if marker.starts_with(open.as_str()) && trimmed.trim() == marker => {
                    fence = None
                }
                Some(_) => {}
            }
            lines.push(String::new());
            continue;
        }
        lines.push(if fence.is_some() {
            String::new()
        } else {
            line.to_owned()
        });
    }
    // Code spans may wrap onto the next line: blank them over the whole text.
    let text = lines.join("\n");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let run = rest[start..].chars().take_while(|&c| c == '`').count();
        let ticks = "`".repeat(run);
        let after = &rest[start + run..];
        match after.find(&ticks) {
            Some(end) => {
                let span = &rest[start..start + run + end + run];
                out.extend(span.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
                rest = &after[end + run..];
            }
            None => {
                out.push_str(&ticks);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.lines().map(str::to_owned).collect()
}

/// The targets of inline links and images, `[text](target)`, with their
/// line numbers (1-based).
fn links(markdown: &str) -> Vec<(usize, String)> {
    let lines = prose(markdown);
    let text = lines.join("\n");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("](") {
        let start = from + at + 2;
        let end = text[start..]
            .find(')')
            .map(|e| start + e)
            .unwrap_or(text.len());
        let target = text[start..end].split_whitespace().next().unwrap_or("");
        let line = text[..start].matches('\n').count() + 1;
        found.push((line, target.trim_matches(['<', '>']).to_owned()));
        from = end;
    }
    found
}

/// The anchors of a Markdown file's headings, as GitHub and mdBook make
/// them: the heading's text without its markup, lower case, letters,
/// digits, `-` and `_` kept, spaces as `-`; a repeated one gets `-1`, `-2`.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in markdown_headings(markdown) {
        let base = slug(&line);
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

fn markdown_headings(markdown: &str) -> Vec<String> {
    // Headings are read from the text with fences blanked but code spans
    // kept (their text is part of the anchor).
    let blank_fences: Vec<String> = {
        let mut fence = false;
        markdown
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("```") || t.starts_with("~~~") {
                    fence = !fence;
                    return String::new();
                }
                if fence {
                    String::new()
                } else {
                    l.to_owned()
                }
            })
            .collect()
    };
    blank_fences
        .iter()
        .filter_map(|l| {
            let hashes = l.chars().take_while(|&c| c == '#').count();
            (1..=6)
                .contains(&hashes)
                .then(|| l[hashes..].strip_prefix(' '))
                .flatten()
                .map(|t| t.trim().trim_end_matches('#').trim().to_owned())
        })
        .collect()
}

fn slug(heading: &str) -> String {
    // [text](url) reads as text.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](") {
            Some(mid) => {
                let close = rest[open + mid..].find(')').map(|c| open + mid + c);
                let Some(close) = close else { break };
                text.push_str(&rest[..open]);
                text.push_str(&rest[open + 1..open + mid]);
                rest = &rest[close + 1..];
            }
            None => break,
        }
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// `base/relative`, with `.` and `..` resolved lexically.
/// A `..` above `base`'s root is kept, so a link out of the repository
/// stays one.
fn join(base: &Path, relative: &str) -> PathBuf {
    let joined = base.join(relative);
    let mut parts: Vec<Component> = Vec::new();
    for part in joined.components() {
        match part {
            Component::ParentDir if matches!(parts.last(), Some(Component::Normal(_))) => {
                parts.pop();
            }
            Component::CurDir => {}
            other => parts.push(other),
        }
    }
    parts.iter().collect()
}

/// Every link of `documents` (relative to `root`) that leads nowhere, as
/// `file:line: target: why`.
fn broken_links(root: &Path, documents: &[PathBuf]) -> Vec<String> {
    let mut broken = Vec::new();
    for document in documents {
        let text = std::fs::read_to_string(root.join(document))
            .unwrap_or_else(|e| panic!("{}: {e}", document.display()));
        let dir = document.parent().unwrap_or(Path::new(""));
        for (line, target) in links(&text) {
            let place = format!("{}:{line}: {target}", document.display());
            if target.is_empty() {
                broken.push(format!("{place}: an empty link"));
                continue;
            }
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                document.clone()
            } else {
                join(dir, path)
            };
            if file.components().next() == Some(Component::ParentDir)
                || file.is_absolute()
                || path.starts_with('/')
            {
                broken.push(format!("{place}: leaves the repository"));
                continue;
            }
            let on_disk = root.join(&file);
            if !on_disk.exists() {
                broken.push(format!("{place}: no such file {}", file.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if on_disk.extension().is_none_or(|e| e != "md") {
                broken.push(format!("{place}: an anchor in a file that is not Markdown"));
                continue;
            }
            let headings = anchors(&std::fs::read_to_string(&on_disk).unwrap());
            if !headings.contains(anchor) {
                broken.push(format!(
                    "{place}: {} has no heading #{anchor}",
                    file.display()
                ));
            }
        }
    }
    broken
}

/// The chapters under docs/ that docs/SUMMARY.md does not list.
fn chapters_not_in_summary(root: &Path) -> Vec<String> {
    let summary = std::fs::read_to_string(root.join("docs/SUMMARY.md")).unwrap();
    let listed: BTreeSet<PathBuf> = links(&summary)
        .into_iter()
        .map(|(_, target)| join(Path::new("docs"), &target))
        .collect();
    chapters(root)
        .into_iter()
        .filter(|chapter| chapter != Path::new("docs/SUMMARY.md") && !listed.contains(chapter))
        .map(|chapter| chapter.display().to_string())
        .collect()
}

#[test]
fn every_link_of_the_readme_architecture_and_book_leads_somewhere() {
    let root = Path::new(REPO);
    let documents = documents(root);
    assert!(
        documents.len() > 10,
        "the book's chapters were found: {documents:?}"
    );
    let broken = broken_links(root, &documents);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_chapter_is_in_the_summary() {
    let missing = chapters_not_in_summary(Path::new(REPO));
    assert!(
        missing.is_empty(),
        "chapters docs/SUMMARY.md does not list (mdBook would leave them out): {missing:?}"
    );
}

/// The checker itself: a link to a missing file, to a heading a file does
/// not have, or out of the repository is reported, with its line; links in
/// code, to web pages, and to headings as GitHub spells them are not.
#[test]
fn a_broken_link_or_anchor_is_reported() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("docs")).unwrap();
    std::fs::write(
        root.path().join("docs/SUMMARY.md"),
        "# Summary\n\n- [Chapter](chapter.md)\n",
    )
    .unwrap();
    std::fs::write(
        root.path().join("docs/chapter.md"),
        "# Conditions: `when` and `otherwise`\n\n## Four eyes: a second person\n\n\
         ## Four eyes: a second person\n\n```sh\n# not a heading\n```\n",
    )
    .unwrap();
    std::fs::write(root.path().join("docs/orphan.md"), "# Orphan\n").unwrap();
    std::fs::write(
        root.path().join("README.md"),
        "# Readme\n\n\
         [fine](docs/chapter.md#conditions-when-and-otherwise) and\n\
         [twice](docs/chapter.md#four-eyes-a-second-person-1) and [web](https://example.com/x)\n\
         and `[in code](nowhere.md)` and [here](#readme).\n\
         ```md\n[in a block](nowhere.md)\n```\n\
         [gone](docs/missing.md)\n\
         [no heading](docs/chapter.md#not-a-heading)\n\
         [wrapped\ntext](docs/chapter.md#when)\n\
         [out](../../etc/passwd)\n",
    )
    .unwrap();
    std::fs::write(root.path().join("ARCHITECTURE.md"), "# Architecture\n").unwrap();
    let documents = documents(root.path());
    let broken = broken_links(root.path(), &documents);
    assert_eq!(
        broken,
        [
            "README.md:9: docs/missing.md: no such file docs/missing.md",
            "README.md:10: docs/chapter.md#not-a-heading: docs/chapter.md has no heading #not-a-heading",
            "README.md:12: docs/chapter.md#when: docs/chapter.md has no heading #when",
            "README.md:13: ../../etc/passwd: leaves the repository",
        ],
        "{broken:#?}"
    );
    assert_eq!(chapters_not_in_summary(root.path()), ["docs/orphan.md"]);
}

/// The README's minimal configuration and policy ("Run it in front of your
/// API"), written to the files they name, pass `countersign check`, and so
/// does the configuration with the README's TLS `listen` block in its place.
#[test]
fn the_readmes_minimal_configuration_and_policy_pass_check() {
    const README: &str = include_str!("../README.md");
    let section = README
        .split("\n## Run it in front of your API")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README has the section");
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    for block in section.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        // The blocks sit in a list item: their lines are indented alike.
        let indent =
            block.lines().next().unwrap().len() - block.lines().next().unwrap().trim_start().len();
        let yaml: String = block
            .lines()
            .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
            .collect();
        let name = yaml
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .expect("each block starts with the name of its file")
            .trim()
            .to_owned();
        std::fs::write(dir.path().join(&name), yaml).unwrap();
        written.push(name);
    }
    assert_eq!(
        written,
        [
            "countersign.yaml",
            "policies.yaml",
            "countersign.yaml, over TLS"
        ]
    );
    let check = |config: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
            .args(["check", "--config", config])
            .current_dir(dir.path())
            .env_clear()
            .env("CIBA_CLIENT_ID", "countersign")
            .env("CIBA_CLIENT_SECRET", "s3cr3t")
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{config}: {printed}");
        assert!(printed.contains("is valid"), "{printed}");
        assert!(
            printed.contains("buy-product"),
            "the route table: {printed}"
        );
    };
    check("countersign.yaml");

    // Over TLS: the shown `listen` block replaces the minimal one, with a
    // certificate and key where it names them.
    let plain = std::fs::read_to_string(dir.path().join("countersign.yaml")).unwrap();
    let listen = std::fs::read_to_string(dir.path().join("countersign.yaml, over TLS")).unwrap();
    let (_, rest) = plain.split_once("listen:").unwrap();
    let (_, after_listen) = rest.split_once("\nupstreams:").unwrap();
    std::fs::write(
        dir.path().join("tls.yaml"),
        format!("{listen}upstreams:{after_listen}"),
    )
    .unwrap();
    let leaf = rcgen::generate_simple_self_signed(vec!["api.example".to_owned()]).unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/api.example.pem"), leaf.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("certs/api.example.key"),
        leaf.key_pair.serialize_pem(),
    )
    .unwrap();
    check("tls.yaml");
}
