//! The flags that deploy/ passes to `switchyard` are flags the binary accepts: every
//! `--flag` of every switchyard command line in deploy/compose.yaml, the Kubernetes
//! manifests under deploy/k8s/, the Dockerfile's CMD and the shell examples of
//! deploy/README.md is looked up in `switchyard <role> --help` (for a role with
//! subcommands, `ctl`: the flags before the subcommand in `switchyard ctl --help`, the
//! subcommand among its `Commands:`, the flags after it in `switchyard ctl SUB --help`). A
//! flag renamed or removed in the code fails this test until the manifests follow.
//!
//! The files are read as text, with no YAML library or kubectl: a command line is a YAML
//! sequence under a `command:` or `args:` key (block style, one item per line, or a
//! one-line flow sequence `[a, b]`) whose first item is a switchyard role, or whose items
//! are `sh -c SCRIPT` with `switchyard ROLE ...` in the script (the preStop drain hook; the
//! script may be a `>-`/`|` block scalar). Values such as `$(MODEL_DIR)` or `"$POD_NAME"`
//! are not checked, only flag names and subcommands (scripts/check-deploy checks the wiring
//! of the rendered manifests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROLES: &[&str] = &[
    "up",
    "coordinator",
    "expert-node",
    "ctl",
    "generate",
    "verify",
    "synth",
];

/// Shells whose `-c SCRIPT` is searched for switchyard command lines.
const SHELLS: &[&str] = &["sh", "/bin/sh", "bash", "/bin/bash"];

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

/// What `switchyard <command...> --help` says: its long flags (global ones included), with
/// whether each takes a value, and its subcommands (`Commands:`, empty for most roles).
#[derive(Debug)]
struct Help {
    /// flag -> takes a value (`--etcd <URL>`: yes; `[<URL>]`: optional; `--json`: no).
    flags: BTreeMap<String, Value>,
    subcommands: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    None,
    Required,
    Optional,
}

