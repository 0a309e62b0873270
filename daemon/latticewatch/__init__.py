"""latticewatch: live analysis of HRTEM frames of nanoparticles (segmentation, defects, archive)."""

__version__ = "0.1.0"
