"""Emulated devices. A device owns its state and never touches KVM file descriptors."""
