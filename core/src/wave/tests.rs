//! Parsing and validation, field by field, with the fixtures in `tests/bad-waves/`.

use std::collections::BTreeMap;

use super::*;

fn parse(text: &str) -> Result<WaveSpec, WaveError> {
    parse_wave(text.as_bytes(), Format::Auto, &WaveLimits::default())
}

fn parse_ok(text: &str) -> WaveSpec {
    match parse(text) {
        Ok(spec) => spec,
        Err(e) => panic!("expected a valid wave, got: {e}\n{text}"),
    }
}

/// One task with `fields` added to a minimal valid task.
fn one_task(fields: &str) -> TaskSpec {
    let spec = parse_ok(&format!("name = \"w\"\n[[task]]\nid = \"t\"\n{fields}\n"));
    spec.tasks.into_iter().next().expect("one task")
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The wave the README shows.
const README_EXAMPLE: &str = r#"
name = "nightly-etl"
on_failure = "skip-dependents"   # or "fail-wave"

[defaults]
timeout = "10m"
retries = 2
cpus = 1
memory = "256MiB"
env = { RUST_LOG = "info" }

[[task]]
id = "prepare"
run = "mkdir -p /tmp/etl && echo ready"

[[task]]
id = "shard"
array = 100
deps = ["prepare"]
cmd = ["python3", "process.py", "--all"]

[[task]]
id = "merge"
deps = ["shard"]
run = "cat /tmp/etl/*.out > /tmp/etl/result"
gpus = 0
labels = { arch = "x86_64" }
"#;

#[test]
fn the_readme_example_parses_with_defaults_applied() {
    let spec = parse_ok(README_EXAMPLE);
    assert_eq!(spec.name, "nightly-etl");
    assert_eq!(spec.on_failure, OnFailure::SkipDependents);
    let ids: Vec<&str> = spec.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["prepare", "shard", "merge"]);
    let [prepare, shard, merge] = &spec.tasks[..] else {
        panic!("three tasks")
    };
    assert_eq!(
        prepare.command,
        CommandSpec::Shell("mkdir -p /tmp/etl && echo ready".into())
    );
    assert_eq!(prepare.array, None);
    assert!(prepare.deps.is_empty());
    assert_eq!(
        shard.command,
        CommandSpec::Argv(vec!["python3".into(), "process.py".into(), "--all".into()])
    );
    assert_eq!(shard.array, Some(100));
    assert_eq!(shard.deps, [0]);
    assert_eq!(merge.deps, [1]);
    for task in &spec.tasks {
        assert_eq!(task.timeout_ms, 600_000, "{}", task.id);
        assert_eq!(task.retries, 2);
        assert_eq!(task.cpus, 1);
        assert_eq!(task.memory_bytes, 256 << 20);
        assert_eq!(task.gpus, 0);
        assert_eq!(task.env, map(&[("RUST_LOG", "info")]));
    }
    assert_eq!(merge.labels, map(&[("arch", "x86_64")]));
    assert!(prepare.labels.is_empty());
    assert_eq!(spec.n_micro_tasks(), 102);
}

#[test]
fn built_in_defaults_apply_without_a_defaults_table() {
    let task = one_task("run = \"true\"");
    assert_eq!(task.command, CommandSpec::Shell("true".into()));
    assert_eq!(task.array, None);
    assert_eq!(task.n_micro_tasks(), 1);
    assert!(task.deps.is_empty());
    assert_eq!(task.timeout_ms, 0);
    assert_eq!(task.retries, 0);
    assert_eq!(task.cpus, 1);
    assert_eq!(task.memory_bytes, 0);
    assert_eq!(task.gpus, 0);
    assert!(task.env.is_empty());
    assert!(task.labels.is_empty());
    let spec = parse_ok("name = \"w\"\n[[task]]\nid = \"t\"\nrun = \"true\"\n");
    assert_eq!(spec.on_failure, OnFailure::SkipDependents);
}

#[test]
fn on_failure_reads_both_values() {
    for (text, expected) in [
        ("skip-dependents", OnFailure::SkipDependents),
        ("fail-wave", OnFailure::FailWave),
    ] {
        let spec = parse_ok(&format!(
            "name = \"w\"\non_failure = \"{text}\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n"
        ));
        assert_eq!(spec.on_failure, expected);
        assert_eq!(expected.as_str(), text);
    }
}

