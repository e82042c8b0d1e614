//! The wire format against the bytes real Celery 5.7 wrote (tests/fixtures/celery): every
//! producer message parses or is rejected for its documented reason, the results we write
//! have the fixtures' shape (byte for byte where nothing varies), and our messages, unacked
//! entries and restored payloads are what kombu writes.

mod common;

use celery_autoscale::wire::keys::PrioritySteps;
use celery_autoscale::wire::kombu::{UnackedEntry, unacked_entry};
use celery_autoscale::wire::time::parse_iso8601;
use celery_autoscale::wire::{ExceptionInfo, NewTask, ResultMeta, TaskMessage, parse_message};
use common::{fixtures, read};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn producer(name: &str) -> Vec<u8> {
    read(fixtures().join("producer").join(name))
}

fn parsed(name: &str) -> TaskMessage {
    parse_message(&producer(name)).unwrap_or_else(|r| panic!("{name}: {r}"))
}

#[test]
fn every_producer_fixture_parses_or_is_rejected_for_its_reason() {
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures().join("producer")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name == "manifest.json" {
            continue;
        }
        seen += 1;
        let bytes = read(&path);
        let envelope: Value = serde_json::from_slice(&bytes).unwrap();
        match parse_message(&bytes) {
            Ok(m) => {
                if name.starts_with("p27_chord") {
                    // A chord header member: its group, its place in it, and the body.
                    assert_eq!(m.group.as_deref(), envelope["headers"]["group"].as_str(), "{name}");
                    assert_eq!(m.group_index, envelope["headers"]["group_index"].as_i64(), "{name}");
                    assert_eq!(m.embed.chord.as_ref().map(|b| b.task.as_str()), Some("tasks.tsum"), "{name}");
                }
                assert_eq!(m.delivery_tag, envelope["properties"]["delivery_tag"], "{name}");
                assert_eq!(m.raw.as_deref(), Some(&bytes[..]), "{name}: raw bytes kept for unacked");
                if m.protocol == 2 {
                    assert_eq!(m.task, envelope["headers"]["task"], "{name}");
                    assert_eq!(m.id, envelope["headers"]["id"], "{name}");
                }
            }
            Err(r) => panic!("{name} rejected: {r}"),
        }
    }
    assert_eq!(seen, 35, "all producer fixtures examined");
}

#[test]
fn headers_that_change_behaviour_are_read() {
    let utc = |s| parse_iso8601(s).unwrap();
    assert_eq!(parsed("p01_args.json").args, [json!(2), json!(3)]);
    assert_eq!(parsed("p02_kwargs.json").kwargs, *json!({"x": 2, "y": 3}).as_object().unwrap());
    let big = parsed("p03_args_kwargs_types.json");
    assert_eq!(big.kwargs["big"].to_string(), "1180591620717411303424", "2**70 survives");
    assert!(parsed("p04_countdown.json").eta.is_some());
    assert_eq!(parsed("p05_eta_aware.json").eta, Some(utc("2030-01-02T03:04:05.678901Z")));
    assert_eq!(parsed("p06_eta_naive.json").eta, Some(utc("2030-01-02T03:04:05Z")), "naive = UTC");
    assert_eq!(parsed("p07_eta_offset.json").eta, Some(utc("2030-01-01T21:34:05Z")));
    assert!(parsed("p08_expires_seconds.json").expires.is_some());
    assert_eq!(parsed("p09_expires_datetime.json").expires, Some(utc("2030-01-01T00:00:00Z")));
    assert_eq!(parsed("p11_priority5_default_steps.json").priority, 5);
    assert_eq!(parsed("p16_task_default_priority7.json").priority, 7);
    assert_eq!(parsed("p19_retries3.json").retries, 3);
    assert_eq!(parsed("p20_unicode.json").args, [json!("héllo wörld ☃ 日本語 🎉")]);
    let limits = parsed("p21_time_limits.json");
    assert_eq!(
        (limits.hard_time_limit.unwrap().to_string(), limits.soft_time_limit.unwrap().to_string()),
        ("30".into(), "20".into())
    );
    let float_limits = parsed("p22_time_limits_float.json");
    assert_eq!(float_limits.hard_time_limit.unwrap().as_f64(), Some(1.5));
    assert_eq!(float_limits.soft_time_limit.unwrap().as_f64(), Some(0.5));
    assert_eq!(parsed("p23_ignore_result_shadow.json").ignore_result, Some(true));
    assert_eq!(parsed("p31_default_call.json").ignore_result, Some(false));
    let link = parsed("p24_link_errback.json");
    assert_eq!(link.embed.callbacks[0].task, "tasks.mul");
    assert_eq!(link.embed.callbacks[0].args, [json!(10)]);
    assert_eq!(link.embed.errbacks[0].task, "tasks.errback");
    let chain = parsed("p25_chain.json");
    assert_eq!(chain.embed.chain.len(), 2);
    assert_eq!(chain.embed.chain.last().unwrap().args, [json!(3)], "chain is reversed: the next step is last");
    assert!(parsed("p26_group.0.json").group.is_some());
    assert_eq!(parsed("p29_compression_zlib.json").args, [json!(1), json!(1)]);
    let v1 = parsed("p30_protocol_v1.json");
    assert_eq!((v1.protocol, v1.task.as_str(), v1.args.clone()), (1, "tasks.add", vec![json!(2), json!(3)]));
    let retry = parsed("w01_worker_retry_republish.json");
    assert_eq!((retry.retries, retry.parent_id.as_deref()), (1, Some(retry.id.as_str())));
}

