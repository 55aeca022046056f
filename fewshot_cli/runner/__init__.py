"""The one device-aware runner: device, presets, memory probes, OOM back-off, leaks, checkpoints, log."""