#[test]
fn each_task_field_is_read() {
    let base = "run = \"true\"\n";
    assert_eq!(one_task(&format!("{base}array = 7")).array, Some(7));
    assert_eq!(one_task(&format!("{base}array = 7")).n_micro_tasks(), 7);
    assert_eq!(one_task(&format!("{base}array = 1")).array, Some(1));
    assert_eq!(
        one_task(&format!("{base}timeout = \"1h30m\"")).timeout_ms,
        5_400_000
    );
    assert_eq!(one_task(&format!("{base}timeout = 45")).timeout_ms, 45_000);
    assert_eq!(one_task(&format!("{base}timeout = \"0\"")).timeout_ms, 0);
    assert_eq!(one_task(&format!("{base}timeout = 0")).timeout_ms, 0);
    assert_eq!(one_task(&format!("{base}retries = 100")).retries, 100);
    assert_eq!(one_task(&format!("{base}cpus = 1024")).cpus, 1024);
    assert_eq!(
        one_task(&format!("{base}memory = \"1GiB\"")).memory_bytes,
        1 << 30
    );
    assert_eq!(one_task(&format!("{base}memory = 4096")).memory_bytes, 4096);
    assert_eq!(
        one_task(&format!("{base}memory = \"1PiB\"")).memory_bytes,
        1 << 50
    );
    assert_eq!(one_task(&format!("{base}gpus = 2")).gpus, 2);
    assert_eq!(
        one_task(&format!("{base}env = {{ A_1 = \"x\", _b = \"\" }}")).env,
        map(&[("A_1", "x"), ("_b", "")])
    );
    assert_eq!(
        one_task(&format!(
            "{base}labels = {{ arch = \"arm64\", \"zone.io/rack\" = \"r1\" }}"
        ))
        .labels,
        map(&[("arch", "arm64"), ("zone.io/rack", "r1")])
    );
    assert_eq!(
        one_task("cmd = [\"echo\", \"a b\", \"\"]").command,
        CommandSpec::Argv(vec!["echo".into(), "a b".into(), String::new()])
    );
    assert_eq!(one_task(base).workdir, None);
    assert_eq!(
        one_task(&format!("{base}workdir = \"/srv/data set\"")).workdir,
        Some("/srv/data set".to_owned())
    );
    let id = "A-z_0.9";
    let spec = parse_ok(&format!(
        "name = \"w\"\n[[task]]\nid = \"{id}\"\nrun = \"x\""
    ));
    assert_eq!(spec.tasks[0].id, id);
}

#[test]
fn a_task_value_overrides_its_default_and_maps_merge() {
    let spec = parse_ok(
        r#"
name = "w"
[defaults]
timeout = "10m"
retries = 3
cpus = 2
memory = "1GiB"
gpus = 1
env = { A = "default", B = "default" }
labels = { arch = "x86_64", zone = "a" }
workdir = "/srv/default"

[[task]]
id = "own"
run = "true"
timeout = "30s"
retries = 0
cpus = 4
memory = "512MB"
gpus = 0
env = { B = "task", C = "task" }
labels = { zone = "b" }
workdir = "/srv/own"

[[task]]
id = "inherits"
run = "true"
"#,
    );
    let own = &spec.tasks[0];
    assert_eq!(own.timeout_ms, 30_000);
    assert_eq!(own.retries, 0);
    assert_eq!(own.cpus, 4);
    assert_eq!(own.memory_bytes, 512_000_000);
    assert_eq!(own.gpus, 0);
    assert_eq!(
        own.env,
        map(&[("A", "default"), ("B", "task"), ("C", "task")])
    );
    assert_eq!(own.labels, map(&[("arch", "x86_64"), ("zone", "b")]));
    assert_eq!(own.workdir.as_deref(), Some("/srv/own"));
    let inherits = &spec.tasks[1];
    assert_eq!(inherits.timeout_ms, 600_000);
    assert_eq!(inherits.retries, 3);
    assert_eq!(inherits.cpus, 2);
    assert_eq!(inherits.memory_bytes, 1 << 30);
    assert_eq!(inherits.gpus, 1);
    assert_eq!(inherits.env, map(&[("A", "default"), ("B", "default")]));
    assert_eq!(inherits.labels, map(&[("arch", "x86_64"), ("zone", "a")]));
    assert_eq!(inherits.workdir.as_deref(), Some("/srv/default"));
}

#[test]
fn deps_become_indices_in_the_order_written() {
    let spec = parse_ok(
        r#"
name = "w"
[[task]]
id = "late"
run = "x"
deps = ["b", "a"]
[[task]]
id = "a"
run = "x"
[[task]]
id = "b"
run = "x"
"#,
    );
    assert_eq!(spec.tasks[0].deps, [2, 1]);
    assert_eq!(spec.topological_order(), [1, 2, 0]);
}

