//! Several servers sharing one Postgres database and one S3-compatible bucket, each with its own
//! data directory: the real binary with the tiny reference model, a throwaway Postgres cluster
//! and an s3s-fs server (tests/services). Without Postgres or s3s-fs a test says so loudly and
//! returns; under CI=true it fails.
#![allow(clippy::unwrap_used)]

mod server_support;
mod services;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{Server, Workspace};
use services::postgres::{self, Database};
use services::s3::{self, Bucket};

/// Postgres and a bucket, or `None` (said loudly) where either is missing.
fn engines(test: &str) -> Option<(Database, Bucket)> {
    let db = postgres::database(test)?;
    let bucket = s3::bucket(test)?;
    Some((db, bucket))
}

/// One server of the fleet: its own data directory, the shared database and bucket.
fn instance(ws: &Workspace, name: &str, db: &Database, bucket: &Bucket, extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "--catalog".into(),
        ws.catalog.display().to_string(),
        "--auth".into(),
        "keys".into(),
        "--database-url".into(),
        db.url.clone(),
        "--store".into(),
        format!("s3://{}/images", bucket.name),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_with_env(&ws.dir.path().join(name), &args, &bucket.env())
}

/// `diffusiond keys ARGS --database-url URL`.
fn keys(ws: &Workspace, db: &Database, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--database-url", &db.url]);
    ws.keys(&all)
}

fn create_key(ws: &Workspace, db: &Database, credits: i64) -> String {
    let out = keys(
        ws,
        db,
        &["create", "--credits", &credits.to_string(), "--name", "t"],
    );
    out.lines().last().unwrap().trim().to_string()
}

