"""Training data: labelled folders on disk, preprocessing like the analyser, augmentation."""
