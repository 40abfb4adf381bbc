//! Fuzzing of wave parsing: everything a client can put in a `SubmitWave` reaches
//! [`parse_wave`] on the leader before anything else looks at it, so it must answer every
//! input with `Ok` or a named `Err`, never a panic, and an `Ok` must be a wave the rest of the
//! system can rely on.
//!
//! Five input families, from blind to structure-aware: arbitrary bytes and strings in every
//! [`Format`] (there is no YAML: `Format` knows TOML, JSON and auto-detection); a soup of
//! TOML/JSON tokens that gets past the tokenizer more often; byte-level mutations of a valid
//! wave; deep nesting in every shape TOML and JSON allow (stack depth is the classic parser
//! crash); and generated waves — random ids, dependencies on random ids (missing ones,
//! itself, cycles), sizes from 0 to past `u32::MAX`, durations and sizes as random text,
//! unknown and nested fields — rendered both as TOML and as JSON, which must then be judged
//! identically. Tiny [`WaveLimits`] check that the limits hold against all of it.
//!
//! Every accepted wave is checked against what the crate promises of a valid one (see
//! [`check_accepted`]) and must survive a round trip through a wave file written back from
//! it. The case count is `VENOM_FUZZ_CASES` (default [`DEFAULT_CASES`], about 6 s for the
//! whole file in a debug build); failures are never persisted into the tree.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use venom_core::wave::{
    parse_wave, CommandSpec, Format, WaveError, WaveLimits, WaveSpec, MAX_CPUS, MAX_GPUS,
    MAX_ID_CHARS, MAX_MEMORY_BYTES, MAX_NAME_CHARS, MAX_RETRIES, MAX_TIMEOUT_MS,
};

/// Cases per property when `VENOM_FUZZ_CASES` is not set: this file then takes about 6 s in
/// a debug build on two cores.
const DEFAULT_CASES: u32 = 1_024;

