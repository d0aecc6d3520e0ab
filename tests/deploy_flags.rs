//! The flags that deploy/ passes to `switchyard` are flags the binary accepts: every
//! `--flag` of every switchyard command line in deploy/compose.yaml, the Kubernetes
//! manifests under deploy/k8s/, the Dockerfile's CMD and the shell examples of
//! deploy/README.md is looked up in `switchyard <role> --help`. A flag renamed or removed
//! in the code fails this test until the manifests follow.
//!
//! The files are read as text, with no YAML library or kubectl: a command line is a YAML
//! sequence under a `command:` or `args:` key (block style, one item per line, or a
//! one-line flow sequence `[a, b]`) whose first item is a switchyard role. Values such as
//! `$(MODEL_DIR)` are not checked, only flag names (scripts/check-deploy checks the
//! wiring of the rendered manifests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROLES: &[&str] = &[
    "up",
    "coordinator",
    "expert-node",
    "generate",
    "verify",
    "synth",
];

/// One switchyard command line found in a deploy file.
#[derive(Debug)]
struct Invocation {
    /// `path:line` where the command line starts (its `command:`/`args:` key).
    at: String,
    role: String,
    args: Vec<String>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The long flags `switchyard <role> --help` lists, global ones included.
fn accepted_flags(role: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([role, "--help"])
        .output()
        .expect("running switchyard --help");
    assert!(
        out.status.success(),
        "switchyard {role} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    let flags: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            // `-h, --help`, `--model <MODEL>`, `--nodes <NODES>  Expert nodes, ...`: the
            // option names come before the description.
            l.split_whitespace()
                .take_while(|t| t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
                .filter_map(|t| {
                    let t = t.trim_end_matches(',');
                    t.starts_with("--").then(|| flag_name(t).to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        flags.contains("--help"),
        "could not parse `switchyard {role} --help`:\n{help}"
    );
    flags
}

/// `--flag=value` -> `--flag`.
fn flag_name(arg: &str) -> &str {
    arg.split('=').next().unwrap_or(arg)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The line without a trailing ` # comment` (outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                return line[..i].trim_end();
            }
            _ => {}
        }
    }
    line.trim_end()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_owned();
        }
    }
    s.to_owned()
}

/// Items of a one-line flow sequence `[a, "b", 'c']`.
fn flow_items(s: &str) -> Vec<String> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let (mut items, mut cur, mut quote) = (Vec::new(), String::new(), None);
    for ch in inner.chars() {
        match (ch, quote) {
            ('"' | '\'', None) => {
                quote = Some(ch);
                cur.push(ch);
            }
            (c, Some(q)) if c == q => {
                quote = None;
                cur.push(ch);
            }
            (',', None) => items.push(unquote(&std::mem::take(&mut cur))),
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() {
        items.push(unquote(&cur));
    }
    items
}

/// Every sequence under a `command:` or `args:` key of a YAML file, with its line number.
fn yaml_command_lists(text: &str) -> Vec<(usize, Vec<String>)> {
    let lines: Vec<&str> = text.lines().map(strip_comment).collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        // `command:` or `- command:` (a key of a mapping that is itself a list item).
        let key_part = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some(rest) = ["command:", "args:"]
            .iter()
            .find_map(|k| key_part.strip_prefix(k))
        else {
            continue;
        };
        let key_indent = indent(line) + (trimmed.len() - key_part.len());
        let rest = rest.trim();
        if rest.starts_with('[') {
            found.push((i + 1, flow_items(rest)));
            continue;
        }
        if !rest.is_empty() {
            continue; // a scalar command (`command: ./run.sh`): not a switchyard argv
        }
        let mut items = Vec::new();
        let mut item_indent = None;
        for next in &lines[i + 1..] {
            if next.trim().is_empty() {
                continue;
            }
            let ind = indent(next);
            let t = next.trim_start();
            match item_indent {
                None if ind >= key_indent && t.starts_with("- ") => item_indent = Some(ind),
                None => break,
                Some(ii) if ind == ii && t.starts_with("- ") => {}
                Some(_) => break,
            }
            items.push(unquote(&t[2..]));
        }
        if !items.is_empty() {
            found.push((i + 1, items));
        }
    }
    found
}

/// The Dockerfile's exec-form `CMD [...]` (arguments to the `switchyard` entrypoint).
fn dockerfile_cmds(text: &str) -> Vec<(usize, Vec<String>)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let json = l.trim().strip_prefix("CMD ")?;
            let items: Vec<String> = serde_json::from_str(json.trim()).ok()?;
            Some((i + 1, items))
        })
        .collect()
}