#[test]
fn the_json_form_gives_the_same_spec_as_the_toml_form() {
    let json = r#"
  {
"name": "nightly-etl",
"on_failure": "skip-dependents",
"defaults": { "timeout": "10m", "retries": 2, "cpus": 1, "memory": "256MiB",
              "env": { "RUST_LOG": "info" } },
"task": [
  { "id": "prepare", "run": "mkdir -p /tmp/etl && echo ready" },
  { "id": "shard", "array": 100, "deps": ["prepare"],
    "cmd": ["python3", "process.py", "--all"] },
  { "id": "merge", "deps": ["shard"], "run": "cat /tmp/etl/*.out > /tmp/etl/result",
    "gpus": 0, "labels": { "arch": "x86_64" } }
]
  }"#;
    let from_toml = parse_ok(README_EXAMPLE);
    let limits = WaveLimits::default();
    let from_json = parse_wave(json.as_bytes(), Format::Json, &limits).expect("valid JSON");
    assert_eq!(from_json, from_toml);
    assert_eq!(
        parse_ok(json),
        from_toml,
        "Auto detects JSON by its leading `{{`"
    );
    let err =
        parse_wave(README_EXAMPLE.as_bytes(), Format::Json, &limits).expect_err("TOML is not JSON");
    assert_eq!(err.field, WaveError::FILE);
    assert!(
        err.message.starts_with("JSON syntax error at line "),
        "{err}"
    );
    let err = parse_wave(json.as_bytes(), Format::Toml, &limits).expect_err("JSON is not TOML");
    assert!(
        err.message.starts_with("TOML syntax error at line "),
        "{err}"
    );
    let err = parse_wave(b"[1, 2]", Format::Json, &limits).expect_err("not an object");
    assert_eq!((err.task, err.field.as_str()), (None, WaveError::FILE));
    assert!(
        err.message.starts_with("must be a table"),
        "{}",
        err.message
    );
}

#[test]
fn a_spec_survives_a_serde_round_trip() {
    let spec = parse_ok(README_EXAMPLE);
    let encoded = serde_json::to_string(&spec).expect("serializable");
    assert!(
        encoded.contains("\"on_failure\":\"skip-dependents\""),
        "{encoded}"
    );
    let decoded: WaveSpec = serde_json::from_str(&encoded).expect("decodable");
    assert_eq!(decoded, spec);
    assert_eq!(decoded.validate(&WaveLimits::default()), Ok(()));

    // A spec encoded before tasks had a `workdir` decodes with none.
    let without_workdir = encoded.replace(",\"workdir\":null", "");
    assert_ne!(without_workdir, encoded, "{encoded}");
    let decoded: WaveSpec = serde_json::from_str(&without_workdir).expect("decodable");
    assert_eq!(decoded, spec);
}

/// (what, input, expected task, expected field, text the message must contain)
type BadCase = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    &'static str,
    &'static str,
);

fn task_file(fields: &str) -> Vec<u8> {
    format!("name = \"w\"\n[[task]]\nid = \"t\"\n{fields}\n").into_bytes()
}