fn config() -> ProptestConfig {
    let cases = std::env::var("VENOM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Never write `proptest-regressions/` into the tree: a crash found here becomes a
        // plain #[test] below instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Toml), Just(Format::Json), Just(Format::Auto)]
}

/// Parses `bytes` and checks the answer: an accepted wave is valid, a refusal says why.
fn check_parse(bytes: &[u8], format: Format, limits: &WaveLimits) -> Result<(), TestCaseError> {
    match parse_wave(bytes, format, limits) {
        Ok(spec) => check_accepted(&spec, bytes, limits),
        Err(error) => check_refusal(&error, bytes, limits),
    }
}

fn check_refusal(
    error: &WaveError,
    bytes: &[u8],
    limits: &WaveLimits,
) -> Result<(), TestCaseError> {
    prop_assert!(!error.message.trim().is_empty(), "empty message: {error:?}");
    prop_assert!(!error.field.is_empty(), "no field: {error:?}");
    prop_assert!(!error.to_string().is_empty());
    if bytes.len() > limits.max_spec_bytes {
        // The size is checked before anything else, whatever the input.
        prop_assert_eq!(&error.field, WaveError::FILE);
        prop_assert!(error.message.contains("above the limit"), "{error}");
    }
    Ok(())
}

/// What every accepted wave must be: within every limit, ids unique and well-formed,
/// dependencies in range and acyclic (the topological order covers every task, each after
/// its dependencies), `validate` agrees, parsing is deterministic, the DAG helpers work on
/// it, and a wave file written back from it parses to the same wave.
fn check_accepted(spec: &WaveSpec, bytes: &[u8], limits: &WaveLimits) -> Result<(), TestCaseError> {
    prop_assert!(bytes.len() <= limits.max_spec_bytes);
    if let Err(e) = spec.validate(limits) {
        return Err(TestCaseError::fail(format!(
            "accepted wave fails validate: {e}"
        )));
    }
    prop_assert!(!spec.name.trim().is_empty());
    prop_assert!(spec.name.chars().count() <= MAX_NAME_CHARS);
    prop_assert!(!spec.tasks.is_empty() && spec.tasks.len() <= limits.max_tasks);
    prop_assert!(spec.n_micro_tasks() <= limits.max_micro_tasks);
    let mut ids = BTreeSet::new();
    for (index, task) in spec.tasks.iter().enumerate() {
        prop_assert!(ids.insert(task.id.as_str()), "duplicate id {}", task.id);
        prop_assert!(!task.id.is_empty() && task.id.chars().count() <= MAX_ID_CHARS);
        if let Some(n) = task.array {
            prop_assert!(n >= 1 && n <= limits.max_array, "array {n}");
        }
        prop_assert!(task.timeout_ms <= MAX_TIMEOUT_MS);
        prop_assert!(task.retries <= MAX_RETRIES);
        prop_assert!(task.cpus >= 1 && task.cpus <= MAX_CPUS);
        prop_assert!(task.gpus <= MAX_GPUS);
        prop_assert!(task.memory_bytes <= MAX_MEMORY_BYTES);
        match &task.command {
            CommandSpec::Shell(script) => prop_assert!(!script.trim().is_empty()),
            CommandSpec::Argv(argv) => {
                prop_assert!(argv.first().is_some_and(|p| !p.trim().is_empty()))
            }
        }
        if let Some(workdir) = &task.workdir {
            prop_assert!(workdir.starts_with('/') && !workdir.contains('\0'));
            prop_assert!(workdir.len() < 4096, "workdir of {} bytes", workdir.len());
        }
        let distinct: BTreeSet<usize> = task.deps.iter().copied().collect();
        prop_assert_eq!(distinct.len(), task.deps.len(), "a dependency listed twice");
        for &dep in &task.deps {
            prop_assert!(dep < spec.tasks.len() && dep != index);
        }
    }
    let order = spec.topological_order();
    prop_assert_eq!(order.len(), spec.tasks.len(), "a cycle got through");
    let mut position = vec![usize::MAX; spec.tasks.len()];
    for (at, &task) in order.iter().enumerate() {
        prop_assert_eq!(
            position[task],
            usize::MAX,
            "task {} twice in the order",
            task
        );
        position[task] = at;
    }
    for (index, task) in spec.tasks.iter().enumerate() {
        for &dep in &task.deps {
            prop_assert!(position[dep] < position[index]);
        }
    }
    // Every micro-task runs 10 ms: the work is 10 ms a micro-task, the span at least one
    // task's 10 ms and at most the work; sums saturate instead of overflowing.
    let group_work_ms: Vec<u64> = spec
        .tasks
        .iter()
        .map(|t| 10 * u64::from(t.n_micro_tasks()))
        .collect();
    let (work_ms, span_ms) = spec.work_and_span(&group_work_ms, &vec![10; spec.tasks.len()]);
    prop_assert_eq!(work_ms, 10 * spec.n_micro_tasks());
    prop_assert!(
        span_ms >= 10 && span_ms <= work_ms,
        "span {span_ms}, work {work_ms}"
    );
    let huge = vec![u64::MAX; spec.tasks.len()];
    prop_assert_eq!(spec.work_and_span(&huge, &huge), (u64::MAX, u64::MAX));
    let dot = spec.to_dot();
    // One edge line per dependency (the first line, with the wave's name, is not one).
    let n_edges = dot
        .lines()
        .skip(1)
        .filter(|l| l.contains("\" -> \""))
        .count();
    let n_deps: usize = spec.tasks.iter().map(|t| t.deps.len()).sum();
    prop_assert_eq!(n_edges, n_deps);

    let again = parse_wave(bytes, Format::Auto, limits);
    let auto_agrees = match again {
        // Auto may pick the other syntax than the one the caller named; when it picks the
        // same, it must give the same wave.
        Ok(again) => again == *spec,
        Err(_) => true,
    };
    prop_assert!(auto_agrees, "Auto parsed the same text into another wave");
    let written = render_json(spec);
    let unbounded = WaveLimits {
        max_spec_bytes: usize::MAX,
        ..limits.clone()
    };
    match parse_wave(written.as_bytes(), Format::Json, &unbounded) {
        Ok(back) => prop_assert_eq!(&back, spec, "round trip through\n{}", written),
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "the wave written back is refused: {e}\n{written}"
            )))
        }
    }
    Ok(())
}