/// The key's balance, read with `keys list` against the database.
fn balance(ws: &Workspace, db: &Database, key: &str) -> i64 {
    let list = keys(ws, db, &["list"]);
    let prefix = format!("{}...", &key[..8]);
    let row = list.lines().find(|l| l.contains(&prefix)).unwrap();
    row.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn open_reservations(db: &Database) -> i64 {
    postgres::query(db, "SELECT count(*) FROM charges WHERE status = 'reserved'")
        .parse()
        .unwrap()
}

fn small(seed: u64) -> String {
    json!({"prompt": "a lighthouse", "model": "z-image-turbo", "width": 64, "height": 64,
           "steps": 2, "seed": seed})
    .to_string()
}

/// A request that takes a few seconds on a CPU with the tiny model.
fn slow(seed: u64) -> String {
    json!({"prompt": "a slow one", "model": "z-image-turbo", "width": 512, "height": 512,
           "num_images": 2, "seed": seed})
    .to_string()
}

fn post(base: &str, body: &str, key: &str, idempotency: Option<&str>) -> server_support::Reply {
    let mut req = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
        .post(format!("{base}/v1/generate"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    if let Some(k) = idempotency {
        req = req.header("idempotency-key", k);
    }
    server_support::Reply::from(req.body(body.to_string()).send().unwrap())
}

/// The price of one `small` request (learned from a request on a key with plenty).
fn small_price(ws: &Workspace, db: &Database, server: &Server) -> i64 {
    let rich = create_key(ws, db, 1_000_000);
    let v = post(&server.base, &small(1), &rich, None).success();
    v["credits_used"].as_i64().unwrap()
}

/// The path of an image URL (`/files/gen/...`).
fn path_of(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    format!("/{}", rest.split_once('/').unwrap().1)
}

#[test]
fn forty_requests_across_two_instances_on_credits_for_25() {
    let Some((db, bucket)) = engines("forty_requests_across_two_instances_on_credits_for_25")
    else {
        return;
    };
    let ws = Workspace::new();
    let a = instance(&ws, "a", &db, &bucket, &["--queue-capacity", "64"]);
    let b = instance(&ws, "b", &db, &bucket, &["--queue-capacity", "64"]);
    let price = small_price(&ws, &db, &a);
    let key = create_key(&ws, &db, 25 * price);

    let bases = [a.base.clone(), b.base.clone()];
    let replies: Vec<server_support::Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let (base, key) = (bases[i % 2].clone(), key.clone());
                s.spawn(move || post(&base, &small(100 + i as u64), &key, None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<Value> = replies
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.success())
        .collect();
    let refused = replies.iter().filter(|r| r.status == 402).count();
    let others: Vec<u16> = replies
        .iter()
        .map(|r| r.status)
        .filter(|s| *s != 200 && *s != 402)
        .collect();
    assert_eq!((ok.len(), refused, others), (25, 15, vec![]));
    for r in replies.iter().filter(|r| r.status == 402) {
        assert_eq!(r.error_code(), "insufficient_credits");
    }
    assert_eq!(balance(&ws, &db, &key), 0);
    assert_eq!(open_reservations(&db), 0);

    // Every image is in the bucket once, and either instance serves it, with the same ETag.
    let urls: Vec<String> = ok
        .iter()
        .map(|v| v["images"][0]["url"].as_str().unwrap().to_string())
        .collect();
    let objects = bucket.objects();
    assert_eq!(objects.len(), 26, "{objects:?}"); // 25 + the price probe
    for url in &urls {
        let path = path_of(url);
        let from_a = a.get(&path, None);
        let from_b = b.get(&path, None);
        assert_eq!((from_a.status, from_b.status), (200, 200), "{path}");
        assert_eq!(from_a.bytes, from_b.bytes);
        assert_eq!(from_a.header("etag"), from_b.header("etag"));
        assert_eq!(server_support::decode(&from_a.bytes).1, 64);
    }
}

#[test]
fn ranges_and_etags_from_the_bucket() {
    let Some((db, bucket)) = engines("ranges_and_etags_from_the_bucket") else {
        return;
    };
    let ws = Workspace::new();
    let a = instance(&ws, "a", &db, &bucket, &[]);
    let key = create_key(&ws, &db, 1_000_000);
    let v = post(&a.base, &small(5), &key, None).success();
    let path = path_of(v["images"][0]["url"].as_str().unwrap());
    let whole = a.get(&path, None);
    assert_eq!(whole.status, 200);
    let client = reqwest::blocking::Client::new();
    let part = client
        .get(format!("{}{path}", a.base))
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(part.bytes().unwrap().to_vec(), whole.bytes[10..20].to_vec());
    let etag = whole.header("etag").unwrap();
    let again = client
        .get(format!("{}{path}", a.base))
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    assert_eq!(
        a.get("/files/gen/req_AAAAAAAAAAAAAAAAAAAAAA/image_0.jpg", None)
            .status,
        404
    );
}

#[test]
fn a_killed_instance_is_refunded_by_the_other_and_a_live_one_is_not() {
    let Some((db, bucket)) = engines("a_killed_instance_is_refunded_by_the_other") else {
        return;
    };
    let ws = Workspace::new();
    let timeout = ["--instance-timeout", "3s"];
    let a = instance(&ws, "a", &db, &bucket, &timeout);
    let b = instance(&ws, "b", &db, &bucket, &timeout);
    let key = create_key(&ws, &db, 1_000_000);

    // A slow request on each; both reserve.
    let on_b = std::thread::spawn({
        let (base, key) = (b.base.clone(), key.clone());
        move || post(&base, &slow(2), &key, None)
    });
    let on_a = std::thread::spawn({
        let (base, key) = (a.base.clone(), key.clone());
        move || {
            reqwest::blocking::Client::new()
                .post(format!("{base}/v1/generate"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(slow(1))
                .send()
        }
    });
    let reserved = Instant::now();
    while open_reservations(&db) < 2 {
        assert!(
            reserved.elapsed() < Duration::from_secs(60),
            "never reserved"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = balance(&ws, &db, &key);
    let price = (1_000_000 - before) / 2;
    a.kill();
    assert!(on_a.join().unwrap().is_err(), "the killed server answered");

    // B notices A's silence and refunds A's reservation, once; its own request goes on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while balance(&ws, &db, &key) != before + price {
        assert!(
            Instant::now() < deadline,
            "A's reservation was not refunded:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = on_b.join().unwrap();
    done.success();
    std::thread::sleep(Duration::from_secs(4)); // more reaper passes change nothing
    assert_eq!(balance(&ws, &db, &key), 1_000_000 - price);
    assert_eq!(open_reservations(&db), 0);
    assert!(b.log().contains("stopped heart-beating"), "{}", b.log());
}

#[test]
fn an_idempotent_retry_on_the_other_instance_is_charged_once() {
    let Some((db, bucket)) = engines("an_idempotent_retry_on_the_other_instance") else {
        return;
    };
    let ws = Workspace::new();
    let a = instance(&ws, "a", &db, &bucket, &[]);
    let b = instance(&ws, "b", &db, &bucket, &[]);
    let key = create_key(&ws, &db, 1_000_000);

    let first = post(&a.base, &small(7), &key, Some("order-1"));
    let v1 = first.success();
    let price = v1["credits_used"].as_i64().unwrap();
    let retry = post(&b.base, &small(7), &key, Some("order-1"));
    assert_eq!(retry.status, 200);
    assert_eq!(retry.bytes, first.bytes, "the first response, again");
    assert_eq!(retry.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(retry.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(balance(&ws, &db, &key), 1_000_000 - price);

    // The same key with another body: 409 with its own code, nothing charged.
    let other = post(&b.base, &small(8), &key, Some("order-1"));
    assert_eq!(other.status, 409);
    assert_eq!(other.error_code(), "idempotency_key_reused");
    assert_eq!(balance(&ws, &db, &key), 1_000_000 - price);

    // Sent to both at once (a client retrying on a timeout): one runs, the other waits for it.
    let (r1, r2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| post(&a.base, &slow(9), &key, Some("order-2")));
        std::thread::sleep(Duration::from_millis(300));
        let h2 = s.spawn(|| post(&b.base, &slow(9), &key, Some("order-2")));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    let (v1, v2) = (r1.success(), r2.success());
    assert_eq!(v1, v2);
    let slow_price = v1["credits_used"].as_i64().unwrap();
    assert_eq!(balance(&ws, &db, &key), 1_000_000 - price - slow_price);
    // Another API key's "order-1" is its own.
    let other_key = create_key(&ws, &db, 1_000_000);
    let mine = post(&a.base, &small(8), &other_key, Some("order-1")).success();
    assert_ne!(mine["request_id"], v1["request_id"]);
    assert_eq!(open_reservations(&db), 0);
}

#[test]
fn retention_deletes_from_the_bucket() {
    let Some((db, bucket)) = engines("retention_deletes_from_the_bucket") else {
        return;
    };
    let ws = Workspace::new();
    let a = instance(&ws, "a", &db, &bucket, &["--retention", "2s"]);
    let key = create_key(&ws, &db, 1_000_000);
    let v = post(&a.base, &small(3), &key, None).success();
    let path = path_of(v["images"][0]["url"].as_str().unwrap());
    assert_eq!(a.get(&path, None).status, 200);
    assert_eq!(bucket.objects().len(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get(&path, None).status != 404 {
        assert!(
            Instant::now() < deadline,
            "still served 30 s after a 2 s retention"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(bucket.objects(), Vec::<String>::new());
}

#[test]
fn presigned_urls_point_at_the_bucket() {
    let Some((db, bucket)) = engines("presigned_urls_point_at_the_bucket") else {
        return;
    };
    let ws = Workspace::new();
    let a = instance(&ws, "a", &db, &bucket, &["--presign", "10m"]);
    let key = create_key(&ws, &db, 1_000_000);
    let v = post(&a.base, &small(4), &key, None).success();
    let url = v["images"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&bucket.endpoint), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let got = a.get_url(url);
    assert_eq!(got.status, 200);
    assert_eq!(server_support::decode(&got.bytes).1, 64);
    // The same object through the server.
    let via_server = a.get(
        &path_of(url).split('?').next().unwrap().replacen(
            &format!("/{}/images", bucket.name),
            "/files",
            1,
        ),
        None,
    );
    assert_eq!(via_server.bytes, got.bytes);
}
