"""Runtime: profile discovery, the analyser (stages wired with timing), runners."""
