use clap::Parser;

#[tokio::main]
async fn main() {
    let config = chat_store::Config::parse();
    let _telemetry = chat_runtime::telemetry::init("chat-store");
    let result = if config.migrate_only {
        chat_store::migrate_only(&config).await
    } else {
        chat_store::run(config, chat_runtime::shutdown_signal()).await
    };
    if let Err(e) = result {
        eprintln!("chat-store: {e}");
        std::process::exit(1);
    }
}
