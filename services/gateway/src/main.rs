use clap::Parser;

#[tokio::main]
async fn main() {
    let config = chat_gateway::Config::parse();
    let _telemetry = chat_runtime::telemetry::init("chat-gateway");
    if let Err(e) = chat_gateway::run(config, chat_runtime::shutdown_signal()).await {
        eprintln!("chat-gateway: {e}");
        std::process::exit(1);
    }
}
