//! Upgrading a deployment whose streams an older version made.

use async_nats::jetstream::{self, stream};
use chat_proto::Subjects;
use chat_runtime::nats::{DEDUP_WINDOW, STORE_DEDUP_WINDOW};

/// A store stream made before it sourced the in stream (the routers copied messages into it),
/// with the in stream's de-dup window, is accepted as it is by every service's start (a
/// gateway or router may start first), and gets the in stream as its source and the short
/// window when a store starts; it then holds what the in stream already held: a message
/// accepted before the upgrade is not left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stream_without_its_source_gets_it_and_copies_what_was_accepted() {
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        make_in_stream(&js, &subjects).await;
        js.create_stream(store_stream(&subjects, None))
            .await
            .unwrap();

        let config = upgrade_after_one_message(&js, &subjects).await;
        assert_eq!(source_names(&config), [subjects.in_stream()]);
        assert_eq!(config.duplicate_window, STORE_DEDUP_WINDOW);
    })
    .await;
}

/// A store stream the version of 2026-11-29 made (sourcing the in stream, with the in stream's
/// de-dup window) is accepted as it is by every service's start and gets the short window
/// when a store starts, keeping its source and what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stream_with_the_long_dedup_window_gets_the_short_one() {
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        make_in_stream(&js, &subjects).await;
        let source = stream::Source {
            name: subjects.in_stream(),
            ..Default::default()
        };
        js.create_stream(store_stream(&subjects, Some(source)))
            .await
            .unwrap();

        let config = upgrade_after_one_message(&js, &subjects).await;
        assert_eq!(config.duplicate_window, STORE_DEDUP_WINDOW);
        assert_eq!(source_names(&config), [subjects.in_stream()]);
    })
    .await;
}

/// The in stream as every version made it.
async fn make_in_stream(js: &jetstream::Context, subjects: &Subjects) {
    js.create_stream(stream::Config {
        name: subjects.in_stream(),
        subjects: vec![subjects.inbound()],
        storage: stream::StorageType::File,
        max_age: DEDUP_WINDOW,
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A store stream as an older version made it: with the in stream's de-dup window, and with
/// `source` (the 2026-11-29 version) or without (the versions before).
fn store_stream(subjects: &Subjects, source: Option<stream::Source>) -> stream::Config {
    stream::Config {
        name: subjects.store_stream(),
        subjects: vec![subjects.store_all()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        sources: source.map(|s| vec![s]),
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    }
}

/// Accepts a message into the in stream, then starts as a service does (every service checks
/// the streams, the store also upgrades its own); the store stream's settings once it holds
/// that message.
async fn upgrade_after_one_message(js: &jetstream::Context, subjects: &Subjects) -> stream::Config {
    js.publish(subjects.inbound(), "accepted before the upgrade".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (_, store) = chat_runtime::nats::ensure_streams(js, subjects)
        .await
        .unwrap();
    chat_runtime::nats::upgrade_store_stream(js, subjects, &store)
        .await
        .unwrap();
    chat_tests::eventually("the accepted message in the store stream", || async {
        let mut store = js.get_stream(subjects.store_stream()).await.ok()?;
        let info = store.info().await.ok()?;
        (info.state.messages == 1).then(|| info.config.clone())
    })
    .await
}

fn source_names(config: &stream::Config) -> Vec<String> {
    config
        .sources
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect()
}
