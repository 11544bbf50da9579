//! diffusiond: a local text-to-image server that answers the hosted image API's contract.
pub mod accounts;
pub mod app;
pub mod catalog;
pub mod cli;
pub mod generate;
pub mod http;
pub mod image;
pub mod infer;
pub mod pipeline;
pub mod scheduler;
pub mod store;
