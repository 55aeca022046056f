"""What memory a run may use, what it will use, and what it did use. The runner and the launcher import this
package; it imports nothing of theirs (a command reaches it as a duck-typed `Command`).

- `limits`: the limit a run is held to (machine, cgroup, RLIMIT_AS, `--memory-budget`) and sizes; no torch.
- `allocator`: the CPU allocator's settings made before torch loads (huge pages for large tensors); no torch.
- `devices`: a device's memory and every limit on it; the per-process CUDA cap.
- `plan`: `plan_run` traces one step of each phase under fake tensors; `fit` shrinks knobs to a limit; `render`.
- `terms`: the device's own plan lines, which no trace sees, each with where it was measured.
- `onednn`: oneDNN's copies around a CPU convolution; `torch_private`: the private parts of torch the plan uses.
- `check`: every run's check of its plan at each phase's end.
- `measure`: probes of the process's and the device's memory, OOM recognition and release.
- `guard`: backs a run off, or stops it with a checkpoint, before a cgroup's kill.

Submodules are imported by name, not here: `limits` and `allocator` stay torch-free for the CLI's start-up."""
