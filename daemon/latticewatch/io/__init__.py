"""Files in and out: micrograph readers (one module per format), SerialEM mdoc, the atomic writer, JSON."""