/// A result we write, with the fixture's own date, is byte-identical to what Python wrote.
fn date_of(fixture: &Value) -> chrono::DateTime<chrono::Utc> {
    parse_iso8601(fixture["date_done"].as_str().unwrap()).unwrap()
}

fn result_fixture(name: &str) -> (Vec<u8>, Value) {
    let bytes = read(fixtures().join("results").join(name));
    let v = serde_json::from_slice(&bytes).unwrap();
    (bytes, v)
}

#[test]
fn results_match_python_byte_for_byte_where_nothing_varies() {
    let (bytes, v) = result_fixture("r01_success_int.json");
    let ours = ResultMeta::success(v["task_id"].as_str().unwrap(), json!(5), date_of(&v)).to_json();
    assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(bytes).unwrap());

    let (bytes, v) = result_fixture("r03_success_unicode.json");
    let ours = ResultMeta::success(v["task_id"].as_str().unwrap(), v["result"].clone(), date_of(&v)).to_json();
    assert_eq!(ours, bytes, "ensure_ascii escapes, surrogate pairs");

    let (bytes, v) = result_fixture("r30_revoked_expired.json");
    let ours =
        ResultMeta::revoked(v["task_id"].as_str().unwrap(), &ExceptionInfo::revoked_expired(), date_of(&v)).to_json();
    assert_eq!(ours, bytes);

    let (bytes, v) = result_fixture("r31_failure_time_limit.json");
    let exc = ExceptionInfo::time_limit_exceeded(&serde_json::Number::from(1));
    let ours = ResultMeta::failure(v["task_id"].as_str().unwrap(), "tasks.slow", &exc, date_of(&v)).to_json();
    assert_eq!(ours, bytes);

    let (bytes, v) = result_fixture("r32_failure_not_registered.json");
    let exc = ExceptionInfo::not_registered("rust.only_task");
    let ours = ResultMeta::failure(v["task_id"].as_str().unwrap(), "rust.only_task", &exc, date_of(&v)).to_json();
    assert_eq!(ours, bytes);
}

/// Same keys, same order, same value types (tracebacks differ: there is no Python stack).
fn same_shape(ours: &Value, theirs: &Value, path: &str) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            let ka: Vec<&String> = a.keys().collect();
            let kb: Vec<&String> = b.keys().collect();
            assert_eq!(ka, kb, "keys at {path}");
            for (k, va) in a {
                same_shape(va, &b[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "length at {path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                same_shape(x, y, &format!("{path}[{i}]"));
            }
        }
        (a, b) => assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b), "type at {path}: {a} vs {b}"),
    }
}

