use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // With no arguments the appliance serves its embedded default model.
    let cli = if std::env::args_os().len() <= 1 {
        edgelora_daemon::cli::Cli::parse_from(["edgelorad", "serve"])
    } else {
        edgelora_daemon::cli::Cli::parse()
    };
    match edgelora_daemon::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
