//! `braid-control`: see the library's documentation.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    braid_net::daemon::main(braid_control::run).await
}
