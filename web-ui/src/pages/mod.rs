//! The console's pages, one module each.

pub mod functions;
pub mod jobs;
pub mod login;
pub mod nodes;
pub mod overview;
pub mod scheduling;