/// switchyard command lines in the shell blocks of a Markdown file: a `switchyard` word (or
/// an image reference `...switchyard:TAG`) followed by a role. Backslash continuations are
/// joined; the command line ends at a shell operator.
fn markdown_commands(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut found = Vec::new();
    let mut in_code = false;
    let mut joined = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            joined.clear();
            continue;
        }
        if !in_code {
            continue;
        }
        if joined.is_empty() {
            start = i + 1;
        }
        let l = strip_comment(line);
        if let Some(cont) = l.strip_suffix('\\') {
            joined.push_str(cont);
            joined.push(' ');
            continue;
        }
        joined.push_str(l);
        let words: Vec<&str> = joined.split_whitespace().collect();
        for (w, word) in words.iter().enumerate() {
            let is_switchyard = *word == "switchyard"
                || word.ends_with("/switchyard")
                || word
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("switchyard:"));
            if is_switchyard && words.get(w + 1).is_some_and(|r| ROLES.contains(r)) {
                let argv: Vec<String> = words[w + 1..]
                    .iter()
                    .take_while(|t| !["|", "&&", "||", ";", "&", ">", "2>&1"].contains(t))
                    .map(|t| unquote(t))
                    .collect();
                found.push((start, argv));
            }
        }
        joined.clear();
    }
    found
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every switchyard command line in deploy/.
fn invocations() -> Vec<Invocation> {
    let mut found = Vec::new();
    let mut push = |path: &Path, lists: Vec<(usize, Vec<String>)>| {
        for (line, items) in lists {
            if let Some((role, args)) = items.split_first()
                && ROLES.contains(&role.as_str())
            {
                found.push(Invocation {
                    at: format!("{}:{line}", rel(path)),
                    role: role.clone(),
                    args: args.to_vec(),
                });
            }
        }
    };
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    for f in &files {
        push(f, yaml_command_lists(&read(f)));
    }
    let dockerfile = deploy_dir().join("Dockerfile");
    push(&dockerfile, dockerfile_cmds(&read(&dockerfile)));
    let readme = deploy_dir().join("README.md");
    push(&readme, markdown_commands(&read(&readme)));
    found
}

#[test]
fn manifests_use_only_flags_the_binary_accepts() {
    let invocations = invocations();
    let mut accepted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for inv in &invocations {
        let flags = accepted
            .entry(inv.role.clone())
            .or_insert_with(|| accepted_flags(&inv.role));
        for arg in &inv.args {
            if !arg.starts_with("--") || arg == "--" {
                continue;
            }
            let name = flag_name(arg);
            if !flags.contains(name) {
                problems.push(format!(
                    "{}: `switchyard {} {name}`: not a flag of `switchyard {}` (it takes {})",
                    inv.at,
                    inv.role,
                    inv.role,
                    flags.iter().cloned().collect::<Vec<_>>().join(" ")
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The parser above must actually find the command lines: an empty result would pass
/// the flag check vacuously.
#[test]
fn every_deploy_file_with_a_role_is_seen() {
    let invocations = invocations();
    let seen = |file: &str, role: &str| {
        invocations
            .iter()
            .any(|i| i.role == role && i.at.starts_with(file))
    };
    for (file, role) in [
        ("deploy/compose.yaml", "coordinator"),
        ("deploy/compose.yaml", "expert-node"),
        ("deploy/k8s/base/coordinator.yaml", "coordinator"),
        ("deploy/k8s/base/expert-node.yaml", "expert-node"),
        ("deploy/Dockerfile", "up"),
        ("deploy/README.md", "verify"),
    ] {
        assert!(
            seen(file, role),
            "found no `switchyard {role}` command line in {file}; found: {invocations:#?}"
        );
    }
    // Each compose service list is 8+ items: a parse that stops early would show here.
    let compose_node = invocations
        .iter()
        .find(|i| i.role == "expert-node" && i.at.starts_with("deploy/compose.yaml"))
        .expect("a compose expert node");
    assert!(
        compose_node.args.iter().any(|a| a == "--listen"),
        "{compose_node:?}"
    );
}

#[test]
fn the_textual_parser_reads_both_sequence_styles() {
    let yaml = "\
spec:
  containers:
    - name: a
      # a comment line inside the list does not end it
      args:
      - coordinator
      - \"--port\"   # trailing comment
      - '8000'
      env: []
    - command: [expert-node, \"--listen\", '0.0.0.0:1']
    - name: b
      command:
        - etcd
        - --name=x
";
    let lists = yaml_command_lists(yaml);
    assert_eq!(
        lists,
        vec![
            (
                5,
                vec!["coordinator".into(), "--port".into(), "8000".into()]
            ),
            (
                10,
                vec!["expert-node".into(), "--listen".into(), "0.0.0.0:1".into()]
            ),
            (12, vec!["etcd".into(), "--name=x".into()]),
        ]
    );
    let md = "```sh\ndocker run --rm -p 8000:8000 switchyard:dev \\\n  coordinator --port 1 | cat\n```\n";
    assert_eq!(
        markdown_commands(md),
        vec![(2, vec!["coordinator".into(), "--port".into(), "1".into()])]
    );
}
