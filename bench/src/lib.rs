//! Starling benchmarks against etcd (filled by its own issue).