fn bad_cases() -> Vec<BadCase> {
    let t = Some("t");
    vec![
        (
            "cycle",
            b"name = \"w\"\n[[task]]\nid = \"x\"\nrun = \"1\"\n\
              [[task]]\nid = \"a\"\nrun = \"1\"\ndeps = [\"b\"]\n\
              [[task]]\nid = \"b\"\nrun = \"1\"\ndeps = [\"c\", \"x\"]\n\
              [[task]]\nid = \"c\"\nrun = \"1\"\ndeps = [\"a\"]\n"
                .to_vec(),
            Some("a"),
            "deps",
            "dependency cycle: a -> b -> c -> a",
        ),
        (
            "cycle found from outside it",
            b"name = \"w\"\n[[task]]\nid = \"in\"\nrun = \"1\"\ndeps = [\"q\"]\n\
              [[task]]\nid = \"p\"\nrun = \"1\"\ndeps = [\"q\"]\n\
              [[task]]\nid = \"q\"\nrun = \"1\"\ndeps = [\"p\"]\n"
                .to_vec(),
            Some("p"),
            "deps",
            "p -> q -> p",
        ),
        (
            "self-dependency",
            task_file("run = \"1\"\ndeps = [\"t\"]"),
            t,
            "deps",
            "itself",
        ),
        (
            "unknown dependency",
            task_file("run = \"1\"\ndeps = [\"nope\"]"),
            t,
            "deps",
            "unknown task `nope`",
        ),
        (
            "dependency listed twice",
            b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n\
              [[task]]\nid = \"b\"\nrun = \"1\"\ndeps = [\"a\", \"a\"]\n"
                .to_vec(),
            Some("b"),
            "deps",
            "listed twice",
        ),
        (
            "duplicate id",
            b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n\
              [[task]]\nid = \"a\"\nrun = \"2\"\n"
                .to_vec(),
            Some("a"),
            "id",
            "task #1 already uses it",
        ),
        (
            "run and cmd",
            task_file("run = \"1\"\ncmd = [\"1\"]"),
            t,
            "run",
            "not both",
        ),
        (
            "neither run nor cmd",
            task_file("retries = 1"),
            t,
            "run",
            "needs `run`",
        ),
        (
            "empty run",
            task_file("run = \"\""),
            t,
            "run",
            "must not be empty",
        ),
        (
            "whitespace run",
            task_file("run = \" \\n\\t \""),
            t,
            "run",
            "must not be empty",
        ),
        (
            "empty cmd",
            task_file("cmd = []"),
            t,
            "cmd",
            "at least the program",
        ),
        (
            "empty program",
            task_file("cmd = [\" \", \"x\"]"),
            t,
            "cmd",
            "program",
        ),
        (
            "array 0",
            task_file("run = \"1\"\narray = 0"),
            t,
            "array",
            "must be at least 1",
        ),
        (
            "array above the cap",
            task_file("run = \"1\"\narray = 100001"),
            t,
            "array",
            "above the limit of 100000",
        ),
        (
            "negative array",
            task_file("run = \"1\"\narray = -1"),
            t,
            "array",
            "integer",
        ),
        (
            "bad duration",
            task_file("run = \"1\"\ntimeout = \"10x\""),
            t,
            "timeout",
            "not a duration",
        ),
        (
            "negative timeout",
            task_file("run = \"1\"\ntimeout = -5"),
            t,
            "timeout",
            "non-negative",
        ),
        (
            "timeout above the cap",
            task_file("run = \"1\"\ntimeout = \"400d\""),
            t,
            "timeout",
            "above the limit",
        ),
        (
            "bad memory",
            task_file("run = \"1\"\nmemory = \"12 parsecs\""),
            t,
            "memory",
            "not a memory size",
        ),
        (
            "memory above 1 PiB",
            task_file("run = \"1\"\nmemory = \"2PiB\""),
            t,
            "memory",
            "1 PiB",
        ),
        (
            "retries above 100",
            task_file("run = \"1\"\nretries = 101"),
            t,
            "retries",
            "100",
        ),
        (
            "cpus 0",
            task_file("run = \"1\"\ncpus = 0"),
            t,
            "cpus",
            "at least 1",
        ),
        (
            "cpus above 1024",
            task_file("run = \"1\"\ncpus = 1025"),
            t,
            "cpus",
            "1024",
        ),
        (
            "gpus above 1024",
            task_file("run = \"1\"\ngpus = 5000"),
            t,
            "gpus",
            "1024",
        ),
        (
            "wrong type",
            task_file("run = \"1\"\nretries = \"x\""),
            t,
            "retries",
            "invalid type: string \"x\"",
        ),
        (
            "wrong type of env value",
            task_file("run = \"1\"\nenv = { A = 5 }"),
            t,
            "env",
            "`A` must be a string",
        ),
        (
            "invalid env name",
            task_file("run = \"1\"\nenv = { \"1BAD\" = \"x\" }"),
            t,
            "env",
            "not a valid environment variable name",
        ),
        (
            "env name with a dash",
            task_file("run = \"1\"\nenv = { \"A-B\" = \"x\" }"),
            t,
            "env",
            "not a valid environment variable name",
        ),
        (
            "reserved env name",
            task_file("run = \"1\"\nenv = { VENOM_ATTEMPT = \"9\" }"),
            t,
            "env",
            "set by Venom",
        ),
        (
            "reserved VENOM_WORKDIR",
            task_file("run = \"1\"\nenv = { VENOM_WORKDIR = \"/tmp\" }"),
            t,
            "env",
            "set by Venom",
        ),
        (
            "relative workdir",
            task_file("run = \"1\"\nworkdir = \"data/in\""),
            t,
            "workdir",
            "must be an absolute path",
        ),
        (
            "empty workdir",
            task_file("run = \"1\"\nworkdir = \"\""),
            t,
            "workdir",
            "must not be empty",
        ),
        (
            "workdir that is not a string",
            task_file("run = \"1\"\nworkdir = 7"),
            t,
            "workdir",
            "invalid type",
        ),
        (
            "workdir longer than PATH_MAX",
            task_file(&format!("run = \"1\"\nworkdir = \"/{}\"", "d".repeat(4095))),
            t,
            "workdir",
            "above the limit of 4095",
        ),
        (
            "relative workdir in defaults",
            b"name = \"w\"\n[defaults]\nworkdir = \"rel\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n"
                .to_vec(),
            None,
            "defaults.workdir",
            "must be an absolute path",
        ),
        (
            "label with a comma",
            task_file("run = \"1\"\nlabels = { arch = \"a,b\" }"),
            t,
            "labels",
            "must not contain",
        ),
        (
            "unknown task field",
            task_file("run = \"1\"\ndepends = [\"a\"]"),
            t,
            "depends",
            "unknown field",
        ),
        (
            "unknown top-level field",
            b"name = \"w\"\npriority = 1\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            "priority",
            "unknown field",
        ),
        (
            "unknown defaults field",
            b"name = \"w\"\n[defaults]\ncpu = 2\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            "defaults.cpu",
            "unknown field",
        ),
        (
            "bad default duration",
            b"name = \"w\"\n[defaults]\ntimeout = \"soon\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n"
                .to_vec(),
            None,
            "defaults.timeout",
            "not a duration",
        ),
        (
            "bad on_failure",
            b"name = \"w\"\non_failure = \"ignore\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            "on_failure",
            "\"ignore\"",
        ),
        (
            "missing name",
            b"[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            "name",
            "is required",
        ),
        (
            "blank name",
            b"name = \"  \"\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            "name",
            "must not be empty",
        ),
        (
            "name too long",
            format!(
                "name = \"{}\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n",
                "n".repeat(129)
            )
            .into_bytes(),
            None,
            "name",
            "129 characters",
        ),
        (
            "missing id",
            b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n[[task]]\nrun = \"1\"\n".to_vec(),
            Some("#2"),
            "id",
            "is required",
        ),
        (
            "bad id",
            b"name = \"w\"\n[[task]]\nid = \"a b\"\nrun = \"1\"\n".to_vec(),
            Some("#1"),
            "id",
            "may only contain",
        ),
        (
            "id too long",
            format!(
                "name = \"w\"\n[[task]]\nid = \"{}\"\nrun = \"1\"\n",
                "i".repeat(129)
            )
            .into_bytes(),
            Some("#1"),
            "id",
            "129 characters",
        ),
        (
            "no tasks",
            b"name = \"w\"\n".to_vec(),
            None,
            "task",
            "at least one",
        ),
        (
            "task is not an array",
            b"name = \"w\"\ntask = 5\n".to_vec(),
            None,
            "task",
            "array of tables",
        ),
        (
            "total micro-tasks above the cap",
            b"name = \"w\"\n[[task]]\nid = \"l\"\narray = 60000\nrun = \"1\"\n\
              [[task]]\nid = \"r\"\narray = 60000\nrun = \"1\"\n"
                .to_vec(),
            None,
            "task",
            "120000 micro-tasks in total, above the limit of 100000",
        ),
        (
            "non-UTF-8 bytes",
            b"name = \"caf\xe9\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
            None,
            WaveError::FILE,
            "not valid UTF-8 (line 1, column 12)",
        ),
        ("empty file", Vec::new(), None, WaveError::FILE, "is empty"),
        (
            "whitespace-only file",
            b" \n\t\n".to_vec(),
            None,
            WaveError::FILE,
            "is empty",
        ),
        (
            "10 MB file",
            vec![b'#'; 10_000_000],
            None,
            WaveError::FILE,
            "10000000 bytes, above the limit of 1048576 bytes",
        ),
        (
            "TOML syntax error",
            b"name = \"w\"\n\n[[task]]\nid = \"a\nrun = \"1\"\n".to_vec(),
            None,
            WaveError::FILE,
            "TOML syntax error at line 4, column 8: invalid basic string",
        ),
        (
            "JSON syntax error",
            b"{\n  \"name\": \"w\",\n  \"task\": [ }\n".to_vec(),
            None,
            WaveError::FILE,
            "JSON syntax error at line 3",
        ),
        (
            "JSON unknown task field",
            br#"{"name": "w", "task": [{"id": "j", "run": "1", "arrays": 2}]}"#.to_vec(),
            Some("j"),
            "arrays",
            "unknown field",
        ),
    ]
}