/// The JSON wave file that describes `spec` (defaults already merged into every task).
fn render_json(spec: &WaveSpec) -> String {
    let tasks: Vec<Value> = spec
        .tasks
        .iter()
        .map(|task| {
            let mut t = Map::new();
            t.insert("id".into(), json!(task.id));
            match &task.command {
                CommandSpec::Shell(script) => t.insert("run".into(), json!(script)),
                CommandSpec::Argv(argv) => t.insert("cmd".into(), json!(argv)),
            };
            if let Some(n) = task.array {
                t.insert("array".into(), json!(n));
            }
            let deps: Vec<&str> = task
                .deps
                .iter()
                .map(|&d| spec.tasks[d].id.as_str())
                .collect();
            t.insert("deps".into(), json!(deps));
            t.insert("timeout".into(), json!(format!("{}ms", task.timeout_ms)));
            t.insert("retries".into(), json!(task.retries));
            t.insert("cpus".into(), json!(task.cpus));
            t.insert("memory".into(), json!(task.memory_bytes));
            t.insert("gpus".into(), json!(task.gpus));
            t.insert("env".into(), json!(task.env));
            t.insert("labels".into(), json!(task.labels));
            if let Some(workdir) = &task.workdir {
                t.insert("workdir".into(), json!(workdir));
            }
            Value::Object(t)
        })
        .collect();
    json!({
        "name": spec.name,
        "on_failure": spec.on_failure.as_str(),
        "task": tasks,
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------
// Blind inputs.

/// Fragments of TOML and JSON wave files, glued together at random.
const TOKENS: &[&str] = &[
    "[[task]]\n",
    "[task]\n",
    "[defaults]\n",
    "[[defaults]]\n",
    "name = \"w\"\n",
    "name = ",
    "id = \"a\"\n",
    "id = \"b\"\n",
    "id = ",
    "run = \"true\"\n",
    "run = ",
    "cmd = [\"ls\"]\n",
    "deps = [\"a\"]\n",
    "deps = [\"b\", \"a\"]\n",
    "deps = ",
    "array = 3\n",
    "array = 0\n",
    "array = 4294967295\n",
    "array = 18446744073709551615\n",
    "array = -1\n",
    "array = ",
    "timeout = \"1h30m\"\n",
    "timeout = \"99999999999999999999d\"\n",
    "timeout = 1.5\n",
    "memory = \"1.5GiB\"\n",
    "memory = \"2PiB\"\n",
    "memory = ",
    "cpus = 0\n",
    "gpus = 2\n",
    "retries = 101\n",
    "env = { A = \"1\" }\n",
    "labels = { gpu = \"a100\" }\n",
    "on_failure = \"fail-wave\"\n",
    "a.b.c = 1\n",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "=",
    ",",
    ":",
    ".",
    "\n",
    " ",
    "#",
    "\\",
    "\\u0000",
    "\u{feff}",
    "\0",
    "\u{10ffff}",
    "ü",
    "{\"name\": \"w\", \"task\": [",
    "{\"id\": \"a\", \"run\": \"x\"}",
    "]}",
    "null",
    "true",
    "1979-05-27T07:32:00Z",
    "inf",
    "nan",
    "0x10",
    "1e400",
    "-0",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..60).prop_map(|tokens| tokens.concat())
}

/// A valid wave touching most fields; mutations of it get deep into the parser.
const SEED_WAVE: &str = r#"name = "seed"
on_failure = "skip-dependents"

[defaults]
timeout = "10m"
retries = 2
memory = "256MiB"
env = { MODE = "fuzz" }
labels = { zone = "a" }

[[task]]
id = "extract"
run = "echo extract"
array = 4

[[task]]
id = "transform"
cmd = ["sh", "-c", "echo $VENOM_TASK_INDEX"]
deps = ["extract"]
array = 2
cpus = 2
gpus = 1
timeout = 90

[[task]]
id = "load"
run = "echo load"
deps = ["transform", "extract"]
memory = 1048576
"#;

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Replace(usize, u8),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>();
    prop_oneof![
        (at.clone(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i.index(1 << 16), b)),
        (at.clone(), 1..40usize).prop_map(|(i, n)| Mutation::Delete(i.index(1 << 16), n)),
        (at.clone(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i.index(1 << 16), b)),
        at.clone()
            .prop_map(|i| Mutation::Truncate(i.index(1 << 16))),
        (at, 1..200usize).prop_map(|(i, n)| Mutation::Duplicate(i.index(1 << 16), n)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        let at = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Insert(i, b) => {
                let i = at(*i);
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(*i);
                bytes.drain(i..(i + n).min(len));
            }
            Mutation::Replace(i, b) if len > 0 => bytes[i % len] = *b,
            Mutation::Replace(..) => {}
            Mutation::Truncate(i) => bytes.truncate(at(*i)),
            Mutation::Duplicate(i, n) => {
                let i = at(*i);
                let chunk: Vec<u8> = bytes[i..(i + n).min(len)].to_vec();
                bytes.splice(i..i, chunk);
            }
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------
// Deep nesting.

#[derive(Debug, Clone, Copy)]
enum Nesting {
    /// `key = [[[…]]]`
    TomlArrays,
    /// `key = {a = {a = …}}`
    TomlInlineTables,
    /// `a.a.a.… = 1`
    TomlDottedKeys,
    /// `[a.a.a.…]`
    TomlTableHeader,
    /// `[[[…]]]` in JSON
    JsonArrays,
    /// `{"a": {"a": …}}`
    JsonObjects,
}

/// A wave whose `where_`-th field holds `depth` levels of nesting.
fn nested(kind: Nesting, depth: usize, where_: usize) -> String {
    let key = ["name", "deps", "env", "x", "array"][where_ % 5];
    let head = "name = \"deep\"\n";
    let task = "[[task]]\nid = \"t\"\nrun = \"true\"\n";
    match kind {
        Nesting::TomlArrays => {
            format!("{head}{task}{key} = {}1{}\n", "[".repeat(depth), "]".repeat(depth))
        }
        Nesting::TomlInlineTables => format!(
            "{head}{task}{key} = {}1{}\n",
            "{a = ".repeat(depth),
            "}".repeat(depth)
        ),
        Nesting::TomlDottedKeys => {
            format!("{head}{task}{key}{} = 1\n", ".a".repeat(depth))
        }
        Nesting::TomlTableHeader => {
            format!("{head}{task}[{key}{}]\nb = 1\n", ".a".repeat(depth))
        }
        Nesting::JsonArrays => format!(
            "{{\"name\": \"deep\", \"task\": [{{\"id\": \"t\", \"run\": \"true\", \"{key}\": {}1{}}}]}}",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        Nesting::JsonObjects => format!(
            "{{\"name\": \"deep\", \"task\": [{{\"id\": \"t\", \"run\": \"true\", \"{key}\": {}1{}}}]}}",
            "{\"a\": ".repeat(depth),
            "}".repeat(depth)
        ),
    }
}

fn nesting() -> impl Strategy<Value = Nesting> {
    prop_oneof![
        Just(Nesting::TomlArrays),
        Just(Nesting::TomlInlineTables),
        Just(Nesting::TomlDottedKeys),
        Just(Nesting::TomlTableHeader),
        Just(Nesting::JsonArrays),
        Just(Nesting::JsonObjects),
    ]
}

fn nesting_depth() -> impl Strategy<Value = usize> {
    prop_oneof![1..200usize, 200..5_000usize, 5_000..200_000usize]
}

// ---------------------------------------------------------------------------------------
// Generated waves, as a generic tree rendered both as TOML and as JSON.
//
// Half the waves are *clean*: every field well-formed, so that most are accepted and the
// checks on accepted waves get work, yet ids can still repeat, dependencies can still name a
// missing task, a later task (so cycles form) or the task itself, and `array = 100000` on two
// tasks still exceeds the micro-task limit. The other half are *hostile*: any field may hold a
// boundary value, a value of the wrong type, random text or an unknown nested table.

/// Integers around every boundary a wave field has, and values of the wrong type.
fn hostile_count() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (0i64..10).prop_map(|n| json!(n)),
        3 => prop::sample::select(&[
            100_i64, 101, 1_023, 1_024, 1_025, 99_999, 100_000, 100_001,
            4_294_967_295, 4_294_967_296, i64::MAX, -1, i64::MIN,
        ][..]).prop_map(|n| json!(n)),
        1 => Just(json!(u64::MAX)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => Just(json!(1.5)),
        1 => Just(json!("5")),
        1 => Just(json!(true)),
        1 => Just(json!([1])),
    ]
    .boxed()
}

/// A count: in `clean` range when clean, anything when hostile.
fn count(clean: bool, range: std::ops::Range<i64>) -> BoxedStrategy<Value> {
    if clean {
        range.prop_map(|n| json!(n)).boxed()
    } else {
        hostile_count()
    }
}

fn array_value(clean: bool) -> BoxedStrategy<Value> {
    if clean {
        prop_oneof![
            9 => (1i64..6).prop_map(|n| json!(n)),
            1 => Just(json!(WaveLimits::DEFAULT_MAX_ARRAY)),
        ]
        .boxed()
    } else {
        hostile_count()
    }
}

fn duration_value(clean: bool) -> BoxedStrategy<Value> {
    let valid = prop_oneof![
        4 => prop::sample::select(&[
            "30s", "10m", "1h30m", "250ms", "2d", "1.5h", "0", "none", "90", ".5s", "366d",
            "8784h",
        ][..]).prop_map(|s| json!(s)),
        1 => (0i64..100_000).prop_map(|n| json!(n)),
    ];
    if clean {
        return valid.boxed();
    }
    prop_oneof![
        2 => valid,
        4 => prop::sample::select(&[
            "367d", "8784h1ms", "", " ", "abc", "1x", "1.2.3s", ".", "s",
            "99999999999999999999999999999999999d", "18446744073709551615ms",
            "18446744073709551615", "1e3s", "-1s", "1h-1m", "1h 30m", "\u{663}s",
        ][..]).prop_map(|s| json!(s)),
        3 => "[0-9.]{0,30}(ms|s|m|h|d|x|)([0-9.]{0,5}(ms|s|m|h|d|))?".prop_map(|s| json!(s)),
        2 => hostile_count(),
        1 => any::<String>().prop_map(|s| json!(s)),
    ]
    .boxed()
}

fn memory_value(clean: bool) -> BoxedStrategy<Value> {
    let valid = prop_oneof![
        4 => prop::sample::select(&[
            "256MiB", "1GiB", "512MB", "1.5GiB", "1 GiB", "1PiB", "0", "1125899906842624", "kb",
        ][..]).prop_map(|s| json!(s)),
        1 => (0i64..1 << 40).prop_map(|n| json!(n)),
    ];
    if clean {
        return valid.boxed();
    }
    prop_oneof![
        2 => valid,
        4 => prop::sample::select(&[
            "1  GiB", "1.0000001PiB", "2PiB", "1125899906842625", "", "GiB", ".", "1e9",
            "99999999999999999999999999999999999999999", "18446744073709551615", "-1",
        ][..]).prop_map(|s| json!(s)),
        3 => "[0-9.]{0,30} ?(b|B|kb|KiB|mb|MiB|gb|GiB|tb|TiB|pb|PiB|eb|)".prop_map(|s| json!(s)),
        2 => hostile_count(),
        1 => any::<String>().prop_map(|s| json!(s)),
    ]
    .boxed()
}

fn text_value(clean: bool) -> BoxedStrategy<Value> {
    let valid = "[a-z][a-z ]{0,16}".prop_map(|s| json!(s));
    if clean {
        return valid.boxed();
    }
    prop_oneof![
        4 => valid,
        1 => Just(json!("")),
        1 => Just(json!("   ")),
        1 => Just(json!("nul\0byte")),
        1 => Just(json!("tab\there")),
        1 => Just(json!("z".repeat(MAX_NAME_CHARS + 1))),
        1 => Just(json!("z".repeat(MAX_NAME_CHARS))),
        2 => any::<String>().prop_map(|s| json!(s)),
        1 => hostile_count(),
    ]
    .boxed()
}

/// `env` (`labels` false) or `labels`.
fn string_map_value(clean: bool, labels: bool) -> BoxedStrategy<Value> {
    let valid_key = if labels {
        "[a-z][a-z0-9_./-]{0,8}"
    } else {
        "[A-Za-z_][A-Za-z0-9_]{0,8}"
    };
    let as_object = |m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect());
    if clean {
        return prop::collection::btree_map(
            valid_key,
            "[a-z0-9]{0,8}".prop_map(|s| json!(s)),
            0..4,
        )
        .prop_map(as_object)
        .boxed();
    }
    let key = prop_oneof![
        5 => valid_key.prop_map(String::from).boxed(),
        1 => Just("VENOM_TASK_ID".to_string()).boxed(),
        1 => Just("1BAD".to_string()).boxed(),
        1 => Just("a/b.c-d".to_string()).boxed(),
        1 => Just("has space".to_string()).boxed(),
        1 => Just(String::new()).boxed(),
        1 => any::<String>().boxed(),
    ];
    let value = prop_oneof![
        5 => "[a-z0-9]{0,8}".prop_map(|s| json!(s)).boxed(),
        1 => Just(json!("has space")).boxed(),
        1 => Just(json!("a=b,c")).boxed(),
        1 => Just(json!("nul\0")).boxed(),
        1 => hostile_count(),
        1 => Just(json!({ "nested": "table" })).boxed(),
    ];
    prop_oneof![
        8 => prop::collection::btree_map(key, value, 0..4).prop_map(as_object),
        1 => Just(json!("not a table")),
        1 => Just(json!(["a"])),
    ]
    .boxed()
}

fn workdir_value(clean: bool) -> BoxedStrategy<Value> {
    let valid = "/[a-z]{0,8}(/[a-z.]{1,8}){0,2}".prop_map(|s| json!(s));
    if clean {
        return valid.boxed();
    }
    prop_oneof![
        4 => valid.boxed(),
        1 => Just(json!("")).boxed(),
        1 => Just(json!("relative/dir")).boxed(),
        1 => Just(json!("/nul\0")).boxed(),
        1 => Just(json!(format!("/{}", "d".repeat(4094)))).boxed(),
        1 => Just(json!(format!("/{}", "d".repeat(4095)))).boxed(),
        1 => any::<String>().prop_map(|s| json!(s)).boxed(),
        1 => hostile_count(),
    ]
    .boxed()
}

/// The id of task `index` of `n_tasks`: mostly `t<index>`, sometimes a name another task
/// may have too, and when hostile, sometimes no valid id at all.
fn id_value(clean: bool, index: usize) -> BoxedStrategy<Value> {
    let positional = Just(json!(format!("t{index}")));
    let shared = prop::sample::select(&["t0", "t1", "a", "b"][..]).prop_map(|s| json!(s));
    if clean {
        return prop_oneof![15 => positional, 1 => shared].boxed();
    }
    prop_oneof![
        10 => positional.boxed(),
        2 => shared.boxed(),
        1 => Just(json!("")).boxed(),
        1 => Just(json!("bad id")).boxed(),
        1 => Just(json!("x".repeat(MAX_ID_CHARS + 1))).boxed(),
        1 => Just(json!("y".repeat(MAX_ID_CHARS))).boxed(),
        1 => "[a-z0-9_.-]{1,12}".prop_map(|s| json!(s)).boxed(),
        1 => any::<String>().prop_map(|s| json!(s)).boxed(),
        1 => any::<i64>().prop_map(|n| json!(n)).boxed(),
    ]
    .boxed()
}

/// Dependencies of task `index` of `n_tasks`: mostly on earlier tasks; sometimes on later
/// ones (cycles), itself, a task that does not exist, or the same task twice.
fn deps_value(clean: bool, index: usize, n_tasks: usize) -> BoxedStrategy<Value> {
    let earlier = if index == 0 {
        Just(Vec::new()).boxed()
    } else {
        prop::collection::btree_set(0..index, 0..index.min(3) + 1)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>())
            .boxed()
    };
    let name = |k: usize| json!(format!("t{k}"));
    let anywhere = prop::collection::vec(0..n_tasks + 2, 0..4)
        .prop_map(move |v| Value::Array(v.into_iter().map(name).collect()));
    let valid = earlier.prop_map(move |v| Value::Array(v.into_iter().map(name).collect()));
    if clean {
        return prop_oneof![12 => valid, 1 => anywhere].boxed();
    }
    prop_oneof![
        6 => valid.boxed(),
        3 => anywhere.boxed(),
        1 => text_value(false),
        1 => Just(json!({ "a": "b" })).boxed(),
        1 => Just(json!([1, 2])).boxed(),
    ]
    .boxed()
}

fn argv_value(clean: bool) -> BoxedStrategy<Value> {
    let valid = prop::collection::vec("[a-z][a-z-]{0,6}", 1..4).prop_map(|v| json!(v));
    if clean {
        return valid.boxed();
    }
    prop_oneof![
        5 => valid.boxed(),
        1 => Just(json!([])).boxed(),
        1 => Just(json!([" "])).boxed(),
        1 => Just(json!(["ls", "nul\0"])).boxed(),
        1 => Just(json!([1, 2])).boxed(),
        1 => text_value(false),
    ]
    .boxed()
}

/// A field present with probability `weight_present` in 10.
fn maybe(weight_present: u32, value: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    if weight_present >= 10 {
        return value.prop_map(Some).boxed();
    }
    prop::option::weighted(f64::from(weight_present) / 10.0, value).boxed()
}

fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value?)))
            .collect(),
    )
}

