//! falcon keeps an unmodified server program, or a whole QEMU virtual machine,
//! running when its host dies: it runs the program on 3–9 replicas and orders
//! every input the program receives with a Multi-Paxos engine.
//!
//! This crate holds everything but argument parsing; the `falcon` binary is a
//! thin layer over it. See `DESIGN.md` for the map of the modules.
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod bench;
pub mod capture;
pub mod config;
pub mod consensus;
pub mod failover;
pub mod inspect;
pub mod log;
pub mod node;
pub mod output;
pub mod sim;
pub mod snapshot;
pub mod transport;
pub mod vm;