#[test]
fn malformed_waves_name_the_task_and_the_field() {
    let cases = bad_cases();
    assert!(cases.len() >= 18);
    for (what, input, task, field, contains) in cases {
        let err = match parse_wave(&input, Format::Auto, &WaveLimits::default()) {
            Ok(spec) => panic!("{what}: accepted as {spec:?}"),
            Err(err) => err,
        };
        assert_eq!(err.task.as_deref(), task, "{what}: task of `{err}`");
        assert_eq!(err.field, field, "{what}: field of `{err}`");
        assert!(
            err.message.contains(contains),
            "{what}: `{err}` should contain {contains:?}"
        );
        assert!(
            !err.to_string().contains('\n'),
            "{what}: one line, not `{err}`"
        );
    }
}

#[test]
fn the_bad_wave_fixtures_fail_as_expected_tsv_says() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bad-waves");
    let table = std::fs::read_to_string(dir.join("expected.tsv")).expect("expected.tsv");
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("file\ttask\tfield"));
    let mut listed = Vec::new();
    for line in lines {
        let columns: Vec<&str> = line.split('\t').collect();
        let [file, task, field] = columns[..] else {
            panic!("malformed row {line:?}")
        };
        let bytes = std::fs::read(dir.join(file)).expect(file);
        let err = match parse_wave(&bytes, Format::Auto, &WaveLimits::default()) {
            Ok(_) => panic!("{file} was accepted"),
            Err(err) => err,
        };
        let expected_task = (task != "-").then_some(task);
        assert_eq!(err.task.as_deref(), expected_task, "{file}: `{err}`");
        assert_eq!(err.field, field, "{file}: `{err}`");
        listed.push(file.to_owned());
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/bad-waves")
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name != "README.md" && name != "expected.tsv")
        .collect();
    on_disk.sort();
    listed.sort();
    assert_eq!(on_disk, listed, "every fixture has exactly one row");
    assert!(listed.len() >= 18);
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
    for file in &listed {
        assert!(readme.contains(&format!("`{file}`")), "README lists {file}");
    }
}