/// A field no wave knows (only when hostile), sometimes with nested tables under it.
fn unknown_field(clean: bool) -> BoxedStrategy<Option<(String, Value)>> {
    if clean {
        return Just(None).boxed();
    }
    let nested = json!({ "a": { "b": { "c": [1, 2, { "d": "e" }] } } });
    prop_oneof![
        6 => Just(None),
        1 => ("[a-z_]{1,10}", text_value(false)).prop_map(Some),
        1 => Just(Some(("extra".to_string(), nested))),
    ]
    .boxed()
}

fn with_unknown(mut table: Value, unknown: Option<(String, Value)>) -> Value {
    if let (Value::Object(map), Some((key, value))) = (&mut table, unknown) {
        map.insert(key, value);
    }
    table
}

fn task_value(clean: bool, index: usize, n_tasks: usize) -> BoxedStrategy<Value> {
    let command = if clean {
        prop_oneof![
            3 => text_value(true).prop_map(|run| (Some(run), None)),
            1 => argv_value(true).prop_map(|cmd| (None, Some(cmd))),
        ]
        .boxed()
    } else {
        prop_oneof![
            8 => text_value(false).prop_map(|run| (Some(run), None)),
            3 => argv_value(false).prop_map(|cmd| (None, Some(cmd))),
            1 => (text_value(false), argv_value(false)).prop_map(|(r, c)| (Some(r), Some(c))),
            1 => Just((None, None)),
        ]
        .boxed()
    };
    let identity = (
        maybe(if clean { 10 } else { 9 }, id_value(clean, index)),
        command,
        maybe(3, array_value(clean)),
        maybe(6, deps_value(clean, index, n_tasks)),
    );
    let resources = (
        maybe(2, duration_value(clean)),
        maybe(2, count(clean, 0..4)),
        maybe(2, count(clean, 1..5)),
        maybe(2, memory_value(clean)),
        maybe(1, count(clean, 0..3)),
        maybe(1, string_map_value(clean, false)),
        maybe(1, string_map_value(clean, true)),
        maybe(1, workdir_value(clean)),
    );
    (identity, resources, unknown_field(clean))
        .prop_map(
            |(
                (id, (run, cmd), array, deps),
                (timeout, retries, cpus, memory, gpus, env, labels, workdir),
                unknown,
            )| {
                let task = object(vec![
                    ("id", id),
                    ("run", run),
                    ("cmd", cmd),
                    ("array", array),
                    ("deps", deps),
                    ("timeout", timeout),
                    ("retries", retries),
                    ("cpus", cpus),
                    ("memory", memory),
                    ("gpus", gpus),
                    ("env", env),
                    ("labels", labels),
                    ("workdir", workdir),
                ]);
                with_unknown(task, unknown)
            },
        )
        .boxed()
}

