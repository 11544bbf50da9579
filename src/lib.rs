//! diffusiond: a local text-to-image server that answers the hosted image API's contract.
pub mod cli;
pub mod pipeline;
pub mod scheduler;