#[test]
fn every_example_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n_examples = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("readable example");
        if let Err(e) = parse_wave(&bytes, Format::Toml, &WaveLimits::default()) {
            panic!("{}: {e}", path.display());
        }
        n_examples += 1;
    }
    assert!(n_examples >= 4, "found {n_examples} examples");
    let pipeline = std::fs::read(dir.join("pipeline.toml")).expect("pipeline.toml");
    let pipeline = parse_wave(&pipeline, Format::Toml, &WaveLimits::default()).expect("valid");
    assert_eq!(pipeline.n_micro_tasks(), 22);
    assert_eq!(pipeline.tasks[1].array, Some(20));
}

#[test]
fn the_size_limit_is_checked_before_parsing() {
    let limits = WaveLimits {
        max_spec_bytes: 64,
        ..WaveLimits::default()
    };
    // Not even UTF-8, but too large first.
    let err = parse_wave(&[0xff; 65], Format::Auto, &limits).expect_err("too large");
    assert_eq!(err.field, WaveError::FILE);
    assert!(err.message.contains("65 bytes"), "{err}");
    let exactly = format!(
        "name = \"w\"\n[[task]]\nid = \"t\"\nrun = \"{}\"\n",
        "x".repeat(26)
    );
    assert_eq!(exactly.len(), 64);
    assert!(parse_wave(exactly.as_bytes(), Format::Auto, &limits).is_ok());
}

#[test]
fn task_count_and_array_limits_are_configurable() {
    let limits = WaveLimits {
        max_spec_bytes: 1 << 20,
        max_micro_tasks: 10,
        max_array: 8,
        max_tasks: 2,
    };
    let three = "name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n[[task]]\nid = \"b\"\n\
                 run = \"1\"\n[[task]]\nid = \"c\"\nrun = \"1\"\n";
    let err = parse_wave(three.as_bytes(), Format::Toml, &limits).expect_err("3 > 2 tasks");
    assert_eq!((err.task, err.field.as_str()), (None, "task"));
    assert!(
        err.message.contains("above the limit of 2"),
        "{}",
        err.message
    );
    let err =
        parse_wave(&task_file("run = \"1\"\narray = 9"), Format::Toml, &limits).expect_err("9 > 8");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t"), "array")
    );
    let two = "name = \"w\"\n[[task]]\nid = \"a\"\narray = 6\nrun = \"1\"\n[[task]]\nid = \"b\"\n\
               array = 5\nrun = \"1\"\n";
    let err = parse_wave(two.as_bytes(), Format::Toml, &limits).expect_err("11 > 10");
    assert_eq!((err.task, err.field.as_str()), (None, "task"));
    assert!(
        err.message.contains("largest: `a` with 6"),
        "{}",
        err.message
    );
}