fn defaults_value(clean: bool) -> BoxedStrategy<Value> {
    let fields = (
        maybe(4, duration_value(clean)),
        maybe(3, count(clean, 0..4)),
        maybe(3, count(clean, 1..5)),
        maybe(3, memory_value(clean)),
        maybe(2, count(clean, 0..3)),
        maybe(2, string_map_value(clean, false)),
        maybe(2, string_map_value(clean, true)),
        maybe(1, workdir_value(clean)),
    );
    let table = (fields, unknown_field(clean)).prop_map(
        |((timeout, retries, cpus, memory, gpus, env, labels, workdir), unknown)| {
            let defaults = object(vec![
                ("timeout", timeout),
                ("retries", retries),
                ("cpus", cpus),
                ("memory", memory),
                ("gpus", gpus),
                ("env", env),
                ("labels", labels),
                ("workdir", workdir),
            ]);
            with_unknown(defaults, unknown)
        },
    );
    if clean {
        return table.boxed();
    }
    prop_oneof![8 => table.boxed(), 1 => text_value(false)].boxed()
}

fn tasks_value(clean: bool) -> BoxedStrategy<Value> {
    let list = (1usize..10)
        .prop_flat_map(move |n_tasks| {
            (0..n_tasks)
                .map(|index| task_value(clean, index, n_tasks))
                .collect::<Vec<_>>()
        })
        .prop_map(Value::Array);
    if clean {
        return list.boxed();
    }
    prop_oneof![
        12 => list.boxed(),
        1 => Just(json!([])).boxed(),
        1 => text_value(false),
        1 => Just(json!(["not a table"])).boxed(),
    ]
    .boxed()
}

