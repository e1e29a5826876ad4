//! Test fixtures for taskgraph: a private etcd, in-process nodes, nodes as child processes.

pub mod etcd;