#[test]
fn errors_display_the_task_and_the_field() {
    let err = parse(&String::from_utf8(task_file("run = \"1\"\narray = 0")).expect("utf8"))
        .expect_err("array 0");
    assert_eq!(
        err.to_string(),
        "task `t`, field `array`: must be at least 1"
    );
    let err = parse("[[task]]\nid = \"t\"\nrun = \"1\"\n").expect_err("no name");
    assert_eq!(err.to_string(), "field `name`: is required");
    let err = parse("").expect_err("empty");
    assert_eq!(err.to_string(), "wave file: is empty");
    let boxed: Box<dyn std::error::Error> = Box::new(err);
    assert!(boxed.to_string().contains("empty"));
}

#[test]
fn durations_parse() {
    for (text, expected_ms) in [
        ("250ms", 250),
        ("30s", 30_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("2d", 172_800_000),
        ("1m30s500ms", 90_500),
        ("1.5h", 5_400_000),
        ("0.25s", 250),
        (" 45 ", 45_000),
        ("90", 90_000),
        ("0", 0),
        ("0s", 0),
        ("none", 0),
    ] {
        assert_eq!(parse_duration_ms(text), Ok(expected_ms), "{text:?}");
    }
    for text in [
        "",
        " ",
        "10x",
        "m",
        "10 m",
        "1h 30m",
        "-5s",
        "1..5s",
        ".",
        "s10",
        "10M",
        "1e3s",
        "99999999999999999999s",
    ] {
        assert!(
            parse_duration_ms(text).is_err(),
            "{text:?} should be rejected"
        );
    }
}

#[test]
fn memory_sizes_parse() {
    for (text, expected_bytes) in [
        ("0", 0),
        ("1048576", 1 << 20),
        ("100KiB", 100 << 10),
        ("256MiB", 256 << 20),
        ("1GiB", 1 << 30),
        ("2TiB", 2 << 40),
        ("1PiB", 1 << 50),
        ("512MB", 512_000_000),
        ("1kb", 1_000),
        ("3GB", 3_000_000_000),
        ("1.5GiB", 3 << 29),
        ("1 GiB", 1 << 30),
        ("7B", 7),
        ("64mib", 64 << 20),
    ] {
        assert_eq!(parse_memory_bytes(text), Ok(expected_bytes), "{text:?}");
    }
    for text in [
        "",
        "lots",
        "GiB",
        "1 2GiB",
        "1  GiB",
        "-1GiB",
        "1XB",
        "2PiB",
        "1.0.0MiB",
        "99999999999999999999",
    ] {
        assert!(
            parse_memory_bytes(text).is_err(),
            "{text:?} should be rejected"
        );
    }
}

fn chain(n_tasks: usize) -> WaveSpec {
    let task = |index: usize| TaskSpec {
        id: format!("t{index}"),
        command: CommandSpec::Shell("true".into()),
        array: None,
        deps: if index == 0 { vec![] } else { vec![index - 1] },
        timeout_ms: 0,
        retries: 0,
        cpus: 1,
        memory_bytes: 0,
        gpus: 0,
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        workdir: None,
    };
    WaveSpec {
        name: "chain".into(),
        on_failure: OnFailure::SkipDependents,
        tasks: (0..n_tasks).map(task).collect(),
    }
}

#[test]
fn validate_rechecks_a_built_spec() {
    let limits = WaveLimits::default();
    let mut spec = chain(3);
    assert_eq!(spec.validate(&limits), Ok(()));

    spec.tasks[0].deps = vec![2];
    let err = spec.validate(&limits).expect_err("cycle");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t0"), "deps")
    );
    assert!(err.message.contains("t0 -> t2 -> t1 -> t0"), "{err}");

    let mut spec = chain(3);
    spec.tasks[1].deps = vec![7];
    let err = spec.validate(&limits).expect_err("out of range");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t1"), "deps")
    );

    let mut spec = chain(3);
    spec.tasks[1].deps = vec![1];
    let err = spec.validate(&limits).expect_err("self");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t1"), "deps")
    );

    let mut spec = chain(3);
    spec.tasks[2].id = "t0".into();
    let err = spec.validate(&limits).expect_err("duplicate");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t0"), "id")
    );

    let mut spec = chain(3);
    spec.tasks[2].command = CommandSpec::Argv(vec![]);
    let err = spec.validate(&limits).expect_err("empty argv");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t2"), "cmd")
    );

    let mut spec = chain(3);
    spec.tasks[2].array = Some(0);
    let err = spec.validate(&limits).expect_err("array 0");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t2"), "array")
    );

    let mut spec = chain(3);
    spec.tasks[1].cpus = 0;
    let err = spec.validate(&limits).expect_err("cpus 0");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t1"), "cpus")
    );

    let mut spec = chain(3);
    spec.tasks[1].workdir = Some("relative/dir".into());
    let err = spec.validate(&limits).expect_err("relative workdir");
    assert_eq!(
        (err.task.as_deref(), err.field.as_str()),
        (Some("t1"), "workdir")
    );
    spec.tasks[1].workdir = Some("/absolute/dir".into());
    assert_eq!(spec.validate(&limits), Ok(()));

    let mut spec = chain(3);
    spec.tasks.clear();
    let err = spec.validate(&limits).expect_err("no tasks");
    assert_eq!((err.task, err.field.as_str()), (None, "task"));
}

