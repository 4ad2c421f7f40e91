//! The `tally` binary: everything lives in the library; see `tally --help`.

fn main() -> std::process::ExitCode {
    tally::cli::main()
}
