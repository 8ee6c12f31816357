"""Calibration: time the cost model's operation classes on this device and fit a profile.

Method: calibrate.grid picks shapes of one model at one TP size and counts their FLOPs and
bytes with the cost model; calibrate.kernels times them with torch; calibrate.fit and
calibrate.energy fit the roofline and energy parameters; calibrate.run writes the profile.
torch and pynvml are imported only by the modules that time (kernels, run, energy's meter),
so importing this package, grid, fit or energy needs neither.
"""
