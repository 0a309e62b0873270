"""Fakes that are ordinary code: the analytic frame generator, SerialEM / camera emulators (demo, bench, tests)."""
