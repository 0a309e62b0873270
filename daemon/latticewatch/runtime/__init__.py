"""Runtime: the analyser, the batch path, the runners and the daemon with its state (ledger, event log, archive)."""
