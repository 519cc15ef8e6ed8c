//! `citycard-loadtest`: parses the command line and hands it to the library.

use std::process::ExitCode;

use citycard_loadtest::options::Options;
use clap::Parser;

fn main() -> ExitCode {
    citycard_loadtest::run::main(&Options::parse())
}
