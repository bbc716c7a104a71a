//! Starling raft-store: the managers' replicated cluster state on openraft (filled by its own issue).
