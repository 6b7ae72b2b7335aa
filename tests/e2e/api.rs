//! The HTTP API: accounts, tokens, search, and its error codes.

use chat_tests::TestEnv;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_their_errors() {
    let env = TestEnv::start_default().await;
    let post = |body: serde_json::Value| {
        let env = &env;
        async move { env.post("/api/v1/register", &body).await }
    };
    let (s, body) = post(json!({"username": "alice", "password": "long enough"})).await;
    assert_eq!(s, 201);
    assert_eq!(body["username"], "alice");
    assert!(body["user_id"].as_i64().unwrap() > 0);

    for (body, status, code) in [
        (
            json!({"username": "Alice", "password": "long enough"}),
            409,
            "username_taken",
        ),
        (
            json!({"username": "al", "password": "long enough"}),
            400,
            "invalid_username",
        ),
        (
            json!({"username": "a b c", "password": "long enough"}),
            400,
            "invalid_username",
        ),
        (
            json!({"username": "carol", "password": "short"}),
            400,
            "invalid_password",
        ),
        (json!({"username": "carol"}), 400, "bad_request"),
    ] {
        let (s, b) = post(body.clone()).await;
        assert_eq!(
            (s, b["error"]["code"].as_str().unwrap()),
            (status, code),
            "{body}: {b}"
        );
    }
    let raw = env
        .request(Method::POST, "/api/v1/register", None)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);

    let (s, login) = env
        .post(
            "/api/v1/login",
            &json!({"username": "alice", "password": "long enough"}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(login["expires_at"].as_i64().unwrap() > chat_proto::now_ms());
    for wrong in [
        json!({"username": "alice", "password": "wrong password"}),
        json!({"username": "nobody", "password": "long enough"}),
    ] {
        let (s, b) = env.post("/api/v1/login", &wrong).await;
        assert_eq!(
            (s, b["error"]["code"].as_str().unwrap()),
            (401, "bad_credentials")
        );
    }

    let token = login["token"].as_str().unwrap();
    let me = env
        .request(Method::GET, "/api/v1/me", Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(
        me,
        json!({"user_id": login["user_id"], "username": "alice"})
    );
    for bad in [None, Some("nope"), Some("")] {
        let r = env
            .request(Method::GET, "/api/v1/me", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let b: serde_json::Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "unauthorized");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_history_errors() {
    let env = TestEnv::start_default().await;
    let a = env.user("alice").await;
    for name in ["bob", "bobby", "Bobcat", "carol", "bo_b"] {
        env.user(name).await;
    }
    let names = |v: serde_json::Value| -> Vec<String> {
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, found) = env.get(&a, "/api/v1/users?q=bob").await;
    assert_eq!(s, 200);
    assert_eq!(names(found), ["bob", "bobby", "Bobcat"]);
    // '_' is matched literally, not as a LIKE wildcard.
    let (_, found) = env.get(&a, "/api/v1/users?q=bo_").await;
    assert_eq!(names(found), ["bo_b"]);
    let (_, found) = env.get(&a, "/api/v1/users?q=BOB&limit=1").await;
    assert_eq!(names(found), ["bob"]);
    let (_, found) = env.get(&a, "/api/v1/users?q=alice").await;
    assert!(names(found).is_empty(), "yourself is not in the results");

    let (s, b) = env
        .get(&a, "/api/v1/conversations/987654321/messages")
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str().unwrap()),
        (404, "unknown_user")
    );
    let (s, b) = env
        .get(&a, "/api/v1/conversations/2/messages?before=zzz")
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str().unwrap()),
        (400, "bad_request")
    );
    let (s, _) = env.get(&a, "/api/v1/conversations/abc/messages").await;
    assert_eq!(s, 400);
    let r = env
        .request(Method::GET, "/api/v1/conversations", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, b) = env.get(&a, "/api/v1/conversations").await;
    assert_eq!((s, b), (200, json!({"conversations": []})));
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = env.request(Method::GET, path, None).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    env.finish().await;
}

/// Brute force: login attempts per username, and register/login per address, answer 429
/// once over their limit; other accounts and the right password are not locked out by
/// another account's attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_register_are_rate_limited() {
    let env = TestEnv::start(chat_tests::Options {
        auth_rate_ip: 30,
        login_rate_user: 5,
        ..Default::default()
    })
    .await;
    env.user("alice").await;
    env.user("bob").await;
    let wrong = json!({"username": "alice", "password": "not the password"});
    let mut codes = Vec::new();
    for _ in 0..8 {
        let (s, b) = env.post("/api/v1/login", &wrong).await;
        codes.push((s, b["error"]["code"].as_str().unwrap().to_owned()));
    }
    // alice's own login counted once (in env.user): 4 more wrong tries, then 429.
    assert!(
        codes[..4]
            .iter()
            .all(|(s, c)| *s == 401 && c == "bad_credentials"),
        "{codes:?}"
    );
    assert!(
        codes[4..]
            .iter()
            .all(|(s, c)| *s == 429 && c == "rate_limited"),
        "{codes:?}"
    );
    // Usernames count case-insensitively.
    let (s, _) = env
        .post(
            "/api/v1/login",
            &json!({"username": "ALICE", "password": "password-alice"}),
        )
        .await;
    assert_eq!(s, 429);
    // Bob is not affected.
    let (s, _) = env
        .post(
            "/api/v1/login",
            &json!({"username": "bob", "password": "password-bob"}),
        )
        .await;
    assert_eq!(s, 200);
    // The address limit (30 a minute; 14 used so far) covers registering too.
    let mut statuses = Vec::new();
    for i in 0..20 {
        let (s, _) = env
            .post(
                "/api/v1/register",
                &json!({"username": format!("user{i}"), "password": "long enough"}),
            )
            .await;
        statuses.push(s);
    }
    assert!(
        statuses.contains(&201) && statuses.ends_with(&[429]),
        "{statuses:?}"
    );
    env.finish().await;
}