#[test]
fn failure_retry_and_extended_results_have_the_fixture_shape() {
    let (_, v) = result_fixture("r04_failure_valueerror.json");
    let ours = ResultMeta::failure(
        v["task_id"].as_str().unwrap(),
        "tasks.fail",
        &ExceptionInfo::builtin("ValueError", "bad thing"),
        date_of(&v),
    );
    let ours: Value = serde_json::from_slice(&ours.to_json()).unwrap();
    same_shape(&ours, &v, "r04");
    assert_eq!(ours["result"], v["result"]);

    let (_, v) = result_fixture("r07_retry.json");
    let ours = ResultMeta::retry(
        v["task_id"].as_str().unwrap(),
        "tasks.retry_me",
        &ExceptionInfo::builtin("ValueError", "transient 7"),
    );
    let ours: Value = serde_json::from_slice(&ours.to_json()).unwrap();
    same_shape(&ours, &v, "r07");
    assert_eq!((&ours["children"], &ours["result"]), (&v["children"], &v["result"]));

    let (bytes, v) = result_fixture("r21_success_extended.json");
    let mut meta = ResultMeta::success(v["task_id"].as_str().unwrap(), json!(3), date_of(&v));
    meta.extended = Some(celery_autoscale::wire::result::Extended {
        name: "tasks.slow".into(),
        args: vec![json!(3)],
        kwargs: Map::new(),
        worker: "resw2@vm".into(),
        retries: 0,
        queue: "celery".into(),
    });
    assert_eq!(meta.to_json(), bytes, "result_extended layout");
}

/// Replace the fields that differ between any two sends (ids, tags, producer identity).
fn normalise(envelope: &mut Value) {
    let h = &mut envelope["headers"];
    for k in ["id", "root_id", "origin"] {
        h[k] = json!("*");
    }
    let p = &mut envelope["properties"];
    for k in ["correlation_id", "reply_to", "delivery_tag"] {
        p[k] = json!("*");
    }
}

#[test]
fn messages_we_send_are_what_python_sends() {
    let theirs = producer("p01_args.json");
    let (ours, tag) = NewTask::new("tasks.add", vec![json!(2), json!(3)], Map::new(), "celery").to_message("gen1@test");
    let mut a: Value = serde_json::from_slice(&ours).unwrap();
    let mut b: Value = serde_json::from_slice(&theirs).unwrap();
    assert_eq!(a["properties"]["delivery_tag"], tag);
    normalise(&mut a);
    normalise(&mut b);
    // Key order, spacing and escaping are Python's: compare the serialised text.
    assert_eq!(celery_autoscale::wire::pyjson::to_string(&a), celery_autoscale::wire::pyjson::to_string(&b));
    assert_eq!(a["body"], b["body"], "identical body bytes");
}

#[test]
fn a_retry_is_the_message_celery_republishes() {
    // The worker's retry of w01 (itself a retry) is w01 one step on: same id, args, root and
    // headers; retries + 1; parent = the task itself; an ETA `countdown` from now.
    let theirs = parsed("w01_worker_retry_republish.json");
    let before = chrono::Utc::now();
    let retry = NewTask::retry_of(&theirs, "retry_capture", std::time::Duration::from_secs(3600));
    let (bytes, _) = retry.to_message("gen1@test");
    let ours = parse_message(&bytes).unwrap();
    assert_eq!((ours.retries, ours.id.as_str(), ours.task.as_str()), (2, theirs.id.as_str(), "tasks.retry_me"));
    assert_eq!((ours.root_id(), ours.parent_id.as_deref()), (theirs.root_id(), Some(theirs.id.as_str())));
    assert_eq!((&ours.args, &ours.kwargs, ours.ignore_result), (&theirs.args, &theirs.kwargs, theirs.ignore_result));
    assert_eq!(ours.routing_key(), Some("retry_capture"));
    let eta = ours.eta.expect("an ETA");
    assert!(
        eta >= before + chrono::Duration::seconds(3600) && eta <= chrono::Utc::now() + chrono::Duration::seconds(3600)
    );
    let (a, b): (Value, Value) = (
        serde_json::from_slice(&bytes).unwrap(),
        serde_json::from_slice(&producer("w01_worker_retry_republish.json")).unwrap(),
    );
    same_shape(&a["headers"], &b["headers"], "headers");
}

#[test]
fn unacked_entries_and_restored_payloads_are_kombus() {
    // Our entry for a message taken from `celery` is `[<bytes as received>, "", "celery"]`.
    let msg = parsed("p31_default_call.json");
    let entry = unacked_entry(&msg, "celery");
    let mut expected = b"[".to_vec();
    expected.extend_from_slice(&producer("p31_default_call.json"));
    expected.extend_from_slice(b", \"\", \"celery\"]");
    assert_eq!(entry, expected);

    // kombu's restore of the entry a SIGKILLed worker left (u02) is exactly u03's bytes.
    let unacked = fixtures().join("unacked");
    let restored: Vec<Vec<u8>> = (2..=4).map(|i| read(unacked.join(format!("u03_restored_queue.{i}.json")))).collect();
    let mut matched = 0;
    for i in 0..3 {
        let raw = read(unacked.join(format!("u02_after_sigkill.unacked.{i}.json")));
        let entry = UnackedEntry::parse(&raw).unwrap();
        assert_eq!((entry.exchange.as_str(), entry.routing_key.as_str()), ("", "celery"));
        let ours = entry.redelivered_payload();
        if restored.contains(&ours) {
            matched += 1;
        }
    }
    assert_eq!(matched, 3, "every restored payload reproduced byte for byte");
}

