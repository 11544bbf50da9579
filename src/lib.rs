//! diffusiond: a local text-to-image server that answers the hosted image API's contract.
//!
//! Public only where the binary, the integration tests or the benchmarks reach in (`app`, `bench`, `cli`,
//! `generate`, `pipeline`, `scheduler`; `catalog` for now); the rest is internal, so unused code
//! is flagged.
mod accounts;
pub mod app;
pub mod bench;
// `pub` until `Catalog::parse` (used only by tests) goes: catalog/ belongs to the model seam.
pub mod catalog;
pub mod cli;
pub mod generate;
mod http;
pub mod image;
mod infer;
mod metrics;
pub mod pipeline;
pub mod scheduler;
mod store;
#[cfg(test)]
#[path = "../tests/services/mod.rs"]
mod test_services;
