"""The `layersim` and `calibrate` commands: argument parsing and wiring only."""
