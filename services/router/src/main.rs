use clap::Parser;

#[tokio::main]
async fn main() {
    let config = chat_router::Config::parse();
    let _telemetry = chat_runtime::telemetry::init("chat-router");
    if let Err(e) = chat_router::run(config, chat_runtime::shutdown_signal()).await {
        eprintln!("chat-router: {e}");
        std::process::exit(1);
    }
}
