//! taskgraph: fault-tolerant distributed dataflow on etcd.
