//! The `snapblk` binary: see [`snapblk::cli`].

fn main() {
    std::process::exit(snapblk::cli::main());
}
