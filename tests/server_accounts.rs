//! End to end, keys mode: API keys, credits, daily quotas, 401/402/429/503, refunds, and 20
//! concurrent requests on one key. The real binary with the tiny reference model; keys are made
//! and read with the `diffusiond keys` CLI while the server runs.
#![allow(clippy::unwrap_used)]

mod server_support;

use serde_json::json;
use server_support::{Workspace, HOSTED_EXAMPLE};

#[test]
fn invalid_api_key_rows() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    assert!(server.banner.contains("auth: keys"));
    let key = ws.create_key(1000, None);

    // Missing, not Bearer, empty, unknown.
    let client = reqwest::blocking::Client::new();
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some(key.as_str()),
        Some("Bearer"),
        Some("Bearer dk_nope"),
    ] {
        let mut req = client
            .post(format!("{}/v1/generate", server.base))
            .body(HOSTED_EXAMPLE);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = server_support::Reply::from(req.send().unwrap());
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.error_code(), "invalid_api_key", "{auth:?}");
    }
    // Authentication comes before validation.
    let r = server.post("{broken", None);
    assert_eq!(
        (r.status, r.error_code()),
        (401, "invalid_api_key".to_string())
    );
    assert_eq!(server.get("/v1/models", None).status, 401);
    assert_eq!(server.get("/v1/models", Some(&key)).status, 200);
    // /health and image files need no key.
    assert_eq!(server.get("/health", None).status, 200);

    let v = server.post(HOSTED_EXAMPLE, Some(&key)).success();
    assert_eq!(v["credits_used"], 250);
    let file = server.get_url(v["images"][0]["url"].as_str().unwrap());
    assert_eq!(file.status, 200);

    // Revoked while the server runs.
    ws.keys(&["revoke", &key]);
    let r = server.post(HOSTED_EXAMPLE, Some(&key));
    assert_eq!(
        (r.status, r.error_code()),
        (401, "invalid_api_key".to_string())
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
}

#[test]
fn credits_are_deducted_exactly_and_402_charges_nothing() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(600, Some(10));

    assert_eq!(
        server.post(HOSTED_EXAMPLE, Some(&key)).success()["credits_used"],
        250
    );
    assert_eq!(ws.balance_and_used(&key), (350, 1));
    assert_eq!(
        server.post(HOSTED_EXAMPLE, Some(&key)).success()["credits_used"],
        250
    );
    assert_eq!(ws.balance_and_used(&key), (100, 2));

    let r = server.post(HOSTED_EXAMPLE, Some(&key));
    assert_eq!(
        (r.status, r.error_code()),
        (402, "insufficient_credits".to_string())
    );
    // Nothing charged, quota not used, nothing generated.
    assert_eq!(ws.balance_and_used(&key), (100, 2));
    let id = r.json()["request_id"].as_str().unwrap().to_string();
    assert!(!ws.data().join("files/gen").join(id).exists());

    // Add credits while the server runs (by key ID this time).
    let list = ws.keys(&["list"]);
    let id = list
        .lines()
        .find(|l| l.contains(&key[..8]))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    ws.keys(&["add-credits", &id, "900"]);
    assert_eq!(ws.balance_and_used(&key), (1000, 2));
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "num_images": 4});
    assert_eq!(
        server.post(&body.to_string(), Some(&key)).success()["credits_used"],
        1000
    );
    assert_eq!(ws.balance_and_used(&key), (0, 3));
    // A validation error is not a charge either, and it comes before the credit check.
    let r = server.post(
        &json!({"prompt": "a cat", "model": "nope"}).to_string(),
        Some(&key),
    );
    assert_eq!(r.error_code(), "invalid_model");
    assert_eq!(ws.balance_and_used(&key), (0, 3));
}

#[test]
fn daily_quota_counts_accepted_requests_only() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(10_000, Some(2));

    // Rejected requests use no quota: 400, 402, and a failed generation (refunded).
    let r = server.post(
        &json!({"prompt": "", "model": "flux-2-pro"}).to_string(),
        Some(&key),
    );
    assert_eq!(r.error_code(), "missing_prompt");
    let costly = json!({"prompt": "a", "model": "gpt-image-2", "resolution": "4k", "quality": "high", "num_images": 4});
    let r = server.post(&costly.to_string(), Some(&key));
    assert_eq!(
        (r.status, r.error_code()),
        (402, "insufficient_credits".to_string())
    );
    let r = server.post(
        &json!({"prompt": "a", "model": "test-broken-size"}).to_string(),
        Some(&key),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (500, "generation_failed".to_string())
    );
    assert_eq!(ws.balance_and_used(&key), (10_000, 0));

    server.post(HOSTED_EXAMPLE, Some(&key)).success();
    server.post(HOSTED_EXAMPLE, Some(&key)).success();
    let r = server.post(HOSTED_EXAMPLE, Some(&key));
    assert_eq!(
        (r.status, r.error_code()),
        (429, "rate_limit_exceeded".to_string())
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert_eq!(ws.balance_and_used(&key), (9_500, 2));

    // The quota check comes before the credit check.
    let r = server.post(&costly.to_string(), Some(&key));
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    // Another key has its own quota.
    let other = ws.create_key(250, Some(1));
    server.post(HOSTED_EXAMPLE, Some(&other)).success();
}