#[test]
fn a_long_chain_validates_and_orders_without_recursion() {
    let spec = chain(10_000);
    assert_eq!(spec.validate(&WaveLimits::default()), Ok(()));
    let order = spec.topological_order();
    assert_eq!(order, (0..10_000).collect::<Vec<_>>());
    let mut cyclic = chain(10_000);
    cyclic.tasks[0].deps = vec![9_999];
    let err = cyclic.validate(&WaveLimits::default()).expect_err("cycle");
    assert!(err
        .message
        .starts_with("dependency cycle: t0 -> t9999 -> t9998"));
    assert!(cyclic.topological_order().is_empty());
}

fn diamond() -> WaveSpec {
    parse_ok(
        r#"
name = "diamond"
[[task]]
id = "merge"
deps = ["left", "right"]
run = "1"
[[task]]
id = "left"
deps = ["top"]
array = 4
run = "1"
[[task]]
id = "right"
deps = ["top"]
run = "1"
[[task]]
id = "top"
run = "1"
"#,
    )
}

#[test]
fn topological_order_puts_deps_first_then_file_order() {
    let spec = diamond();
    assert_eq!(spec.topological_order(), [3, 1, 2, 0]);
}

#[test]
fn work_and_span_follow_the_heaviest_path() {
    let spec = diamond();
    // merge, left (4 micro-tasks of up to 30 ms), right, top.
    let work_ms = [5, 100, 50, 10];
    let longest_ms = [5, 30, 50, 10];
    // top 10 -> right 50 -> merge 5 = 65 beats top 10 -> left 30 -> merge 5 = 45.
    assert_eq!(spec.work_and_span(&work_ms, &longest_ms), (165, 65));
    let longest_ms = [5, 80, 50, 10];
    assert_eq!(spec.work_and_span(&work_ms, &longest_ms), (165, 95));
    assert_eq!(
        spec.work_and_span(&[], &[]),
        (0, 0),
        "missing entries count as 0"
    );
    assert_eq!(
        chain(3).work_and_span(&[u64::MAX, 1, 1], &[u64::MAX, 1, 1]),
        (u64::MAX, u64::MAX),
        "sums saturate"
    );
}

#[test]
fn dot_has_a_node_per_task_and_an_edge_per_dependency() {
    let mut spec = diamond();
    spec.name = "say \"hi\"".into();
    let dot = spec.to_dot();
    assert!(dot.starts_with("digraph \"say \\\"hi\\\"\" {\n"), "{dot}");
    for line in [
        "  \"left\" [label=\"left [4]\"];\n",
        "  \"right\" [label=\"right\"];\n",
        "  \"top\" -> \"left\";\n",
        "  \"top\" -> \"right\";\n",
        "  \"left\" -> \"merge\";\n",
        "  \"right\" -> \"merge\";\n",
    ] {
        assert!(dot.contains(line), "missing {line:?} in\n{dot}");
    }
    assert_eq!(dot.matches(" -> ").count(), 4);
    assert_eq!(dot.matches("[label=").count(), 4);
    assert!(dot.ends_with("}\n"));
}
