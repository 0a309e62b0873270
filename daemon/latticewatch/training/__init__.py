"""Training and assessment, used only by the command line: data sets, simulation, fitting, evaluation, calibration."""