#[test]
fn priority_keys_match_the_captured_layout() {
    let manifest: Value = serde_json::from_slice(&read(fixtures().join("producer/manifest.json"))).unwrap();
    let ten: PrioritySteps = "0,1,2,3,4,5,6,7,8,9".parse().unwrap();
    for (case, steps) in [
        ("p10_priority0_default_steps", PrioritySteps::default()),
        ("p11_priority5_default_steps", PrioritySteps::default()),
        ("p12_priority9_default_steps", PrioritySteps::default()),
        ("p13_priority0_steps10", ten.clone()),
        ("p14_priority5_steps10", ten.clone()),
        ("p15_priority9_steps10", ten),
        ("p16_task_default_priority7", PrioritySteps::default()),
    ] {
        let file = &manifest[case]["files"][0];
        let hex = file["redis_key_hex"].as_str().unwrap();
        let key: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let msg = parsed(&format!("{case}.json"));
        assert_eq!(steps.key_for("celery", msg.priority).into_bytes(), key, "{case}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No input makes the parser panic.
    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_message(&bytes);
    }

    /// Mutating real messages (flipping, cutting, splicing bytes) never panics either, and a
    /// rejection always names a reason.
    #[test]
    fn parser_never_panics_on_mutated_fixtures(
        which in 0usize..6,
        cut in any::<prop::sample::Index>(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let names = ["p01_args.json", "p06_eta_naive.json", "p22_time_limits_float.json", "p24_link_errback.json", "p29_compression_zlib.json", "p30_protocol_v1.json"];
        let mut bytes = producer(names[which]);
        let p = pos.index(bytes.len());
        bytes[p] = byte;
        let c = cut.index(bytes.len() + 1);
        bytes.truncate(c.max(1));
        if let Err(r) = parse_message(&bytes) {
            prop_assert!(!r.reason.label().is_empty());
        }
    }

    /// Mutating header values to arbitrary JSON never panics.
    #[test]
    fn parser_never_panics_on_odd_header_values(
        key in prop::sample::select(vec!["task", "id", "eta", "expires", "retries", "timelimit", "ignore_result", "root_id", "group", "compression"]),
        value in prop_oneof![
            Just(json!(null)), Just(json!(-1)), Just(json!(1.5e308)), Just(json!("")), Just(json!("2030-99-99")),
            Just(json!([1, 2, 3])), Just(json!({"a": 1})), Just(json!(true)), Just(json!([null, -5])), Just(json!("application/x-bz2")),
        ],
    ) {
        let mut v: Value = serde_json::from_slice(&producer("p31_default_call.json")).unwrap();
        v["headers"][key] = value;
        let _ = parse_message(&serde_json::to_vec(&v).unwrap());
    }

    /// What we send, we read back unchanged.
    #[test]
    fn our_messages_round_trip(
        n in any::<i64>(),
        s in "\\PC{0,20}",
        priority in 0u8..=9,
        retries in 0u32..5,
        countdown_ms in proptest::option::of(0i64..10_000_000),
    ) {
        let mut kwargs = Map::new();
        kwargs.insert("s".into(), json!(s));
        let mut t = NewTask::new("tasks.cpu_bound", vec![json!(n)], kwargs.clone(), "celery");
        t.priority = priority;
        t.retries = retries;
        t.eta = countdown_ms.map(|ms| chrono::Utc::now() + chrono::Duration::milliseconds(ms));
        let (bytes, tag) = t.to_message("gen1@test");
        let m = parse_message(&bytes).unwrap();
        prop_assert_eq!(&m.id, &t.id);
        prop_assert_eq!(m.delivery_tag, tag);
        prop_assert_eq!(m.args, vec![json!(n)]);
        prop_assert_eq!(m.kwargs, kwargs);
        prop_assert_eq!(m.priority, i64::from(priority));
        prop_assert_eq!(m.retries, retries);
        prop_assert_eq!(m.eta.map(|e| e.timestamp_micros()), t.eta.map(|e| e.timestamp_micros()));
    }
}