fn help_of(command: &[&str]) -> Help {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(command)
        .arg("--help")
        .output()
        .expect("running switchyard --help");
    let cmd = command.join(" ");
    assert!(
        out.status.success(),
        "switchyard {cmd} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    let mut flags = BTreeMap::new();
    let mut subcommands = BTreeSet::new();
    let mut in_commands = false;
    for line in help.lines() {
        if !line.starts_with(' ') {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        let l = line.trim_start();
        if in_commands {
            // `  drain    Move a node's experts away...`
            if let Some(sub) = l.split_whitespace().next()
                && sub != "help"
            {
                subcommands.insert(sub.to_owned());
            }
            continue;
        }
        if !l.starts_with('-') {
            continue;
        }
        // `-h, --help`, `--model <MODEL>`, `--nodes <NODES>  Expert nodes, ...`: the option
        // names and value placeholders come before the description.
        let words: Vec<&str> = l
            .split_whitespace()
            .take_while(|t| t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
            .collect();
        let value = match words.last() {
            Some(w) if w.starts_with('<') => Value::Required,
            Some(w) if w.starts_with('[') => Value::Optional,
            _ => Value::None,
        };
        for w in &words {
            let w = w.trim_end_matches(',');
            if w.starts_with("--") {
                flags.insert(flag_name(w).to_owned(), value);
            }
        }
    }
    assert!(
        flags.contains_key("--help"),
        "could not parse `switchyard {cmd} --help`:\n{help}"
    );
    Help { flags, subcommands }
}

/// What is wrong with one command line: flags `switchyard ROLE [SUB] --help` does not list,
/// a missing or unknown subcommand.
fn problems_of(inv: &Invocation, helps: &mut BTreeMap<Vec<String>, Help>) -> Vec<String> {
    fn help<'a>(helps: &'a mut BTreeMap<Vec<String>, Help>, cmd: &[&str]) -> &'a Help {
        helps
            .entry(cmd.iter().map(|s| s.to_string()).collect())
            .or_insert_with(|| help_of(cmd))
    }
    let mut problems = Vec::new();
    let mut context: Vec<&str> = vec![inv.role.as_str()];
    let mut args = inv.args.iter().peekable();
    while let Some(arg) = args.next() {
        let h = help(helps, &context);
        if arg == "--" {
            break;
        }
        if let Some(flag) = arg.strip_prefix("--").map(|_| flag_name(arg)) {
            match h.flags.get(flag).copied() {
                None => {
                    let cmd = context.join(" ");
                    let takes: Vec<&str> = h.flags.keys().map(String::as_str).collect();
                    problems.push(format!(
                        "{}: `switchyard {cmd} {flag}`: not a flag of `switchyard {cmd}` (it \
                         takes {})",
                        inv.at,
                        takes.join(" ")
                    ));
                }
                Some(Value::Required) if !arg.contains('=') => {
                    args.next();
                }
                Some(Value::Optional) if !arg.contains('=') => {
                    args.next_if(|a| !a.starts_with('-'));
                }
                Some(_) => {}
            }
            continue;
        }
        if context.len() == 1 && !h.subcommands.is_empty() {
            if h.subcommands.contains(arg.as_str()) {
                context.push(arg);
            } else {
                problems.push(format!(
                    "{}: `switchyard {} {arg}`: not a subcommand (there are {})",
                    inv.at,
                    inv.role,
                    h.subcommands.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                return problems;
            }
        }
    }
    if context.len() == 1 && !help(helps, &context).subcommands.is_empty() {
        problems.push(format!(
            "{}: `switchyard {}` without a subcommand",
            inv.at, inv.role
        ));
    }
    problems
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
        let mut j = i + 1;
        while j < lines.len() {
            let next = lines[j];
            j += 1;
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
            let value = t[2..].trim();
            let more_indented = |l: &str| !l.trim().is_empty() && indent(l) > ind;
            if ["|", "|-", ">", ">-"].contains(&value) {
                // A block scalar: the more-indented lines that follow. Folded (`>`) joins
                // them with spaces, literal (`|`) with newlines (shell command separators).
                let mut parts = Vec::new();
                while j < lines.len() && (lines[j].trim().is_empty() || more_indented(lines[j])) {
                    if !lines[j].trim().is_empty() {
                        parts.push(lines[j].trim());
                    }
                    j += 1;
                }
                items.push(parts.join(if value.starts_with('>') { " " } else { "\n" }));
            } else {
                // A plain or quoted scalar continued on the next lines is not read: refuse
                // it rather than check half a command line.
                assert!(
                    !lines.get(j).is_some_and(|l| more_indented(l)),
                    "line {}: a multi-line scalar in a `command:`/`args:` list; write the \
                     item on one line or as a `>-` block scalar",
                    j + 1
                );
                items.push(unquote(value));
            }
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

/// The simple commands of a shell script, as words with their quotes removed: split at
/// unquoted `|`, `&`, `;` and newlines; a redirection (`>`, `<`, `2>&1`) ends a command's
/// words; `#` at the start of a word comments out the rest of the line.
fn shell_commands(script: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let (mut words, mut word) = (Vec::new(), String::new());
    let (mut in_word, mut redirected) = (false, false);
    let mut quote: Option<char> = None;
    let mut chars = script.chars();
    let end_word = |words: &mut Vec<String>, word: &mut String, in_word: &mut bool, r: bool| {
        if *in_word && !r {
            words.push(std::mem::take(word));
        }
        word.clear();
        *in_word = false;
    };
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            match c {
                _ if c == q => quote = None,
                '\\' if q == '"' => word.extend(chars.next()),
                _ => word.push(c),
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                in_word = true;
            }
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    word.push(n);
                    in_word = true;
                }
            },
            '#' if !in_word => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
                end_word(&mut words, &mut word, &mut in_word, redirected);
                commands.push(std::mem::take(&mut words));
                redirected = false;
            }
            ' ' | '\t' => end_word(&mut words, &mut word, &mut in_word, redirected),
            '\n' | ';' | '|' | '&' => {
                end_word(&mut words, &mut word, &mut in_word, redirected);
                commands.push(std::mem::take(&mut words));
                redirected = false;
            }
            '>' | '<' => {
                // `2>&1`: the `2` is part of the redirection, not a word.
                word.clear();
                in_word = false;
                redirected = true;
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut words, &mut word, &mut in_word, redirected);
    commands.push(words);
    commands.retain(|c| !c.is_empty());
    commands
}

/// The switchyard command lines (role first) in one shell command's words: a `switchyard`
/// word (or an image reference `...switchyard:TAG`) followed by a role, and those inside
/// `sh -c SCRIPT` (`kubectl exec POD -- sh -c '...'`, a preStop hook).
fn switchyard_argvs(words: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for (w, word) in words.iter().enumerate() {
        let is_switchyard = word == "switchyard"
            || word.ends_with("/switchyard")
            || word
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("switchyard:"));
        if is_switchyard
            && words
                .get(w + 1)
                .is_some_and(|r| ROLES.contains(&r.as_str()))
        {
            found.push(words[w + 1..].to_vec());
            break;
        }
        if SHELLS.contains(&word.as_str())
            && words.get(w + 1).is_some_and(|a| a == "-c")
            && let Some(script) = words.get(w + 2)
        {
            for cmd in shell_commands(script) {
                found.extend(switchyard_argvs(&cmd));
            }
            break;
        }
    }
    found
}

/// switchyard command lines in the shell blocks of a Markdown file (see
/// [`switchyard_argvs`]). Backslash continuations are joined; the command line ends at a
/// shell operator.
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
        for argv in shell_commands(&joined)
            .iter()
            .flat_map(|words| switchyard_argvs(words))
        {
            found.push((start, argv));
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
            // Role first, or `sh -c SCRIPT` (switchyard_argvs looks inside the script).
            let argvs = match items.first() {
                Some(first) if ROLES.contains(&first.as_str()) => vec![items],
                Some(first) if SHELLS.contains(&first.as_str()) => switchyard_argvs(&items),
                _ => Vec::new(),
            };
            for argv in argvs {
                let (role, args) = argv.split_first().expect("a role");
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
    let mut helps = BTreeMap::new();
    let problems: Vec<String> = invocations()
        .iter()
        .flat_map(|inv| problems_of(inv, &mut helps))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check itself is strict: a flag in the wrong place, an unknown subcommand or flag
/// fails it (clap takes `ctl`'s --etcd only before the subcommand).
#[test]
fn the_flag_check_rejects_what_the_binary_rejects() {
    let mut helps = BTreeMap::new();
    let mut check = |line: &str| {
        let argv: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let inv = Invocation {
            at: "test".into(),
            role: argv[0].clone(),
            args: argv[1..].to_vec(),
        };
        problems_of(&inv, &mut helps)
    };
    for good in [
        "ctl --etcd $E --cluster c drain $POD_NAME --timeout-s 90",
        "ctl --etcd=http://e:2379 status --json",
        "ctl --etcd $E undrain n",
        "expert-node --model m --etcd $(E) --advertise a:1 --max-experts 4",
        "up --etcd --nodes 3",
    ] {
        assert_eq!(check(good), Vec::<String>::new(), "{good}");
    }
    for bad in [
        "ctl --etcd $E drain n --etcd $E",
        "ctl --etcd $E status --timeout-s 3",
        "ctl --etcd $E remove n",
        "ctl --etcd $E",
        "coordinator --model m --no-such-flag",
    ] {
        assert!(!check(bad).is_empty(), "accepted: {bad}");
    }
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
        ("deploy/k8s/base/expert-node.yaml", "ctl"),
        ("deploy/Dockerfile", "up"),
        ("deploy/README.md", "verify"),
        ("deploy/README.md", "ctl"),
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
    // The preStop hook's script (a folded block scalar inside `sh -c`) is read whole.
    let pre_stop = invocations
        .iter()
        .find(|i| i.role == "ctl" && i.at.starts_with("deploy/k8s/base/expert-node.yaml"))
        .expect("the preStop drain");
    assert_eq!(
        pre_stop.args,
        [
            "--etcd",
            "$ETCD_ENDPOINTS",
            "--cluster",
            "$SWITCHYARD_CLUSTER",
            "drain",
            "$POD_NAME",
            "--timeout-s",
            "$DRAIN_TIMEOUT_S"
        ],
        "{pre_stop:?}"
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
    // `sh -c` scripts, quoted words, redirections, in Markdown and in a YAML block scalar.
    let md =
        "```sh\nkubectl exec p -- sh -c 'exec switchyard ctl --etcd \"$E\" status' 2>&1\n```\n";
    assert_eq!(
        markdown_commands(md),
        vec![(
            2,
            vec!["ctl".into(), "--etcd".into(), "$E".into(), "status".into()]
        )]
    );
    let yaml = "\
lifecycle:
  preStop:
    exec:
      command:
        - sh
        - -c
        - >-
          exec switchyard ctl --etcd \"$E\"
          drain \"$POD_NAME\" >/dev/null
";
    let lists = yaml_command_lists(yaml);
    assert_eq!(
        lists,
        vec![(
            4,
            vec![
                "sh".into(),
                "-c".into(),
                "exec switchyard ctl --etcd \"$E\" drain \"$POD_NAME\" >/dev/null".into()
            ]
        )]
    );
    assert_eq!(
        switchyard_argvs(&lists[0].1),
        vec![vec![
            "ctl".to_owned(),
            "--etcd".into(),
            "$E".into(),
            "drain".into(),
            "$POD_NAME".into()
        ]]
    );
}
