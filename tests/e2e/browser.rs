//! The web client in a real browser: Debian's headless Chromium driven through chromedriver
//! (WebDriver, `fantoccini`). Two users in two separate browser profiles register, find each
//! other, chat with ticks going to read, one logs out and back in to a backlog, an HTML body
//! shows as text, and a gateway `kill -9` mid-conversation reconnects by itself and loses
//! nothing; neither page logs a console error. `UPDATE_SCREENSHOTS=1` writes `docs/screenshots/{desktop,phone}.png`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chat_tests::{Options, TestEnv, eventually};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a port of its own, killed on drop.
struct Driver {
    url: String,
    _child: Child,
}

impl Driver {
    /// What the page wrote to the console at level SEVERE (errors, failed loads) since the
    /// last call, through chromedriver's log endpoint.
    async fn console_errors(&self, b: &Client) -> Vec<String> {
        let id = b.session_id().await.unwrap().expect("a session");
        let log: Value = reqwest::Client::new()
            .post(format!("{}/session/{id}/se/log", self.url))
            .json(&json!({"type": "browser"}))
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a log");
        log["value"]
            .as_array()
            .expect("log entries")
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: apt-get install chromium chromium-driver (scripts/test does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        eventually("chromedriver answers", || async {
            reqwest::get(format!("{url}/status")).await.ok().map(drop)
        })
        .await;
        Driver { url, _child: child }
    }

    /// A browser with a fresh profile of its own (its own cookies and local storage).
    async fn browser(&self, profile: &tempfile::TempDir) -> Client {
        let caps = json!({
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a browser session")
    }
}

/// What a test reads off the page, through the accessible structure the client promises.
const STATE_JS: &str = r#"
const q = (s) => document.querySelector(s);
const log = q('[role="log"]');
return {
  app: !q('#app').hidden,
  title: document.title,
  connection: q('#connection').textContent,
  peer_state: q('#peer-state').textContent,
  messages: log ? [...log.querySelectorAll('.msg')].map((m) => ({
    body: m.querySelector('.body').textContent,
    mine: m.classList.contains('mine'),
    status: m.querySelector('.status') ? m.querySelector('.status').getAttribute('aria-label') : null,
  })) : [],
  images_in_log: log ? log.querySelectorAll('img').length : 0,
  conversations: [...document.querySelectorAll('#conversations .item')].map((c) => ({
    name: c.querySelector('.name').textContent,
    online: c.querySelector('.dot').getAttribute('aria-label'),
    unread: c.querySelector('.badge') ? c.querySelector('.badge').getAttribute('aria-label') : null,
    preview: c.querySelector('.preview').textContent,
  })),
  errors: {
    username: q('#username-error').textContent,
    password: q('#password-error').textContent,
  },
};
"#;

async fn state(b: &Client) -> Value {
    b.execute(STATE_JS, vec![]).await.expect("page state")
}

/// Waits until the page state satisfies `check`; on timeout, says what the page showed.
async fn until(b: &Client, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let s = state(b).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {:?}; the page shows {s:#}",
            chat_tests::WAIT
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bodies(s: &Value) -> Vec<String> {
    s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

async fn fill(b: &Client, css: &str, text: &str) {
    let e = b.find(Locator::Css(css)).await.expect(css);
    e.clear().await.expect("clear");
    e.send_keys(text).await.expect("typing");
}

async fn button(b: &Client, name: &str) {
    b.find(Locator::XPath(&format!(
        "//button[normalize-space()='{name}']"
    )))
    .await
    .unwrap_or_else(|_| panic!("a button named {name}"))
    .click()
    .await
    .expect("click");
}

/// Types into "Message" and presses Enter.
async fn say(b: &Client, text: &str) {
    let e = b.find(Locator::Css("#message")).await.expect("Message");
    e.send_keys(&format!("{text}\u{E007}"))
        .await
        .expect("typing");
}

async fn register(b: &Client, base: &str, name: &str) {
    b.goto(base).await.expect("the page loads");
    fill(b, "#username", name).await;
    fill(b, "#password", "short").await;
    button(b, "Create account").await;
    until(b, "password too short", |s| {
        s["errors"]["password"] == "At least 8 characters."
    })
    .await;
    fill(b, "#password", &format!("password-{name}")).await;
    button(b, "Create account").await;
    until(b, "logged in", |s| s["app"] == true).await;
}

/// Clicks the element at `xpath`, finding it again if the list re-rendered under the click.
async fn click(b: &Client, what: &str, xpath: &str) {
    eventually(what, || async {
        let e = b.find(Locator::XPath(xpath)).await.ok()?;
        e.click().await.ok()
    })
    .await;
}

async fn open_conversation(b: &Client, peer: &str) {
    let xpath =
        format!("//ul[@id='conversations']//button[.//span[@class='name' and text()='{peer}']]");
    click(b, &format!("a conversation with {peer}"), &xpath).await;
}

async fn screenshot(b: &Client, name: &str) {
    if std::env::var_os("UPDATE_SCREENSHOTS").is_none() {
        return;
    }
    let png = b.screenshot().await.expect("a screenshot");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&dir).expect("docs/screenshots");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("writing a screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_the_browser_through_logout_xss_and_a_gateway_crash() {
    let mut env = TestEnv::start(Options {
        processes: true,
        ..Options::default()
    })
    .await;
    let base = env.base_url(0);
    let driver = Driver::start().await;
    let profile = || tempfile::tempdir().expect("a browser profile directory");
    let (pa, pb) = (profile(), profile());
    let alice = driver.browser(&pa).await;
    let bob = driver.browser(&pb).await;

    register(&alice, &base, "alice").await;
    register(&bob, &base, "bob").await;
    // A name that is taken is said next to the field.
    let eve = profile();
    let third = driver.browser(&eve).await;
    third.goto(&base).await.unwrap();
    fill(&third, "#username", "alice").await;
    fill(&third, "#password", "password-x").await;
    button(&third, "Create account").await;
    until(&third, "name taken", |s| {
        s["errors"]["username"]
            .as_str()
            .unwrap()
            .starts_with("That name is taken")
    })
    .await;
    fill(&third, "#username", "alice").await;
    fill(&third, "#password", "wrong-password").await;
    button(&third, "Log in").await;
    until(&third, "wrong password", |s| {
        s["errors"]["password"] == "Wrong username or password."
    })
    .await;
    third.close().await.unwrap();

    // Alice finds Bob and writes; Bob sees an unread conversation, opens it, reads.
    fill(&alice, "#find", "bo").await;
    click(
        &alice,
        "bob found",
        "//ul[@id='results']//button[.//span[text()='bob']]",
    )
    .await;
    say(&alice, "Hello Bob 👋").await;
    until(&alice, "sent tick", |s| {
        s["messages"][0]["status"] != "pending" && s["messages"][0]["body"] == "Hello Bob 👋"
    })
    .await;
    let s = until(&bob, "a conversation with alice, unread", |s| {
        s["conversations"][0]["unread"] == "1 unread"
    })
    .await;
    assert_eq!(s["conversations"][0]["name"], "alice");
    assert_eq!(s["conversations"][0]["preview"], "Hello Bob 👋");
    assert_eq!(s["title"], "(1) Chat");
    open_conversation(&bob, "alice").await;
    let s = until(&bob, "the message", |s| bodies(s) == ["Hello Bob 👋"]).await;
    assert_eq!(s["messages"][0]["mine"], false);
    until(&alice, "read tick", |s| {
        s["messages"][0]["status"] == "read"
    })
    .await;
    until(&alice, "bob online", |s| s["peer_state"] == "online").await;

    // Bob starts typing: Alice sees it.
    let typing = bob.find(Locator::Css("#message")).await.unwrap();
    typing.send_keys("Hi").await.unwrap();
    until(&alice, "bob typing", |s| s["peer_state"] == "typing…").await;
    typing.clear().await.unwrap();

    // Bob answers; an HTML body is shown as text and runs nothing.
    let xss = "<img src=x onerror=alert(1)>";
    say(&bob, "Hi Alice!").await;
    say(&bob, xss).await;
    let s = until(&alice, "bob's answers", |s| {
        bodies(s) == ["Hello Bob 👋", "Hi Alice!", xss]
    })
    .await;
    assert_eq!(s["images_in_log"], 0);
    assert!(alice.get_alert_text().await.is_err(), "no alert ran");
    until(&bob, "bob's own ticks", |s| {
        s["messages"][2]["status"] == "read"
    })
    .await;
    screenshot(&alice, "desktop").await;
    bob.set_window_size(390, 844).await.unwrap();
    screenshot(&bob, "phone").await;
    bob.set_window_size(1280, 800).await.unwrap();

    // Bob logs out; Alice writes three; Bob logs back in and finds them, in order.
    button(&bob, "Log out").await;
    until(&alice, "bob offline", |s| {
        s["peer_state"]
            .as_str()
            .is_some_and(|p| p.starts_with("last seen"))
    })
    .await;
    for i in 1..=3 {
        say(&alice, &format!("while you were away {i}")).await;
    }
    until(&alice, "sent", |s| {
        s["messages"].as_array().unwrap().len() == 6 && s["messages"][5]["status"] == "sent"
    })
    .await;
    fill(&bob, "#username", "bob").await;
    fill(&bob, "#password", "password-bob").await;
    button(&bob, "Log in").await;
    until(&bob, "three unread", |s| {
        s["conversations"][0]["unread"] == "3 unread"
    })
    .await;
    open_conversation(&bob, "alice").await;
    until(&bob, "everything in order", |s| {
        bodies(s)
            == [
                "Hello Bob 👋",
                "Hi Alice!",
                xss,
                "while you were away 1",
                "while you were away 2",
                "while you were away 3",
            ]
    })
    .await;

    // The gateway dies mid-conversation: both pages say so, a message typed meanwhile waits
    // as pending, and everything arrives once the gateway is back.
    let mut gateway = env.take_gateway(0);
    gateway.kill9().await;
    until(&alice, "reconnecting shown", |s| {
        s["connection"] == "Reconnecting…"
    })
    .await;
    say(&alice, "are you still there?").await;
    let s = state(&alice).await;
    assert_eq!(s["messages"][6]["status"], "pending");
    gateway.restart().await;
    env.put_back_gateway(0, gateway);
    until(&alice, "reconnected, sent", |s| {
        s["connection"] == "" && s["messages"][6]["status"] != "pending"
    })
    .await;
    let s = until(&bob, "the message after the crash, once", |s| {
        bodies(s).last().map(String::as_str) == Some("are you still there?")
    })
    .await;
    assert_eq!(bodies(&s).len(), 7, "nothing shown twice: {:?}", bodies(&s));
    until(&alice, "read after the crash", |s| {
        s["messages"][6]["status"] == "read"
    })
    .await;
    // A reload keeps the session and shows the same conversation.
    alice.refresh().await.unwrap();
    until(&alice, "still logged in after a reload", |s| {
        s["app"] == true && s["conversations"][0]["name"] == "bob"
    })
    .await;

    // Nothing went wrong in either page, apart from what the test did on purpose: the
    // connection refused while the gateway was down, and the 401/409 of the wrong logins.
    for (who, b) in [("alice", &alice), ("bob", &bob)] {
        let errors: Vec<String> = driver
            .console_errors(b)
            .await
            .into_iter()
            .filter(|e| !e.contains("ERR_CONNECTION_REFUSED") && !e.contains("/ws?token="))
            .collect();
        assert!(errors.is_empty(), "{who}'s console: {errors:#?}");
    }
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    env.finish().await;
}
