use clap::Parser;

fn main() {
    let cli = l4lb::cli::Cli::parse();
    if let Err(err) = l4lb::commands::run(cli.command) {
        eprintln!("l4lb: error: {err:#}");
        std::process::exit(1);
    }
}
