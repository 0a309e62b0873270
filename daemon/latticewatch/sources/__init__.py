"""Frame sources: the folder watcher (SerialEM rules), the native ZeroMQ stream, in-memory frames; plugins add more."""
