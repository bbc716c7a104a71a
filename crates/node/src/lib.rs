//! Starling node: the `starling` daemon and CLI (filled by its own issue).