fn wave_of(clean: bool) -> BoxedStrategy<Value> {
    let on_failure = if clean {
        prop::sample::select(&["skip-dependents", "fail-wave"][..])
            .prop_map(|s| json!(s))
            .boxed()
    } else {
        prop_oneof![
            4 => Just(json!("skip-dependents")).boxed(),
            4 => Just(json!("fail-wave")).boxed(),
            1 => Just(json!("fail")).boxed(),
            1 => hostile_count(),
        ]
        .boxed()
    };
    (
        maybe(if clean { 10 } else { 9 }, text_value(clean)),
        maybe(4, on_failure),
        maybe(4, defaults_value(clean)),
        maybe(if clean { 10 } else { 9 }, tasks_value(clean)),
        unknown_field(clean),
    )
        .prop_map(|(name, on_failure, defaults, task, unknown)| {
            let wave = object(vec![
                ("name", name),
                ("on_failure", on_failure),
                ("defaults", defaults),
                ("task", task),
            ]);
            with_unknown(wave, unknown)
        })
        .boxed()
}

/// A generated wave: clean or hostile, half and half.
fn wave_value() -> impl Strategy<Value = Value> {
    prop_oneof![wave_of(true), wave_of(false)]
}

/// The same tree as TOML; `None` where TOML cannot say it (an integer above `i64::MAX`).
fn to_toml(value: &Value) -> Option<toml::Value> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().filter(|_| !n.is_u64())?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(items) => {
            toml::Value::Array(items.iter().map(to_toml).collect::<Option<_>>()?)
        }
        Value::Object(map) => toml::Value::Table(
            map.iter()
                .map(|(k, v)| Some((k.clone(), to_toml(v)?)))
                .collect::<Option<_>>()?,
        ),
    })
}

