//! Layer 4, presentation: the command line (`cli`), the subcommands that
//! string the layers together (`commands`), what they print (`stats`,
//! `status`), the live view (`top`), and what is generated from the command
//! line (`generate`).

pub mod cli;
pub mod commands;
pub mod generate;
pub mod stats;
pub mod status;
pub mod top;
