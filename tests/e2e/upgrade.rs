//! Upgrading a deployment whose streams an older version made.

use async_nats::jetstream::stream;

/// A store stream made before it sourced the in stream (the routers copied messages into it)
/// gets the in stream as its source when a store starts, and then holds what the in stream
/// already held: a message accepted before the upgrade is not left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stream_without_its_source_gets_it_and_copies_what_was_accepted() {
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        let file = |name: String, subjects: Vec<String>, retention| stream::Config {
            name,
            subjects,
            retention,
            storage: stream::StorageType::File,
            max_age: if retention == stream::RetentionPolicy::Limits {
                chat_runtime::nats::DEDUP_WINDOW
            } else {
                Default::default()
            },
            duplicate_window: chat_runtime::nats::DEDUP_WINDOW,
            ..Default::default()
        };
        let old = [
            (
                subjects.in_stream(),
                subjects.inbound(),
                stream::RetentionPolicy::Limits,
            ),
            (
                subjects.store_stream(),
                subjects.store_all(),
                stream::RetentionPolicy::WorkQueue,
            ),
        ];
        for (name, subject, retention) in old {
            js.create_stream(file(name, vec![subject], retention))
                .await
                .unwrap();
        }
        js.publish(subjects.inbound(), "accepted before the upgrade".into())
            .await
            .unwrap()
            .await
            .unwrap();

        let (_, mut store) = chat_runtime::nats::ensure_streams(&js, &subjects)
            .await
            .unwrap();
        chat_runtime::nats::ensure_store_source(&js, &subjects, &mut store)
            .await
            .unwrap();
        let sources = chat_tests::eventually("the accepted message copied", || async {
            let mut store = js.get_stream(subjects.store_stream()).await.ok()?;
            let info = store.info().await.ok()?;
            (info.state.messages == 1).then(|| info.config.sources.clone())
        })
        .await;
        let names: Vec<String> = sources.into_iter().flatten().map(|s| s.name).collect();
        assert_eq!(names, [subjects.in_stream()]);
    })
    .await;
}
