"""Frame sources: file readers, the folder watcher, streams, replay and in-memory fakes."""
