"""The control plane and the `patchq` command: fit, submit, status, run, demo."""
