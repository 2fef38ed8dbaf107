//! End-to-end tests: the real binary, real Python children, real gRPC and
//! HTTP clients, a real state file.
mod common;

mod backends;
mod bad_input;
mod cli;
mod cluster;
mod dapr;
mod grpc;
mod logging;
mod messaging;
mod rest;
mod restart;
mod sandbox;
mod sandbox_seed;
mod security;
mod url_code;
