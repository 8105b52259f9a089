//! The supervisor's end-to-end tests: the real `supervise` binary running the real example
//! programs. One test binary (linked once) with a module per area, and one support module.
//! Assertions are on typed data: the job's history records (`supervise log --json`, the
//! `events.log` records' `kind` and `data`), the commands' `--json` output and exit codes.

mod support;
// A real S3-compatible server (moto), for the remote-tier tests; unused until they land.
#[allow(dead_code)]
mod s3_server;

mod batch;
mod c_abi;
mod commands;
mod damage;
mod e2e;
mod events_json;
mod files;
mod first_hour;
mod hostile_store;
mod master_loss;
mod memory;
mod mpi;
mod never_lose;
mod output;
mod remote;
mod schedule;