/// The wave as TOML text, `None` if TOML cannot express it.
fn toml_text(wave: &Value) -> Option<String> {
    toml::to_string(&to_toml(wave)?).ok()
}

fn small_limits() -> impl Strategy<Value = WaveLimits> {
    (0usize..400, 1u64..12, 1u32..6, 1usize..5).prop_map(
        |(max_spec_bytes, max_micro_tasks, max_array, max_tasks)| WaveLimits {
            max_spec_bytes,
            max_micro_tasks,
            max_array,
            max_tasks,
        },
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2_048), format in any_format()) {
        check_parse(&bytes, format, &WaveLimits::default())?;
    }

    #[test]
    fn arbitrary_text(text in any::<String>(), format in any_format()) {
        check_parse(text.as_bytes(), format, &WaveLimits::default())?;
    }

    #[test]
    fn token_soup_text(text in token_soup(), format in any_format()) {
        check_parse(text.as_bytes(), format, &WaveLimits::default())?;
    }

    #[test]
    fn mutated_valid_wave(mutations in prop::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(SEED_WAVE.as_bytes().to_vec(), &mutations);
        check_parse(&bytes, Format::Toml, &WaveLimits::default())?;
        check_parse(&bytes, Format::Auto, &WaveLimits::default())?;
    }

    #[test]
    fn deep_nesting(kind in nesting(), depth in nesting_depth(), where_ in 0usize..5) {
        let text = nested(kind, depth, where_);
        check_parse(text.as_bytes(), Format::Auto, &WaveLimits::default())?;
        let format = if text.starts_with('{') { Format::Json } else { Format::Toml };
        check_parse(text.as_bytes(), format, &WaveLimits::default())?;
    }

    /// A generated wave rendered as TOML and as JSON: each answer is checked, and both
    /// syntaxes of the same tree are judged the same way (same wave, or same error).
    #[test]
    fn generated_wave(wave in wave_value()) {
        let limits = WaveLimits::default();
        let json_text = wave.to_string();
        let from_json = parse_wave(json_text.as_bytes(), Format::Json, &limits);
        match &from_json {
            Ok(spec) => check_accepted(spec, json_text.as_bytes(), &limits)?,
            Err(error) => check_refusal(error, json_text.as_bytes(), &limits)?,
        }
        if let Some(toml_text) = toml_text(&wave) {
            let from_toml = parse_wave(toml_text.as_bytes(), Format::Toml, &limits);
            match &from_toml {
                Ok(spec) => check_accepted(spec, toml_text.as_bytes(), &limits)?,
                Err(error) => check_refusal(error, toml_text.as_bytes(), &limits)?,
            }
            // An empty table is an empty TOML file, which is refused as such.
            if !toml_text.trim().is_empty() {
                prop_assert_eq!(from_toml, from_json, "TOML and JSON disagree; TOML:\n{}", toml_text);
            }
        }
    }

    /// Generated waves against tiny limits: nothing accepted breaks one.
    #[test]
    fn tiny_limits(wave in wave_value(), limits in small_limits()) {
        let json_text = wave.to_string();
        check_parse(json_text.as_bytes(), Format::Json, &limits)?;
        if let Some(toml_text) = toml_text(&wave) {
            check_parse(toml_text.as_bytes(), Format::Toml, &limits)?;
        }
    }
}

