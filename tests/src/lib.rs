//! Starling multi-host integration tests in network namespaces (filled by its own issue).