#[test]
fn twenty_concurrent_requests_on_credits_for_fifteen() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(15 * 250, None);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let (server, key) = (&server, &key);
                s.spawn(move || {
                    let r = server.post(HOSTED_EXAMPLE, Some(key));
                    match r.status {
                        200 => {
                            r.success();
                        }
                        _ => assert_eq!(r.error_code(), "insufficient_credits"),
                    }
                    r.status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 402).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(ws.balance_and_used(&key), (0, 15));
}

#[test]
fn a_full_queue_is_503_server_busy_and_charges_nothing() {
    let ws = Workspace::new();
    // One job running, one waiting, the rest turned away.
    let server = ws.serve(&[
        "--auth",
        "keys",
        "--queue-capacity",
        "1",
        "--max-batch-images",
        "1",
    ]);
    let key = ws.create_key(100_000, Some(100));
    let body =
        json!({"prompt": "a slow one", "model": "z-image-turbo", "width": 256, "height": 256})
            .to_string();
    let replies: Vec<server_support::Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| server.post(&body, Some(&key))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        !busy.is_empty(),
        "no 503 among {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(ok + busy.len(), 6);
    for r in busy {
        assert_eq!(r.error_code(), "server_busy");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry >= 1);
    }
    let ok = ok as i64;
    assert_eq!(ws.balance_and_used(&key), (100_000 - 100 * ok, ok));
}

#[test]
fn keys_cli() {
    let ws = Workspace::new();
    let out = ws.keys(&[
        "create",
        "--credits",
        "42",
        "--daily-quota",
        "3",
        "--name",
        "alice",
    ]);
    let key = out.lines().last().unwrap();
    assert!(key.starts_with("dk_") && key.len() >= 35, "{out}");
    // Shown once: the key appears nowhere else, and only its hash is stored.
    let list = ws.keys(&["list"]);
    assert!(!list.contains(key));
    assert!(
        list.contains("alice") && list.contains("42") && list.contains(&key[..8]),
        "{list}"
    );
    for entry in std::fs::read_dir(ws.data()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("accounts.db")
        {
            let bytes = std::fs::read(&path).unwrap_or_default();
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                "{}",
                path.display()
            );
        }
    }

    let out = ws.keys(&["add-credits", key, "8"]);
    assert!(!out.contains(key), "{out}");
    assert_eq!(ws.balance_and_used(key), (50, 0));
    ws.keys(&["revoke", key]);
    assert!(ws.keys(&["list"]).contains("revoked"));

    let bad = ws.keys_raw(&["revoke", "key_doesnotexist"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("key_doesnotexist"));
    let bad = ws.keys_raw(&["add-credits", "dk_notakey", "5"]);
    assert!(!bad.status.success());
    assert!(
        !String::from_utf8_lossy(&bad.stderr).contains("dk_notakey"),
        "a key is echoed"
    );
    let bad = ws.keys_raw(&["create", "--credits", "-5"]);
    assert!(!bad.status.success());
}

/// Finding 5 of issue 15: `keys list` (revoke, add-credits) against a mistyped --data-dir created
/// an empty database there and went on; now it fails and creates nothing. A huge amount is refused and writes nothing.
#[test]
fn keys_cli_refuses_a_mistyped_data_dir_and_huge_amounts() {
    let ws = Workspace::new();
    let key = ws.create_key(100, None);
    let run = |dir: &std::path::Path, args: &[&str]| {
        std::process::Command::new(server_support::BIN)
            .arg("keys")
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env_remove("DIFFUSIOND_DATA_DIR")
            .output()
            .unwrap()
    };
    let missing = ws.dir.path().join("dataa");
    for args in [
        &["list"][..],
        &["revoke", &key],
        &["add-credits", &key, "5"],
    ] {
        let out = run(&missing, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    let empty = ws.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(&empty, &["list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no accounts database"));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);

    let out = ws.keys_raw(&["add-credits", &key, "9223372036854775807"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(&key[8..]), "the key is echoed: {err}");
    // Nothing was written, and every key is still listed.
    assert_eq!(ws.balance_and_used(&key), (100, 0));
}