/// At least some generated waves must be accepted, or `generated_wave` only ever tests
/// refusals. Fixed seed so that the figure is stable.
#[test]
fn generated_waves_are_often_valid() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(Default::default(), &[7; 32]),
    );
    let strategy = wave_value();
    let limits = WaveLimits::default();
    let mut n_ok = 0;
    let mut n_multi_task = 0;
    for _ in 0..200 {
        let wave = strategy.new_tree(&mut runner).expect("a value").current();
        if let Ok(spec) = parse_wave(wave.to_string().as_bytes(), Format::Json, &limits) {
            n_ok += 1;
            n_multi_task +=
                usize::from(spec.tasks.len() > 1 && spec.tasks.iter().any(|t| !t.deps.is_empty()));
        }
    }
    // Seen with this seed: 68 valid, 44 of them with dependencies.
    assert!(n_ok >= 40, "only {n_ok} of 200 generated waves are valid");
    assert!(
        n_multi_task >= 20,
        "only {n_multi_task} valid waves with dependencies"
    );
}

/// The size limit holds for every format, before the text is even looked at.
#[test]
fn oversized_input_is_refused_first() {
    let limits = WaveLimits {
        max_spec_bytes: 10,
        ..WaveLimits::default()
    };
    for format in [Format::Toml, Format::Json, Format::Auto] {
        let error = parse_wave(&[0xff; 11], format, &limits).expect_err("too large");
        assert_eq!(error.field, WaveError::FILE);
        assert!(error.message.contains("11 bytes"), "{error}");
    }
}

/// A sanity check of the checker itself: the seed wave is accepted and passes.
#[test]
fn seed_wave_passes_the_checks() {
    let limits = WaveLimits::default();
    let spec = parse_wave(SEED_WAVE.as_bytes(), Format::Toml, &limits).expect("valid");
    assert_eq!(spec.tasks.len(), 3);
    check_accepted(&spec, SEED_WAVE.as_bytes(), &limits).expect("passes");
    let env: BTreeMap<String, String> = BTreeMap::from([("MODE".into(), "fuzz".into())]);
    assert_eq!(spec.tasks[2].env, env);
}
