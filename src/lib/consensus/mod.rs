//! The consensus engine: Multi-Paxos in the Viewstamped Replication form,
//! sans-IO.
//!
//! [`Replica`] never touches a socket, a file, a clock or a random number
//! generator. The node layer feeds it [`Input`]s with the current time and
//! executes the [`Command`]s it returns, in order:
//!
//! * [`Command::Append`] and [`Command::Truncate`] change the log;
//!   `Truncate` is durable before the next command runs, and it cancels every
//!   held `Send` whose barrier lies above the cut.
//! * [`Command::SaveState`] first makes every appended entry durable, then
//!   writes the view state durably, before the next command runs.
//! * [`Command::Send`] may leave only once the log is durable up to its
//!   `after_durable` op ("persist, then acknowledge" is in the type).
//! * The node reports durability with [`Input::Durable`].
//!
//! The engine keeps the entries from its first op in memory (the node tells
//! it when a snapshot makes older ones unnecessary, [`Input::Compacted`]).

pub mod message;
mod replica;

pub use message::{Envelope, Message, NodeId};
pub use replica::{
    Bugs, Command, Config, Event, Input, PersistentState, Reject, Replica, Role, Status,
    entry_bytes,
};
