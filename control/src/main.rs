//! `braid-control`: see the library's documentation.

fn main() -> std::process::ExitCode {
    braid_net::daemon::main(braid_control::run)
}
